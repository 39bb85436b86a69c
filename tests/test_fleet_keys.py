"""The fleet's keys and values, sans-IO (fleet/keys.py, fleet/members.py): layout, decoding of what
a hostile tool may write, and where instances disagree."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.helpers import VALUES
from trioanubis.config import Address, FaultConfig, ServerConfig
from trioanubis.control import AddServer, ClearFaults, Drain, Enable, RemoveServer, SetFaults, SetWeight
from trioanubis.fleet.keys import (
    BadValue,
    MemberKey,
    ServerKey,
    StateKey,
    decode_server,
    decode_state,
    encode_state,
    member_key,
    parse_key,
    server_key,
    state_key,
)
from trioanubis.fleet.members import Member, decode_member, disagreements, encode_member

P = "/anubis/"


def test_the_layout() -> None:
    assert server_key(P, "web", "s1") == "/anubis/pools/web/servers/s1"
    assert parse_key(P, b"/anubis/pools/web/servers/s1") == ServerKey("web", "s1")
    assert state_key(P, Drain("web", "a/b")) == "/anubis/state/web/a%2Fb/drain"
    assert parse_key(P, b"/anubis/state/web/a%2Fb/drain") == StateKey("web", "a/b", "drain")
    assert member_key(P, "lb-1:80") == "/anubis/members/lb-1%3A80"
    assert parse_key(P, member_key(P, "lb-1:80").encode()) == MemberKey("lb-1:80")
    for other in (b"/other/pools/web/servers/s1", b"/anubis/pools/web/servers/", b"/anubis/state/w/s/x",
                  b"/anubis/pools//servers/s", b"/anubis/", b"/anubis/members/a/b", b"\xff\xfe"):  # fmt: skip
        assert parse_key(P, other) is None, other


def test_every_command_has_one_aspect_key() -> None:
    faults = FaultConfig(latency=0.1)
    entry = ServerConfig(Address("127.0.0.1", 9001), "s1")
    for command, aspect in ((Drain("p", "s1"), "drain"), (Enable("p", "s1"), "drain"),
                            (SetWeight("p", "s1", 3), "weight"), (SetFaults("p", "s1", faults), "faults"),
                            (ClearFaults("p", "s1"), "faults"), (AddServer("p", entry), "member"),
                            (RemoveServer("p", "s1"), "member")):  # fmt: skip
        key = parse_key(P, state_key(P, command).encode())
        assert key == StateKey("p", "s1", aspect)
        assert decode_state(P, key, encode_state(command)) == command


def test_a_server_value() -> None:
    value = b'{"address": "127.0.0.1:9001", "weight": 2, "backup": true}'
    entry = decode_server(P, ServerKey("web", "s1"), value)
    assert (entry.name, str(entry.address), entry.weight, entry.priority) == ("s1", "127.0.0.1:9001", 2, 1)


@pytest.mark.slow
@pytest.mark.parametrize(("value", "message"), [
    (b"", "/anubis/pools/web/servers/s1: the value is not JSON"),
    (b"[1]", "/anubis/pools/web/servers/s1: the value is not a JSON object"),
    (b'{"address": "nope"}', "/anubis/pools/web/servers/s1: pools.web.servers[s1].address: "),
    (b'{"address": "1.2.3.4:5", "weight": -1}', "/anubis/pools/web/servers/s1: pools.web.servers[s1].weight"),
    (b'{"address": "1.2.3.4:5", "name": "other"}', "/anubis/pools/web/servers/s1: name \"other\" is not"),
    (b'{"dns": "a.example:80"}', "/anubis/pools/web/servers/s1: pools.web.servers[s1]: dns and srv"),
    (b"[" * 100 + b"]" * 100, "/anubis/pools/web/servers/s1: the value nests deeper"),
    (b'{"address": "1.2.3.4:5", "weight": 1' + b"0" * 5000 + b"}", "/anubis/pools/web/servers/s1: "),
    (b" " * 20000, "/anubis/pools/web/servers/s1: a value of 20000 bytes"),
])  # fmt: skip
def test_a_bad_server_value_is_one_line_naming_the_key(value: bytes, message: str) -> None:
    with pytest.raises(BadValue) as info:
        decode_server(P, ServerKey("web", "s1"), value)
    assert str(info.value).startswith(message), str(info.value)
    assert "\n" not in str(info.value) and len(str(info.value)) < 500


@pytest.mark.slow
def test_a_state_value_must_match_its_key() -> None:
    key = StateKey("web", "s1", "weight")
    with pytest.raises(BadValue, match=r'^/anubis/state/web/s1/weight: holds drain of pool "web" server'):
        decode_state(P, key, b'{"op": "drain", "pool": "web", "server": "s1"}')
    with pytest.raises(BadValue, match=r"^/anubis/state/web/s1/weight: weight must be"):
        decode_state(P, key, b'{"op": "weight", "pool": "web", "server": "s1", "weight": 1e99}')
    with pytest.raises(BadValue, match=r'^/anubis/state/web/s1/weight: unknown command "boom"'):
        decode_state(P, key, b'{"op": "boom"}')


@pytest.mark.slow
def test_disagreements_name_both_sides() -> None:
    members = [Member("c", servers={"web": {"s1": "down", "s2": "up"}}),
               Member("a", servers={"web": {"s1": "up", "s2": "up"}}),
               Member("b", servers={"web": {"s1": "up"}, "db": {"d1": "down"}})]  # fmt: skip
    assert disagreements(members) == [{"pool": "web", "server": "s1", "up": ["a", "b"], "down": ["c"]}]
    assert disagreements(members[1:]) == []


@pytest.mark.slow
def test_a_member_round_trips_and_a_bad_one_is_refused() -> None:
    member = Member("a", "0.1.0", 12, 1.5, "127.0.0.1:9900", {"web": {"s1": "up"}})
    assert decode_member("k", "a", encode_member(member)) == member
    for bad in (b'{"name": "b"}', b'{"servers": {"web": {"s1": "sideways"}}}', b'{"pid": -1}',
                b'{"servers": []}', b'{"version": 7}'):  # fmt: skip
        with pytest.raises(BadValue, match=r"^k: "):
            decode_member("k", "a", bad)


@pytest.mark.slow
@given(VALUES, st.sampled_from(["drain", "weight", "faults", "member"]))
def test_any_value_decodes_or_is_a_bad_value(value: bytes, aspect: str) -> None:
    """Whatever a tool writes, decoding gives a record or BadValue: never another exception."""
    for decode in (lambda: decode_server(P, ServerKey("web", "s1"), value),
                   lambda: decode_state(P, StateKey("web", "s1", aspect), value),
                   lambda: decode_member("k", "a", value)):  # fmt: skip
        try:
            decode()
        except BadValue as exc:
            assert "\n" not in str(exc)
