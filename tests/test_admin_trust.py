"""Who may ask the admin (issue 28) and what /readyz means (issue 29).

The admin's shell screens every request before a route sees it (admin.py
`screen`): a Host that is not an IP address, localhost or a name in
`[admin] hosts` gets 421 (DNS rebinding), and a browser's cross-origin change
gets 403 (Go 1.25's CrossOriginProtection). The findings were seen against a
real `anubis run` driven by headless Chromium, so that is how they are
tested here; the decision itself is sans-IO and tested, and fuzzed, alone.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.conftest import EVENTUALLY, connect_when_listening, echo_handler, free_port, start_backend
from tests.peers import need
from trioanubis.config import parse_config
from trioanubis.errors import ConfigError
from trioanubis.ops.admin import OPEN_PATHS, SAFE_METHODS, cross_origin, host_allowed, screen, upstream_asked

ANUBIS = [sys.executable, "-m", "trioanubis"]
NAMES = frozenset({"lb.example"})

# ------------------------------------------------------------ sans-IO: the decision


# Go's TestCrossOriginProtectionSecFetchSite, case for case (its request's Host is example.com).
GO_CASES = [
    ("same-origin allowed", "POST", "same-origin", "", True),
    ("none allowed", "POST", "none", "", True),
    ("cross-site blocked", "POST", "cross-site", "", False),
    ("same-site blocked", "POST", "same-site", "", False),
    ("no header with no origin", "POST", "", "", True),
    ("no header with matching origin", "POST", "", "https://example.com", True),
    ("no header with mismatched origin", "POST", "", "https://attacker.example", False),
    ("no header with null origin", "POST", "", "null", False),
    ("GET allowed", "GET", "cross-site", "", True),
    ("HEAD allowed", "HEAD", "cross-site", "", True),
    ("OPTIONS allowed", "OPTIONS", "cross-site", "", True),
    ("PUT blocked", "PUT", "cross-site", "", False),
]
GO_IDS = [case[0] for case in GO_CASES]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "method", "site", "origin", "allowed"), GO_CASES, ids=GO_IDS)
def test_cross_origin_decides_as_go_does(
    name: str, method: str, site: str, origin: str, allowed: bool
) -> None:
    headers = [(b"host", b"example.com")]
    headers += [(b"sec-fetch-site", site.encode())] if site else []
    headers += [(b"origin", origin.encode())] if origin else []
    assert (cross_origin(method, headers) is None) == allowed


@pytest.mark.parametrize(
    ("headers", "allowed"),
    [
        ([(b"host", b"127.0.0.1:9900"), (b"origin", b"http://127.0.0.1:9900")], True),
        ([(b"host", b"[::1]:9900"), (b"origin", b"http://[::1]:9900")], True),
        ([(b"host", b"127.0.0.1:9900"), (b"origin", b"http://127.0.0.1:9901")], False),  # another port
        ([(b"host", b"127.0.0.1:9900"), (b"origin", b"http://localhost:9900")], False),  # another name
        ([(b"host", b"127.0.0.1:9900"), (b"origin", b"http://127.0.0.1:9900 ")], False),  # Go: a parse error
        ([(b"host", b"127.0.0.1:9900"), (b"origin", b"http://[::1:9900")], False),  # unbalanced bracket
        ([(b"origin", b"null")], False),  # no Host matches nothing (Go compares "" with "")
        ([(b"origin", b"")], True),  # empty is absent, as Go's Header.Get
        ([(b"sec-fetch-site", b""), (b"origin", b"http://evil.example")], False),
        ([(b"sec-fetch-site", b"same-origin"), (b"sec-fetch-site", b"cross-site")], True),  # the first
        ([(b"sec-fetch-site", b"cross-site"), (b"sec-fetch-site", b"same-origin")], False),
        ([(b"sec-fetch-site", b"Same-Origin")], False),  # exact, as Go
        ([(b"content-type", b"text/plain")], True),  # curl -X POST: not a browser
    ],
)
def test_cross_origin_edges(headers: list[tuple[bytes, bytes]], allowed: bool) -> None:
    assert (cross_origin("POST", headers) is None) == allowed
    assert cross_origin("GET", headers) is None


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        (b"127.0.0.1", True), (b"127.0.0.1:9900", True), (b"10.1.2.3:80", True), (b"0.0.0.0:1", True),
        (b"[::1]", True), (b"[::1]:9900", True), (b"[::ffff:127.0.0.1]:1", True), (b"[FE80::1]:65535", True),
        (b"localhost", True), (b"LocalHost:9900", True), (b"lb.example:9900", True), (b"LB.EXAMPLE", True),
        (b"rebind.test:9900", False), (b"sub.lb.example", False), (b"localhost.", False),
        (b"foo.localhost", False), (b"127.1", False), (b"2130706433", False), (b"127.000.0.1", False),
        (b"::1", False), (b"[::1", False), (b"[127.0.0.1]", False), (b"127.0.0.1:65536", False),
        (b"127.0.0.1:", False), (b"127.0.0.1:x", False), (b"", False), (b"localhost:9900:1", False),
        ("bücher.example".encode(), False), ("bücher.example".encode("idna"), False),
        (b"[fe80::1%25eth0]", False), (b"127.0.0.1\x00", False),
    ],
)  # fmt: skip
def test_host_allowed(host: bytes, allowed: bool) -> None:
    assert host_allowed(host, NAMES) == allowed


def test_screen_checks_host_first_then_origin_and_lets_probes_through() -> None:
    evil = [(b"host", b"rebind.test:9900")]
    cross = [(b"host", b"127.0.0.1:9900"), (b"sec-fetch-site", b"cross-site")]
    refused = screen("GET", "/stats", evil, NAMES)
    assert refused is not None and refused.kind == "misdirected"
    assert refused.reply.status == 421 and refused.reply.close and b"[admin] hosts" in refused.reply.body
    both = screen("POST", "/pools/p/servers/s/drain", evil + cross[1:], NAMES)
    assert both is not None and both.kind == "misdirected"
    refused = screen("POST", "/pools/p/servers/s/drain", cross, NAMES)
    assert refused is not None and refused.kind == "cross_origin" and refused.reply.status == 403
    assert b"cross-site" in refused.reply.body
    for probe in ("/healthz", "/readyz", "/readyz?upstream=1"):  # no Host check: they reveal nothing
        assert screen("GET", probe, evil, NAMES) is None
        assert screen("POST", probe, evil + cross[1:], NAMES) is not None  # still never a cross-origin change
    assert screen("GET", "/stats", [], NAMES) is None  # HTTP/1.0 without Host: not a browser
    two = screen("GET", "/stats", [(b"host", b"127.0.0.1"), (b"host", b"127.0.0.1")], NAMES)
    assert two is not None and two.kind == "misdirected"
    assert screen("POST", "/pools/p/servers/s/drain", [(b"host", b"lb.example:1")], NAMES) is None


def test_upstream_asked() -> None:
    assert upstream_asked("/readyz") is False
    assert upstream_asked("/readyz?verbose") is False
    assert upstream_asked("/readyz?upstream=0") is False
    assert upstream_asked("/readyz?upstream=1") is True
    assert upstream_asked("/readyz?upstream") is True
    assert upstream_asked("/readyz?x=%ff&upstream=1") is True
    for bad in ("/readyz?upstream=true", "/readyz?upstream=1&upstream=1", "/readyz?upstream=%00"):
        reply = upstream_asked(bad)
        assert not isinstance(reply, bool) and reply.status == 400


# ------------------------------------------------------------ fuzz: header values

INTERESTING_HOSTS = [
    b"127.0.0.1", b"127.0.0.1:9900", b"[::1]", b"[::1]:80", b"[::ffff:127.0.0.1]", b"[::1", b"::1",
    b"localhost", b"LOCALHOST:1", b"localhost.", b"lb.example", b"LB.Example:65535", b"lb.example:65536",
    b"xn--bcher-kva.example", "bücher.example".encode(), b"", b" ", b"127.1", b"a:b:c", b"[]", b"[:]:1",
    b"evil.example:9900", b"127.0.0.1:00009900", b"%31%32%37.0.0.1",
]  # fmt: skip
INTERESTING_ORIGINS = [
    b"null", b"http://127.0.0.1:9900", b"http://evil.example", b"http://[::1]:9900", b"http://[::1",
    b"http://a@127.0.0.1:9900", b"http://127.0.0.1:9900/", b"http://127.0.0.1:99999", b"file://", b"",
    "http://bücher.example".encode(), b"http://xn--bcher-kva.example", b"//127.0.0.1:9900",
]  # fmt: skip
INTERESTING_SITES = [b"same-origin", b"none", b"cross-site", b"same-site", b"", b"SAME-ORIGIN", b"none "]


def idna_names() -> st.SearchStrategy[bytes]:
    def encode(label: str) -> bytes:
        try:
            return label.encode("idna")
        except UnicodeError:
            return label.encode("utf-8", errors="surrogateescape")

    return st.text(min_size=1, max_size=20).map(encode)


def values(interesting: list[bytes]) -> st.SearchStrategy[bytes]:
    ports = st.integers(0, 100_000).map(lambda p: b":%d" % p) | st.just(b"")
    return st.one_of(
        st.sampled_from(interesting),
        st.binary(max_size=40),
        st.tuples(st.sampled_from(interesting) | idna_names(), ports).map(b"".join),
        st.ip_addresses(v=6).map(lambda a: b"[%s]" % str(a).encode()),
        st.ip_addresses().map(lambda a: str(a).encode()),
    )


@st.composite
def header_sets(draw: st.DrawFn) -> list[tuple[bytes, bytes]]:
    """0-2 each of Host, Origin and Sec-Fetch-Site (duplicates too), in any order."""
    headers = []
    for name, interesting in ((b"host", INTERESTING_HOSTS), (b"origin", INTERESTING_ORIGINS),
                              (b"sec-fetch-site", INTERESTING_SITES)):  # fmt: skip
        headers += [(name, v) for v in draw(st.lists(values(interesting), max_size=2))]
    return draw(st.permutations(headers))


METHODS = st.sampled_from(["GET", "HEAD", "OPTIONS", "POST", "PUT", "DELETE", "get", "PATCH"])
TARGETS = st.sampled_from(["/", "/stats", "/healthz", "/readyz?upstream=1", "/pools/web/servers/s1/drain",
                           "/pools/web/servers/s1/faults", "/metrics?x", "*"])  # fmt: skip


@pytest.mark.slow
@given(method=METHODS, target=TARGETS, headers=header_sets())
@example(method="POST", target="/pools/web/servers/s1/drain", headers=[(b"host", b"\xff")])
@settings(max_examples=400, deadline=None)  # a pure function; the live fuzz below drives the process
def test_fuzz_screen_never_raises_and_keeps_its_promises(
    method: str, target: str, headers: list[tuple[bytes, bytes]]
) -> None:
    refusal = screen(method, target, headers, NAMES)
    if refusal is None:
        return
    assert (refusal.kind, refusal.reply.status) in (("misdirected", 421), ("cross_origin", 403))
    json.loads(refusal.reply.body)
    if refusal.kind == "cross_origin":
        assert method not in SAFE_METHODS
    else:
        assert target.split("?")[0] not in OPEN_PATHS
        assert any(name == b"host" for name, _ in headers)


# ------------------------------------------------------------ config


def admin_table(**admin: Any) -> dict[str, Any]:
    return {"listeners": {"l": {"bind": "127.0.0.1:0", "pool": "p"}},
            "pools": {"p": {"servers": ["127.0.0.1:1"]}}, "admin": admin}  # fmt: skip


def test_hosts_are_names_lower_cased() -> None:
    config = parse_config(admin_table(hosts=["LB1.internal", "lb1.internal", "a-b.c"]), "t.toml")
    assert config.admin is not None and config.admin.hosts == ("lb1.internal", "a-b.c")
    default = parse_config(admin_table(), "t.toml").admin
    assert default is not None and default.hosts == ()


@pytest.mark.parametrize(
    ("hosts", "message"),
    [
        ("lb1", "t.toml: admin.hosts: must be a list of at most 64 host names"),
        (["ok.example", "lb1:9900"], "t.toml: admin.hosts[1]: must be a DNS name without a port"),
        (["[::1]"], "admin.hosts[0]: must be a DNS name"),
        (["bücher.example"], "write an international name in its xn-- form"),
        (["-a.example"], "admin.hosts[0]: must be a DNS name"),
        (["a..b"], "admin.hosts[0]: must be a DNS name"),
        ([""], "admin.hosts[0]: must be a DNS name"),
        ([3], "admin.hosts[0]: must be a DNS name"),
        (["a" * 64 + ".example"], "admin.hosts[0]: must be a DNS name"),
        ([f"h{i}.example" for i in range(65)], "admin.hosts: must be a list of at most 64"),
    ],
)
def test_bad_hosts_are_config_errors_naming_the_entry(hosts: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_config(admin_table(hosts=hosts), "t.toml")


# ------------------------------------------------------------ a real `anubis run`


def write_config(path: Path, port: int, admin: int, servers: dict[str, str], *, hosts: tuple[str, ...] = (),
                 workers: int = 1, health: str = 'check = "none"') -> None:  # fmt: skip
    entries = ", ".join(f'{{ address = "{a}", name = "{n}" }}' for n, a in servers.items())
    path.write_text(
        f'[settings]\nworkers = {workers}\ndrain_timeout = "20s"\n'
        f'[listeners.web]\nbind = "127.0.0.1:{port}"\npool = "web"\n'
        f"[pools.web]\nservers = [{entries}]\nhealth = {{ {health} }}\n"
        f'[admin]\nbind = "127.0.0.1:{admin}"\n' + (f"hosts = {json.dumps(list(hosts))}\n" if hosts else "")
    )


@asynccontextmanager
async def running(config: Path, stderr: Path) -> AsyncIterator[trio.Process]:
    """`anubis run -c config`, its log in `stderr`; SIGTERM at the end, and it must exit 0."""
    with open(stderr, "wb") as log:
        process = await trio.lowlevel.open_process([*ANUBIS, "run", "-c", str(config)],
                                                   stdout=subprocess.DEVNULL, stderr=log)  # fmt: skip
    try:
        yield process
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            await process.wait()
    assert process.returncode == 0, stderr.read_text()[-3000:]


async def ask(port: int, method: str, path: str, headers: tuple[tuple[str, str], ...] = (),
              host: str | None = None) -> tuple[int, bytes]:  # fmt: skip
    """One request as curl sends it (Host 127.0.0.1:port unless given): (status, body)."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host or f'127.0.0.1:{port}'}", "Content-Length: 0",
             "Connection: close", *(f"{k}: {v}" for k, v in headers)]  # fmt: skip
    stream = await connect_when_listening(port)
    answer = b""
    async with stream:
        await stream.send_all(("\r\n".join(lines) + "\r\n\r\n").encode())
        while data := await stream.receive_some(65536):
            answer += data
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def stats(port: int) -> dict[str, Any]:
    status, body = await ask(port, "GET", "/stats")
    assert status == 200, body
    return dict(json.loads(body))


