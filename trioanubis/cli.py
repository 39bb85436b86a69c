"""The `anubis` command: arguments → config → `trio.run`.

Every expected failure (a bad config, a port in use) is printed as one line
`anubis: …` on stderr (a JSON object under `log_format = "json"`) with exit
status 1; tracebacks are for bugs only.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import trio

from trioanubis import __version__
from trioanubis.accesslog import configure_logging, log_fatal, logs_json
from trioanubis.app import Balancer, run_until_signalled
from trioanubis.config import Address, Config, load_config, proxy_config
from trioanubis.errors import AnubisError, ConfigError
from trioanubis.hello import serve_hello
from trioanubis.strategies import STRATEGIES
from trioanubis.summary import describe
from trioanubis.tls import fingerprint, self_signed

log = logging.getLogger("trioanubis")

DEFAULT_CONFIG = "anubis.toml"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="anubis", description="A TCP load balancer on Trio.")
    parser.add_argument("--version", action="version", version=f"anubis {__version__}")
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"],
                        help="how much to log on stderr (default: info)")  # fmt: skip
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run the balancer from a config file")
    run.add_argument("-c", "--config", default=DEFAULT_CONFIG, help="default: ./anubis.toml")
    run.add_argument("--watch", action="store_true",
                     help="reload when the config file changes (polls its modification time)")

    reload = commands.add_parser("reload", help="make the running balancer re-read its config")
    reload.add_argument("-c", "--config", default=DEFAULT_CONFIG,
                        help="the config whose [settings] pid_file names the process")  # fmt: skip

    check = commands.add_parser("check", help="validate a config file and summarise it")
    check.add_argument("-c", "--config", default=DEFAULT_CONFIG, help="default: ./anubis.toml")

    proxy = commands.add_parser("proxy", help="balance LISTEN over SERVERs, no config file")
    proxy.add_argument("listen", help='where to listen, e.g. ":8000" or "127.0.0.1:8000"')
    proxy.add_argument("servers", nargs="+", metavar="server", help="host:port of a backend")
    proxy.add_argument("--strategy", default="round_robin",
                       help=f"one of {', '.join(STRATEGIES)} (default: round_robin)")  # fmt: skip
    proxy.add_argument("--tls", action="store_true",
                       help="clients speak TLS (a self-signed localhost certificate, made once and kept "
                            "in $XDG_CACHE_HOME/trioanubis); servers get plaintext")  # fmt: skip

    demo = commands.add_parser("demo", help="run hello-world backends behind the demo config")
    demo.add_argument("-c", "--config", default=DEFAULT_CONFIG, help="default: ./anubis.toml")

    hello = commands.add_parser("hello", help="run one hello-world HTTP backend")
    hello.add_argument("--name", default="hello")
    hello.add_argument("--port", type=int, default=8080)
    hello.add_argument("--host", default="")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    try:
        if args.command == "check":
            config = load_config(args.config)
            print(f"{args.config}: ok")
            print(describe(config))
            return 0
        if args.command == "reload":
            return _signal_reload(args.config)
        if args.command == "hello":
            trio.run(_run_hello, args.name, Address(args.host, args.port))
            return 0
        if args.command == "proxy":
            config = proxy_config(args.listen, args.servers, args.strategy, _dev_certificate(args.tls))
        else:
            config = load_config(_demo_config_path(args.config) if args.command == "demo"
                                 else args.config)  # fmt: skip
        configure_logging(args.log_level, config.settings.log_format)
        balancer = Balancer(
            config,
            config_path=None if args.command == "proxy" else str(config.source),
            watch=getattr(args, "watch", False),
        )
        trio.run(_serve, balancer, args.command == "demo")
    except ConfigError as exc:
        log_fatal(str(exc))
        return 1
    except BaseException as exc:
        error = _find_error(exc)
        if error is None:
            if _only_interrupts(exc):
                return 130
            if not logs_json():
                raise
            log.critical("stopped by an unexpected error (a bug)", exc_info=exc)  # as JSON too
            return 1
        log_fatal(str(error))
        return 1
    return 0


def _dev_certificate(wanted: bool) -> tuple[str, str] | None:
    """`anubis proxy --tls`: the self-signed certificate (made the first time), its fingerprint printed."""
    if not wanted:
        return None
    cert, key = self_signed()
    print(f"TLS certificate {cert} (self-signed for localhost, 127.0.0.1, ::1)\n"
          f"  SHA-256 fingerprint {fingerprint(cert)}", flush=True)  # fmt: skip
    return cert, key


def _demo_config_path(path: str) -> Path:
    """The given config if it exists, else the copy shipped inside the package."""
    if Path(path).exists() or path != DEFAULT_CONFIG:
        return Path(path)
    return Path(__file__).with_name("anubis.toml")


def _signal_reload(config_path: str) -> int:
    """`anubis reload`: validate the file, then SIGHUP the process its pid_file names."""
    config = load_config(config_path)
    pid_file = config.settings.pid_file
    if not pid_file:
        raise ConfigError(f"{config_path}: settings.pid_file is not set, so the running "
                          "process cannot be found; set it or send SIGHUP yourself")  # fmt: skip
    try:
        pid = int(Path(pid_file).read_text().strip())
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError) as exc:
        print(f"anubis: cannot signal the process in {pid_file}: {exc}", file=sys.stderr)
        return 1
    print(f"sent SIGHUP to process {pid}; it logs whether the reload was applied")
    return 0


async def _serve(balancer: Balancer, demo: bool) -> None:
    config = balancer.config
    log.info("starting anubis %s with %s\n%s", __version__, config.source, describe(config))
    async with trio.open_nursery() as nursery:
        if demo:
            await _start_demo_backends(nursery, config)
        bound: Mapping[str, Address] = await nursery.start(
            lambda task_status: run_until_signalled(balancer, task_status=task_status)
        )
        if demo:
            _print_demo_help(bound)
        log.info("ready\n%s", describe(config, balancer.pools))
        await balancer.stopped.wait()
        nursery.cancel_scope.cancel()
    log.info("stopped")


async def _start_demo_backends(nursery: trio.Nursery, config: Config) -> None:
    for pool in config.pools.values():
        for server in pool.servers:
            await nursery.start(serve_hello, server.name, server.address)


def _print_demo_help(bound: Mapping[str, Address]) -> None:
    for name, address in bound.items():
        host = "localhost" if address.host in ("0.0.0.0", "::", "") else address.host
        print(f"demo listener {name} is up: try  curl http://{host}:{address.port}/  "
              f"(a few times: the answer rotates), Ctrl-C to stop", flush=True)  # fmt: skip


async def _run_hello(name: str, bind: Address) -> None:
    await serve_hello(name, bind)


def _find_error(exc: BaseException) -> AnubisError | None:
    """The first AnubisError inside `exc`, looking through exception groups."""
    if isinstance(exc, AnubisError):
        return exc
    for inner in getattr(exc, "exceptions", ()):
        found = _find_error(inner)
        if found is not None:
            return found
    return None


def _only_interrupts(exc: BaseException) -> bool:
    inner = getattr(exc, "exceptions", None)
    if inner is None:
        return isinstance(exc, KeyboardInterrupt)
    return all(_only_interrupts(e) for e in inner)


