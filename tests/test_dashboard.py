"""The dashboard on `GET /`: served by the admin endpoint, driven in a real headless Chromium."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import (
    EVENTUALLY,
    config_for,
    echo_handler,
    free_port,
    request,
    running_balancer,
    start_backend,
)
from tests.helpers import TOKEN, admin_config, http, two_servers
from tests.peers import need
from trioanubis.app import Balancer
from trioanubis.config import Address, parse_config
from trioanubis.ops import dashboard
from trioanubis.ops.admin import route

T = TypeVar("T")


# ------------------------------------------------------------------ sans-IO: what `route` answers


def idle_balancer(token: str = "") -> Balancer:
    data = admin_config(["127.0.0.1:1", "127.0.0.1:2"], token=token)
    return Balancer(parse_config(data, "test.toml"))


def test_page_is_self_contained_and_cached() -> None:
    reply = route(idle_balancer(), "GET", "/", [], b"", "")
    headers = dict(reply.extra_headers)
    assert reply.status == 200 and reply.content_type.startswith("text/html")
    assert headers["Cache-Control"] == dashboard.PAGE_CACHE and headers["X-Frame-Options"] == "DENY"
    assert reply.body is dashboard.page()  # built once, the same bytes every time
    body = reply.body.decode()
    assert "{{" not in body.split("<script>")[0]  # every include was filled in
    assert "var uPlot=" in body and ".uplot" in body  # the vendored library and its stylesheet
    for attribute in ("src=", "href=", "@import", "url(http"):
        assert attribute not in body, f"the page loads something from elsewhere ({attribute})"
    assert route(idle_balancer(), "HEAD", "/?x=1", [], b"", "").status == 200
    assert route(idle_balancer(), "POST", "/", [], b"", "").status == 405


def test_page_follows_the_token_rule() -> None:
    balancer = idle_balancer(TOKEN)
    refused = route(balancer, "GET", "/", [], b"", TOKEN)
    assert refused.status == 401 and dict(refused.extra_headers)["WWW-Authenticate"] == "Bearer"
    assert refused.body == dashboard.login_page() and b"/stats" not in refused.body
    assert dict(refused.extra_headers)["Cache-Control"] == "no-store"
    wrong = [(b"authorization", b"Bearer nope")]
    assert route(balancer, "GET", "/", wrong, b"", TOKEN).body == dashboard.login_page()
    right = [(b"authorization", f"Bearer {TOKEN}".encode())]
    assert route(balancer, "GET", "/", right, b"", TOKEN).body == dashboard.page()
    assert route(balancer, "GET", "/stats", [], b"", TOKEN).content_type == "application/json"


@pytest.mark.slow
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    method=st.sampled_from(["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "get"]),
    path=st.one_of(
        st.sampled_from(["/", "/index.html", "//", "/?", "/#x", "/index.html/", "/%2F", "/?token=x"]),
        st.text(min_size=0, max_size=40).map(lambda s: "/" + s),
    ),
    authorization=st.one_of(st.none(), st.binary(max_size=40), st.just(f"Bearer {TOKEN}".encode())),
    token=st.sampled_from(["", TOKEN]),
)
def test_fuzz_route_never_fails_on_page_requests(
    method: str, path: str, authorization: bytes | None, token: str
) -> None:
    headers = [] if authorization is None else [(b"authorization", authorization)]
    reply = route(FUZZ_BALANCER, method, path, headers, b"", token)
    assert 200 <= reply.status < 500
    if reply.status == 200 and reply.content_type.startswith("text/html"):
        assert reply.body == dashboard.page()


FUZZ_BALANCER = idle_balancer()


async def test_fuzzed_page_requests_leave_the_admin_serving(nursery: trio.Nursery) -> None:
    backend = await start_backend(nursery, echo_handler)
    async with running_balancer(admin_config([backend.address], token=TOKEN)) as (b, _):
        admin = b.admin_address
        assert admin is not None
        for method, path in [("GET", "/?" + "a" * 3000), ("HEAD", "/"), ("DELETE", "/"), ("GET", "/%00"),
                             ("GET", "/index.html?%ff"), ("OPTIONS", "*")]:  # fmt: skip
            status, _, _ = await http(admin, method, path)
            assert 400 <= status < 500
        status, headers, body = await http(admin, "GET", "/", headers=(("Authorization", f"Bearer {TOKEN}"),))
        assert status == 200 and body == dashboard.page()
        assert headers["cache-control"] == dashboard.PAGE_CACHE


def test_package_ships_the_static_files() -> None:
    from importlib import resources

    static = resources.files("trioanubis.ops") / "static"
    for name in ("dashboard.html", "dashboard.css", "dashboard.js", "login.html", "uPlot.iife.min.js",
                 "uPlot.min.css", "uPlot.LICENSE"):  # fmt: skip
        assert (static / name).is_file(), name
    assert "MIT" in (static / "uPlot.LICENSE").read_text()


# ------------------------------------------------------------------ headless Chromium


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    """A headless Chromium from Debian driven by Debian's chromedriver: nothing is downloaded."""
    chromium, chromedriver = need("chromium"), need("chromedriver")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--no-first-run", "--disable-background-networking", "--disable-component-update",
                     "--disable-sync", "--window-size=1500,900",
                     f"--user-data-dir={tmp_path / 'chromium-profile'}"):  # fmt: skip
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
    try:
        yield driver
    finally:
        driver.quit()


