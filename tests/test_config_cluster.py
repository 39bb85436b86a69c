"""The `[cluster]` table and `servers_from = "etcd"` (config/cluster.py, config/pools.py): what they
accept, the one line naming the key they refuse with, and what `anubis check` says of them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.helpers import run_cli
from tests.tlscerts import Authority
from trioanubis.config import ClusterConfig, ConfigError, parse_config


def config_with(cluster: dict[str, Any] | None = None, **pool: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "listeners": {"l": {"bind": "127.0.0.1:0", "pool": "p"}},
        "pools": {"p": {"servers": ["127.0.0.1:9"], **pool}},
    }
    if cluster is not None:
        data["cluster"] = cluster
    return data


def test_the_defaults() -> None:
    config = parse_config(config_with({"etcd": ["http://127.0.0.1:2379"]}), "c.toml")
    assert config.cluster == ClusterConfig(endpoints=("http://127.0.0.1:2379",))
    assert config.cluster.prefix == "/anubis/" and config.cluster.ttl == 10 and config.cluster.timeout == 5.0
    assert parse_config(config_with(), "c.toml").cluster is None


def test_every_key() -> None:
    cluster = {"etcd": ["10.0.0.1:2379", "http://[::1]:2379"], "prefix": "/lb/", "name": "lb-1.a:7",
               "ttl": 30, "timeout": "250ms", "username": "anubis", "password": "pw"}  # fmt: skip
    config = parse_config(config_with(cluster), "c.toml")
    assert config.cluster == ClusterConfig(("10.0.0.1:2379", "http://[::1]:2379"), "/lb/", "lb-1.a:7", 30,
                                           0.25, username="anubis", password="pw")  # fmt: skip
    assert "pw" not in repr(config.cluster)


BAD = [
    ({}, "cluster.etcd: must be a list of 1 to 16 etcd endpoints"),
    ({"etcd": "http://127.0.0.1:2379"}, "cluster.etcd: must be a list"),
    ({"etcd": []}, "cluster.etcd: must be a list"),
    ({"etcd": [f"h{i}:1" for i in range(17)]}, "cluster.etcd: must be a list"),
    ({"etcd": [5]}, "cluster.etcd[0]: must be a string"),
    ({"etcd": ["ftp://a:1"]}, "cluster.etcd[0]: the scheme must be http or https"),
    ({"etcd": ["http://a:1", "http://a:99999"]}, "cluster.etcd[1]: the port must be in [1, 65535]"),
    ({"etcd": ["http://a:1/v3"]}, "cluster.etcd[0]: only scheme, host and port are allowed"),
    ({"etcd": ["http://:1"]}, "cluster.etcd[0]: no host"),
    ({"etcd": ["a:1"], "prefix": "anubis"}, 'cluster.prefix: must start and end with "/"'),
    ({"etcd": ["a:1"], "prefix": "/a b/"}, 'cluster.prefix: must start and end with "/"'),
    ({"etcd": ["a:1"], "prefix": ""}, 'cluster.prefix: must start and end with "/"'),
    ({"etcd": ["a:1"], "name": "a/b"}, "cluster.name: must be 1 to 128 letters"),
    ({"etcd": ["a:1"], "ttl": 1}, "cluster.ttl: "),
    ({"etcd": ["a:1"], "ttl": 3601}, "cluster.ttl: "),
    ({"etcd": ["a:1"], "timeout": "2m"}, "cluster.timeout: "),
    ({"etcd": ["a:1"], "username": "u"}, "cluster.password: username and password go together"),
    ({"etcd": ["a:1"], "password": "p"}, "cluster.username: username and password go together"),
    ({"etcd": ["a:1"], "ca": "/nonexistent/ca.pem"}, "cluster: ca: no such file"),
    ({"etcd": ["a:1"], "cert": "/nonexistent/c.pem"}, "cluster: cert: a client certificate needs both"),
    ({"etcd": ["a:1"], "endpoints": []}, "cluster.endpoints: unknown key"),
]


@pytest.mark.parametrize(("cluster", "message"), BAD)
def test_a_bad_value_is_one_line_naming_the_key(cluster: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(config_with(cluster), "c.toml")
    text = str(info.value)
    assert text.startswith(f"c.toml: {message}"), text
    assert "\n" not in text


def test_tls_files_that_load_are_taken(tmp_path: Path) -> None:
    ca = Authority(tmp_path)
    client = ca.issue("client")
    cluster = {"etcd": ["https://127.0.0.1:2379"], "ca": ca.pair.cert, "cert": client.cert, "key": client.key}
    config = parse_config(config_with(cluster), "c.toml")
    assert config.cluster is not None and config.cluster.cert == client.cert


def test_servers_from_etcd() -> None:
    data = config_with({"etcd": ["a:1"]}, servers_from="etcd")
    del data["pools"]["p"]["servers"]
    config = parse_config(data, "c.toml")
    assert config.pools["p"].servers_from == "etcd" and config.pools["p"].servers == ()
    assert parse_config(config_with(), "c.toml").pools["p"].servers_from == ""


def test_servers_from_etcd_needs_a_cluster() -> None:
    with pytest.raises(ConfigError, match=r'^c.toml: pools.p.servers_from: servers_from = "etcd" needs a '
                                          r"\[cluster\] table"):  # fmt: skip
        parse_config(config_with(servers_from="etcd"), "c.toml")
    with pytest.raises(ConfigError, match=r"^c.toml: pools.p.servers_from: must be one of '', 'etcd'"):
        parse_config(config_with({"etcd": ["a:1"]}, servers_from="consul"), "c.toml")
    with pytest.raises(ConfigError, match=r"^c.toml: pools.p.servers: must be a non-empty array"):
        parse_config(config_with({"etcd": ["a:1"]}, servers=[]), "c.toml")


@pytest.mark.slow
def test_anubis_check_names_the_cluster(tmp_path: Path) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text('[listeners.l]\nbind = "127.0.0.1:0"\npool = "p"\n'
                    '[pools.p]\nservers_from = "etcd"\n'
                    '[cluster]\netcd = ["http://10.0.0.1:2379", "http://10.0.0.2:2379"]\n'
                    'username = "lb"\npassword = "secret-pw"\n')  # fmt: skip
    result = run_cli("check", "-c", str(path))
    assert result.returncode == 0, result.stderr
    assert ("cluster: etcd http://10.0.0.1:2379, http://10.0.0.2:2379, prefix /anubis/, instance host:pid, "
            "lease 10s, as lb") in result.stdout  # fmt: skip
    assert "servers from etcd keys /anubis/pools/p/servers/" in result.stdout
    assert "secret-pw" not in result.stdout
    path.write_text(path.read_text().replace('"http://10.0.0.2:2379"', '"http://10.0.0.2:0"'))
    result = run_cli("check", "-c", str(path))
    assert result.returncode == 1
    assert result.stderr.strip().endswith(f"{path}: cluster.etcd[1]: the port must be in [1, 65535] (like "
                                          '"http://127.0.0.1:2379"), got "http://10.0.0.2:0"'), result.stderr