def server(doc: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(s for s in doc["pools"][0]["servers"] if s["name"] == name)
    return found


async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    with trio.move_on_after(EVENTUALLY):
        while not await check():
            await trio.sleep(0.05)
        return
    pytest.fail(f"timed out after {EVENTUALLY}s waiting for: {what}")


# ------------------------------------------------------------ headless Chromium


@pytest.fixture
def chromium(tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """Headless Chromiums (Debian's, with its chromedriver), with extra arguments; all quit at the end."""
    binary, chromedriver = need("chromium"), need("chromedriver")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    drivers: list[Any] = []

    def start(*extra: str) -> Any:
        options = webdriver.ChromeOptions()
        options.binary_location = binary
        for argument in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--no-first-run", "--disable-background-networking", "--disable-component-update",
                         "--disable-sync", "--disable-features=HttpsUpgrades",
                         f"--user-data-dir={tmp_path / f'profile-{len(drivers)}'}", *extra):  # fmt: skip
            options.add_argument(argument)
        drivers.append(webdriver.Chrome(service=Service(executable_path=chromedriver), options=options))
        return drivers[-1]

    try:
        yield start
    finally:
        for driver in drivers:
            driver.quit()


async def in_thread(function: Callable[..., Any], *args: Any) -> Any:
    """Selenium blocks: call it off the event loop."""
    return await trio.to_thread.run_sync(function, *args)


async def serve_page(nursery: trio.Nursery, html: bytes) -> int:
    """Serve `html` to every GET on a port of 127.0.0.1 (the attacker's site); its port."""

    async def answer(stream: trio.SocketStream) -> None:
        head = b""
        with trio.move_on_after(EVENTUALLY):
            while b"\r\n\r\n" not in head and (data := await stream.receive_some(4096)):
                head += data
        reply = b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: %d\r\n"
        with suppress(trio.BrokenResourceError):
            await stream.send_all(reply % len(html) + b"Connection: close\r\n\r\n" + html)
        await stream.aclose()

    listeners = await nursery.start(trio.serve_tcp, answer, 0)
    return int(listeners[0].socket.getsockname()[1])


ATTACK = """<!doctype html><title>a page the operator opened</title>
<iframe name="sink"></iframe>
<form id="drain" method="POST" target="sink"
      action="http://127.0.0.1:{admin}/pools/web/servers/s1/drain"></form>
<script>
fetch("http://127.0.0.1:{admin}/pools/web/servers/s2/weight",
      {{method: "POST", mode: "no-cors", headers: {{"Content-Type": "text/plain"}},
        body: '{{"weight": 0}}'}});
document.getElementById("drain").submit();
</script>"""


@pytest.mark.slow
async def test_a_page_on_another_origin_cannot_drain_or_reweigh(
    nursery: trio.Nursery, tmp_path: Path, chromium: Callable[..., Any]
) -> None:
    """Issue 28: a page on another origin drained s1 (an HTML form) and set s2's weight to 0 (a no-cors
    fetch with text/plain) through the operator's browser. Now both are refused, counted and logged;
    the admin's own dashboard still drains."""
    s1 = await start_backend(nursery, echo_handler, "s1")
    s2 = await start_backend(nursery, echo_handler, "s2")
    port, admin = free_port(), free_port()
    config, log = tmp_path / "anubis.toml", tmp_path / "stderr"
    write_config(config, port, admin, {"s1": s1.address, "s2": s2.address})
    page = await serve_page(nursery, ATTACK.format(admin=admin).encode())
    async with running(config, log):
        before = await stats(admin)
        assert server(before, "s1")["state"] == "up" and server(before, "s2")["weight"] == 1
        browser = await in_thread(chromium)
        await in_thread(browser.get, f"http://localhost:{page}/")  # another site than 127.0.0.1

        async def both_arrived() -> bool:  # refused, or (before this change) obeyed
            doc = await stats(admin)
            changed = server(doc, "s1")["state"] != "up" or server(doc, "s2")["weight"] != 1
            return changed or int(doc["admin"].get("cross_origin", 0)) >= 2

        await eventually(both_arrived, "the form POST and the fetch reaching the admin")
        doc = await stats(admin)
        assert server(doc, "s1")["state"] == "up", "a page on another origin drained s1"
        assert server(doc, "s2")["weight"] == 1, "a page on another origin set s2's weight"
        assert doc["admin"]["cross_origin"] == 2 and doc["admin"]["misdirected"] == 0
        _, metrics = await ask(admin, "GET", "/metrics")
        assert b"anubis_admin_cross_origin_total 2\n" in metrics
        lines = ("refused POST '/pools/web/servers/s1/drain' with Sec-Fetch-Site: 'cross-site' (403)",
                 "admin: refused POST '/pools/web/servers/s2/weight'")  # fmt: skip

        async def both_logged() -> bool:  # the log writer's thread writes a moment after the count
            logged = log.read_text()
            return all(line in logged for line in lines)

        await eventually(both_logged, "both refusals logged")

        await in_thread(browser.get, f"http://127.0.0.1:{admin}/")  # the operator's own dashboard
        await in_thread(click_when_shown, browser, "s1", "drain")

        async def drained() -> bool:
            return bool(server(await stats(admin), "s1")["state"] == "draining")

        await eventually(drained, "the dashboard draining s1")
        status, _ = await ask(admin, "POST", "/pools/web/servers/s1/enable")  # curl -X POST: no browser
        assert status == 200


def click_when_shown(driver: Any, server_name: str, action: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    css = f"tr[data-server='{server_name}'] button[data-action='{action}']"
    WebDriverWait(driver, EVENTUALLY).until(lambda d: d.find_elements(By.CSS_SELECTOR, css))
    driver.find_element(By.CSS_SELECTOR, css).click()


FETCH_STATS = """const done = arguments[arguments.length - 1];
fetch("/stats", {cache: "no-store"})
  .then(r => r.text().then(t => done([r.status, t])), e => done([0, String(e)]));"""


def page_text(driver: Any) -> str:
    text: str = driver.execute_script("return document.body ? document.body.innerText : ''")
    return text


@pytest.mark.slow
async def test_a_rebound_name_gets_421_unless_listed_in_hosts(
    nursery: trio.Nursery, tmp_path: Path, chromium: Callable[..., Any]
) -> None:
    """Issue 28: with a name rebound to 127.0.0.1 the dashboard ran under a foreign origin, read /stats and
    could press every button. Now that name gets 421 on every route but the probes, until it is listed in
    [admin] hosts (a reload applies it)."""
    backend = await start_backend(nursery, echo_handler, "s1")
    port, admin = free_port(), free_port()
    config, log = tmp_path / "anubis.toml", tmp_path / "stderr"
    write_config(config, port, admin, {"s1": backend.address})
    async with running(config, log) as process:
        await stats(admin)
        browser = await in_thread(chromium, "--host-resolver-rules=MAP rebind.test 127.0.0.1")
        await in_thread(browser.get, f"http://rebind.test:{admin}/")
        assert "misdirected request" in await in_thread(page_text, browser)
        assert not await in_thread(browser.execute_script, "return document.querySelector('#pools')")
        status, body = await in_thread(browser.execute_async_script, FETCH_STATS)
        assert status == 421 and "pools" not in body
        assert (await stats(admin))["admin"]["misdirected"] >= 2

        async def logged() -> bool:  # the log writer's thread writes a moment after the count
            return "with Host 'rebind.test:" in log.read_text()

        await eventually(logged, "the misdirected request logged")
        assert (await ask(admin, "GET", "/healthz", host=f"rebind.test:{admin}"))[0] == 200  # probes: open

        write_config(config, port, admin, {"s1": backend.address}, hosts=("rebind.test",))
        process.send_signal(signal.SIGHUP)

        async def listed() -> bool:
            return (await ask(admin, "GET", "/stats", host=f"rebind.test:{admin}"))[0] == 200

        await eventually(listed, "the reload to accept rebind.test")
        await in_thread(browser.get, f"http://rebind.test:{admin}/")
        await in_thread(click_when_shown, browser, "s1", "drain")  # the dashboard runs under that name

        async def drained() -> bool:
            return bool(server(await stats(admin), "s1")["state"] == "draining")

        await eventually(drained, "the dashboard under rebind.test draining s1")
        status, body = await in_thread(browser.execute_async_script, FETCH_STATS)
        assert status == 200 and json.loads(body)["pools"][0]["name"] == "web"


# ------------------------------------------------------------ the live fuzz


def answers(port: int, data: bytes) -> bytes:
    """`exchange`, or b"" while nothing listens yet."""
    try:
        return exchange(port, data)
    except OSError:
        return b""


def exchange(port: int, data: bytes) -> bytes:
    """Send `data` then EOF, read to EOF; whatever the peer does, never raise."""
    answer = b""
    with socket.create_connection(("127.0.0.1", port), timeout=EVENTUALLY) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            while chunk := sock.recv(65536):
                answer += chunk
        except OSError:
            pass
    return answer


@pytest.fixture(scope="module")
def live_admin(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[subprocess.Popen[bytes], int, Path]]:
    """`anubis run` with `hosts = ["lb.example"]` and no token: the process, its admin port, its log."""
    tmp = tmp_path_factory.mktemp("trust")
    port, admin, config, log = free_port(), free_port(), tmp / "anubis.toml", tmp / "stderr"
    write_config(config, port, admin, {"s1": f"127.0.0.1:{free_port()}"}, hosts=("lb.example",))
    with open(log, "wb") as stderr:
        command = [*ANUBIS, "run", "-c", str(config)]
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        deadline = time.monotonic() + EVENTUALLY
        while not answers(admin, b"GET /healthz HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.1 200"):
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        yield process, admin, log
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    assert process.returncode == 0, log.read_text()[-3000:]


@pytest.mark.slow
@given(method=METHODS, target=TARGETS, headers=header_sets())
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_fuzzed_host_and_origin_headers_leave_the_admin_serving(
    live_admin: tuple[subprocess.Popen[bytes], int, Path], method: str, target: str,
    headers: list[tuple[bytes, bytes]],
) -> None:  # fmt: skip
    process, admin, log = live_admin
    head = b"%s %s HTTP/1.1\r\n" % (method.encode(), target.encode())
    head += b"".join(b"%s: %s\r\n" % header for header in headers) + b"Connection: close\r\n\r\n"
    exchange(admin, head)
    assert process.poll() is None, log.read_text()[-3000:]
    assert exchange(admin, b"GET /healthz HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.1 200 OK\r\n")
    enable = b"POST /pools/web/servers/s1/enable HTTP/1.1\r\nHost: lb.example\r\nConnection: close\r\n\r\n"
    assert exchange(admin, enable).startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"Traceback" not in log.read_bytes()


# ------------------------------------------------------------ workers mode


@pytest.mark.slow
async def test_workers_supervisor_refuses_cross_origin_changes_and_answers_readyz_both_ways(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """Issues 28 and 29 with `workers = 2`: the supervisor's admin screens the same way, and its /readyz
    is about the balancer unless ?upstream=1 asks about the servers too."""
    s1 = await start_backend(nursery, echo_handler, "s1")
    port, admin = free_port(), free_port()
    config, log = tmp_path / "anubis.toml", tmp_path / "stderr"
    write_config(config, port, admin, {"s1": s1.address}, workers=2)
    async with running(config, log) as process:

        async def all_serving() -> bool:
            workers = (await stats(admin)).get("workers", [])
            return len(workers) == 2 and all(w["serving"] and w["answered"] for w in workers)

        await eventually(all_serving, "both workers serving")
        held = await connect_when_listening(port)  # keeps the workers draining at the end
        await held.send_all(b"x")
        assert await held.receive_some(1) == b"x"
        drain = "/pools/web/servers/s1/drain"
        evil = ("Origin", "http://evil.example")
        site = "Sec-Fetch-Site"
        for headers in (((site, "cross-site"), evil), (evil,), ((site, "same-site"),)):
            status, body = await ask(admin, "POST", drain, headers)
            assert status == 403 and b"cross-origin request refused" in body
        assert (await ask(admin, "GET", "/stats", host=f"evil.example:{admin}"))[0] == 421
        doc = await stats(admin)
        assert server(doc, "s1")["state"] == "up"
        assert doc["admin"]["cross_origin"] == 3 and doc["admin"]["misdirected"] == 1
        assert (await ask(admin, "GET", "/readyz?upstream=1"))[0] == 200

        status, _ = await ask(admin, "POST", drain, (("Sec-Fetch-Site", "same-origin"),))  # the dashboard
        assert status == 200 and server(await stats(admin), "s1")["state"] == "draining"
        assert (await ask(admin, "GET", "/readyz"))[0] == 200  # no server to send to: still ready
        assert (await ask(admin, "GET", "/readyz?upstream=1"))[0] == 503

        process.send_signal(signal.SIGTERM)  # draining: not ready either way

        async def not_ready() -> bool:
            return (await ask(admin, "GET", "/readyz"))[0] == 503

        await eventually(not_ready, "/readyz 503 while the workers drain")
        assert (await ask(admin, "GET", "/readyz?upstream=1"))[0] == 503
        await held.aclose()