async def in_thread(function: Callable[..., T], *args: Any) -> T:
    """Selenium blocks: call it off the event loop so the balancer keeps serving meanwhile."""
    return await trio.to_thread.run_sync(function, *args)


async def until(predicate: Callable[[], Any], what: str, timeout: float = EVENTUALLY) -> Any:
    """Poll a (blocking) browser-side predicate until it is truthy; fail naming `what`."""
    with trio.move_on_after(timeout):
        while True:
            value = await in_thread(predicate)
            if value:
                return value
            await trio.sleep(0.1)
    pytest.fail(f"timed out after {timeout}s waiting for: {what}")


def row_state(driver: Any, server: str) -> str | None:
    state: str | None = driver.execute_script(
        "const row = document.querySelector(`tr[data-server='${arguments[0]}']`);"
        "return row ? row.dataset.state : null;", server)  # fmt: skip
    return state


def click(driver: Any, server: str, action: str) -> None:
    from selenium.webdriver.common.by import By

    row = driver.find_element(By.CSS_SELECTOR, f"tr[data-server='{server}']")
    row.find_element(By.CSS_SELECTOR, f"button[data-action='{action}']").click()


def text_of(driver: Any, css: str) -> str:
    found: str = driver.execute_script(
        "const e = document.querySelector(arguments[0]); return e && !e.hidden ? e.textContent : '';", css)
    return found


def submit_token(driver: Any, token: str) -> None:
    from selenium.webdriver.common.by import By

    field = driver.find_element(By.ID, "token-input")
    field.clear()
    field.send_keys(token)
    field.submit()


async def server_state(admin: Address, name: str) -> str:
    _, _, body = await http(admin, "GET", "/stats", headers=(("Authorization", f"Bearer {TOKEN}"),))
    servers = json.loads(body)["pools"][0]["servers"]
    state: str = next(s["state"] for s in servers if s["name"] == name)
    return state


@pytest.mark.slow
async def test_dashboard_shows_servers_going_down_and_drains_with_the_token(
    nursery: trio.Nursery, browser: Any, tmp_path: Path
) -> None:
    alpha = await start_backend(nursery, echo_handler, "alpha")
    beta = await start_backend(nursery, echo_handler, "beta")
    async with running_balancer(two_servers(alpha.address, beta.address, TOKEN)) as (b, _):
        admin = b.admin_address
        assert admin is not None
        await in_thread(browser.get, f"http://{admin.host}:{admin.port}/")
        await until(lambda: text_of(browser, "#login"), "the login form (the admin has a token)")
        await in_thread(submit_token, browser, TOKEN)
        for name in ("alpha", "beta"):
            await until(lambda n=name: row_state(browser, n) == "up", f"{name} shown up")  # type: ignore[misc]

        beta.stop()
        await until(lambda: row_state(browser, "beta") == "down", "beta shown down after its backend stopped")
        assert row_state(browser, "alpha") == "up"

        await in_thread(click, browser, "alpha", "drain")
        await until(lambda: row_state(browser, "alpha") == "draining", "alpha shown draining")
        assert await server_state(admin, "alpha") == "draining"
        assert "done: drain alpha" in text_of(browser, "#message")
        await until(lambda: "slow start" not in text_of(browser, "#pools"), "a settled page")
        await in_thread(browser.save_screenshot, str(tmp_path / "dashboard.png"))

        # A token that stopped being right: the change is refused, the page says why and asks again.
        await in_thread(browser.execute_script, "sessionStorage.setItem('anubis-token', 'wrong')")
        await in_thread(click, browser, "alpha", "enable")
        message = await until(lambda: text_of(browser, "#message").startswith("refused"), "a refusal")
        assert message and "401" in text_of(browser, "#message")
        assert text_of(browser, "#token-form"), "the page asks for the token again"
        assert await server_state(admin, "alpha") == "draining"
        await in_thread(browser.save_screenshot, str(tmp_path / "refused.png"))

        await in_thread(submit_token, browser, TOKEN)  # the refused action is retried with it
        await until(lambda: row_state(browser, "alpha") == "up", "alpha enabled again")
        assert await server_state(admin, "alpha") == "up"


@pytest.mark.slow
async def test_wrong_token_at_the_door_shows_nothing(nursery: trio.Nursery, browser: Any) -> None:
    alpha = await start_backend(nursery, echo_handler, "alpha")
    beta = await start_backend(nursery, echo_handler, "beta")
    async with running_balancer(two_servers(alpha.address, beta.address, TOKEN)) as (b, _):
        admin = b.admin_address
        assert admin is not None
        await in_thread(browser.get, f"http://{admin.host}:{admin.port}/")
        await in_thread(submit_token, browser, "not-the-token")
        await until(lambda: "refused" in text_of(browser, "#message"), "the login page refusing the token")
        assert row_state(browser, "alpha") is None
        assert browser.execute_script("return sessionStorage.getItem('anubis-token')") is None


@pytest.mark.slow
async def test_dashboard_works_without_a_token(nursery: trio.Nursery, browser: Any) -> None:
    alpha = await start_backend(nursery, echo_handler, "alpha")
    beta = await start_backend(nursery, echo_handler, "beta")
    async with running_balancer(two_servers(alpha.address, beta.address, "")) as (b, _):
        admin = b.admin_address
        assert admin is not None
        await in_thread(browser.get, f"http://{admin.host}:{admin.port}/")
        for name in ("alpha", "beta"):
            await until(lambda n=name: row_state(browser, n) == "up", f"{name} shown up")  # type: ignore[misc]
        await in_thread(click, browser, "beta", "drain")
        await until(lambda: row_state(browser, "beta") == "draining", "beta shown draining")
        assert b.pools["test"].find("beta").draining  # type: ignore[union-attr]
        assert not text_of(browser, "#token-form"), "no token was asked for"
        # A refused change that is not about the token: the page shows the admin's reason.
        # Typed as a user would, with the field focused: the page's refresh leaves a focused field's
        # value alone (an unfocused one it resets to the weight, which raced the click under load).
        weight_field = "document.querySelector(\"tr[data-server='beta'] input.weight\")"
        await in_thread(browser.execute_script, f"{weight_field}.focus(); {weight_field}.value = '-5'")
        await in_thread(click, browser, "beta", "weight")
        await until(lambda: "weight must be" in text_of(browser, "#message"), "the 400's reason shown")
        assert b.pools["test"].find("beta").weight == 1  # type: ignore[union-attr]


def other_column(driver: Any, css: str) -> list[str]:
    """The lines of an "other" cell as the browser shows them."""
    lines: list[str] = driver.execute_script(
        "const cell = document.querySelector(arguments[0]);"
        "return cell ? Array.from(cell.children, (line) => line.innerText) : [];", css)  # fmt: skip
    return lines


@pytest.mark.slow
async def test_the_other_column_is_readable_text_not_json(
    nursery: trio.Nursery, browser: Any, tmp_path: Path
) -> None:
    alpha = await start_backend(nursery, echo_handler, "alpha")
    beta = await start_backend(nursery, echo_handler, "beta")
    data = two_servers(alpha.address, beta.address, "")
    data["pools"]["test"]["servers"][0]["faults"] = {"latency": "200ms", "jitter": "10ms", "probability": 0.5}
    data["pools"]["test"]["servers"][1]["priority"] = 3
    data["listeners"]["test"]["max_connections_per_client"] = 10  # clients tracked: busiest_clients
    async with running_balancer(data) as (b, address):
        admin = b.admin_address
        assert admin is not None
        stream = await trio.open_tcp_stream(address.host, address.port)  # a tracked client, a busiest one
        await in_thread(browser.get, f"http://{admin.host}:{admin.port}/")
        alpha_cell = "tr[data-server='alpha'] td.extras"
        await until(lambda: any(line.startswith("faults:") for line in other_column(browser, alpha_cell)),
                    "alpha's faults in the other column")  # fmt: skip
        await until(lambda: "busiest clients" in text_of(browser, "#listeners td.extras"), "the busy client")
        alpha_lines = await in_thread(other_column, browser, alpha_cell)
        beta_lines = await in_thread(other_column, browser, "tr[data-server='beta'] td.extras")
        listener_lines = await in_thread(other_column, browser, "#listeners td.extras")
        await in_thread(browser.save_screenshot, str(tmp_path / "other.png"))
        await stream.aclose()
    assert "faults: direction both, probability 0.50, latency 200ms, jitter 10ms" in alpha_lines, alpha_lines
    assert "priority: 0" in alpha_lines and "priority: 3" in beta_lines
    assert not any(line.startswith(("faults:", "faults applied:")) for line in beta_lines), beta_lines  # none
    assert "tracked clients: 1" in listener_lines, listener_lines
    assert any(line.startswith("busiest clients: client 127.0.0.1, active ") for line in listener_lines)
    for line in alpha_lines + beta_lines + listener_lines:
        assert not any(mark in line for mark in '{}[]"='), f"raw JSON in the other column: {line!r}"


@pytest.mark.slow
async def test_the_pool_header_shows_its_mirror_and_bandwidth_limits(
    nursery: trio.Nursery, browser: Any
) -> None:
    alpha = await start_backend(nursery, echo_handler, "alpha")
    data = config_for([alpha.address], mirror=f"127.0.0.1:{free_port()}", download_rate_per_client="1MB/s")
    data["admin"] = {"bind": "127.0.0.1:0"}
    async with running_balancer(data) as (b, address):
        admin = b.admin_address
        assert admin is not None
        assert await request(address, b"ping") == b"ping"  # copied to a mirror that refuses
        await in_thread(browser.get, f"http://{admin.host}:{admin.port}/")
        header = "div.pool[data-pool='test'] h2 .meta"
        await until(lambda: "dropped connect failed 1" in text_of(browser, header), "the mirror's drop")
        shown = await in_thread(text_of, browser, header)
    assert "mirror → 127.0.0.1:" in shown and " (100%): 1 copied, 0 B, dropped connect failed 1" in shown
    assert "bandwidth download rate per client 1MB/s: 1 limited, waited 0 s up, 0 s down" in shown, shown
