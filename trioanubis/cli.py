"""The `anubis` command: arguments → config → `trio.run`.

Every expected failure (a bad config, a port in use) is printed as one line
`anubis: …` on stderr (a JSON object under `log_format = "json"`) with exit
status 1; tracebacks are for bugs only.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import shlex
import signal
import socket
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import trio

from trioanubis import __version__, compiled
from trioanubis.app import Balancer, run_until_signalled, settle
from trioanubis.config import Address, Config, load_config, parse_address, port_range, proxy_config
from trioanubis.config.node import show_value
from trioanubis.errors import AnubisError, ConfigError
from trioanubis.hello import serve_hello
from trioanubis.ops import systemd
from trioanubis.ops.accesslog import configure_logging, log_fatal, logs_json
from trioanubis.ops.status import install_terminal_status, run_status
from trioanubis.ops.top import (
    DEFAULT_ADMIN,
    TOKEN_VARIABLE,
    Admin,
    admin_target,
    admin_url,
    read_token_file,
    run_top,
    url_of,
)
from trioanubis.proxy.io import IO_CHOICES, resolve_io
from trioanubis.strategies import STRATEGIES
from trioanubis.summary import describe, servers_up
from trioanubis.tls.context import fingerprint, self_signed
from trioanubis.upgrade import Predecessor, SocketBook, Upgrader, announce_ready, balancer_upgrader

if TYPE_CHECKING:
    from trioanubis.workers.supervisor import Supervisor

log = logging.getLogger("trioanubis")

DEFAULT_CONFIG = "anubis.toml"
# `anubis hello` is a development server: reachable from this machine only unless told otherwise.
HELLO_HOST = "127.0.0.1"


# Shown with every mistake in `anubis proxy`'s arguments.
PROXY_EXAMPLE = "Example: anubis proxy :8000 localhost:3000 localhost:3001"

# Each command's --help: a paragraph on what it does, then (after a blank line) examples.
HELP: Final = {
    "anubis": """\
Run `anubis COMMAND --help` for what a command does, with examples.

Examples:
  anubis demo                        three hello-world backends behind the balancer, with the dashboard
  anubis check lb.toml               validate a config file and summarise it
  anubis run lb.toml                 run the balancer from it
  anubis proxy :8000 localhost:3000 localhost:3001
  anubis completion bash > ~/.local/share/bash-completion/completions/anubis""",
    "run": """\
Run the balancer from a config file until SIGTERM or SIGINT, then stop accepting, let open
connections finish for settings.drain_timeout and exit 0. SIGHUP (or `anubis reload`) re-reads
the file; --watch does the same whenever the file changes. The config file is given with -c
or as the argument; without either, ./anubis.toml.

Examples:
  anubis run lb.toml
  anubis run -c /etc/anubis/anubis.toml --watch
  anubis run lb.toml --workers auto        one process per core, sharing the listeners""",
    "reload": """\
Validate the config file, then send SIGHUP to the running balancer whose process id
[settings] pid_file holds; the balancer logs whether the reload was applied. An invalid file
is reported here and nothing is signalled.

Examples:
  anubis reload lb.toml
  anubis reload -c /etc/anubis/anubis.toml""",
    "upgrade": """\
Validate the config file, then send SIGUSR2 to the running balancer whose process id
[settings] pid_file holds. That process starts the anubis now on disk with its listening
sockets handed over, waits until the new one serves, then stops accepting, drains and exits:
no client is refused in between. If the new process fails to start, the old one keeps serving
and logs why. Returns once the signal is sent, as `anubis reload` does.

Examples:
  anubis upgrade lb.toml                   after `pip install -U trioanubis`
  anubis upgrade -c /etc/anubis/anubis.toml""",
    "check": """\
Validate a config file and print a one-screen summary of it (settings, admin, listeners,
pools, servers) and the readiness backend this machine would use; exit 1 with one line
naming the key and the value at the first error. Like `nginx -t` or `haproxy -c`.

Examples:
  anubis check lb.toml
  anubis check -c /etc/anubis/anubis.toml && systemctl reload anubis""",
    "fleet": """\
List the instances registered in the fleet's etcd ([cluster] in the config: endpoints, prefix,
credentials) with their version, process and admin address, then every server that some
instances see up and others down: the first thing to look at in an incident. It reads etcd
directly, so it works while the local instance is down; exit 1 with one line if etcd does not
answer. --json prints what GET /fleet answers on any instance's admin.

Examples:
  anubis fleet lb.toml
  anubis fleet -c /etc/anubis/anubis.toml --json | jq .disagreements""",
    "proxy": """\
Balance LISTEN over the SERVERs without a config file: round robin, TCP health checks, clients
held up to --queue-timeout while no server is up, and a live status line on a terminal. With
--spawn it runs the servers itself, restarts them when they exit, and replaces them one at a
time when a --watch path changes.

Examples:
  anubis proxy :8000 localhost:3000 localhost:3001
  anubis proxy :8000 --spawn "uvicorn app:app --port {port}" --replicas 3 --watch src
  anubis proxy :8443 localhost:3000 --tls      clients speak TLS (a self-signed certificate)""",
    "demo": """\
Start a hello-world HTTP backend on each server address the config names, then the balancer
in front of them, with the admin endpoint on 127.0.0.1:9900: it prints a curl command, the
dashboard's URL and the `anubis top` command to try. Without a config, ./anubis.toml if it
exists, else the reference anubis.toml shipped in the package.

Examples:
  anubis demo
  anubis demo my-demo.toml""",
    "top": """\
Watch the admin endpoint live in a terminal: servers, their state, connections, rates; up/down
(or k/j) select a server, d drains it, e enables it, q quits. Piped, it prints one snapshot.
The endpoint comes from the config's [admin] table (./anubis.toml by default) or --admin. The
token is read, in this order, from --token-file, $ANUBIS_TOKEN, the config's [admin] token or
token_file; --token works too (and comes first), but puts the token where `ps` shows every user.

Examples:
  anubis top lb.toml
  ANUBIS_TOKEN=$(cat /run/secrets/anubis) anubis top --admin http://10.0.0.5:9900
  anubis top --admin 127.0.0.1:9900 --token-file ~/.config/anubis/token""",
    "hello": """\
Run one hello-world HTTP backend: every path answers `hello from NAME`, and /health answers
`up`. It listens on 127.0.0.1 unless --host says otherwise, and stops on SIGTERM or SIGINT.

Examples:
  anubis hello --name web1 --port 9001
  anubis hello --name web2 --port 9002 --host 0.0.0.0""",
    "toxiproxy": """\
Serve Toxiproxy's HTTP API (2.x: proxies, toxics, populate, reset, version) so that toxiproxy's
clients and Testcontainers' ToxiproxyContainer users can switch without changing their tests: each
proxy is a listener and a one-server pool, and its toxics (latency, bandwidth, slow_close, timeout,
reset_peer, slicer, limit_data) act on the connections already open. It listens on 127.0.0.1:8474
(toxiproxy's port) unless told otherwise, and stops on SIGTERM or SIGINT.

Examples:
  anubis toxiproxy
  anubis toxiproxy --port 8475 --seed 7          jitter and toxicity draws replay with the same seed
  curl 127.0.0.1:8474/proxies -d '{"name": "db", "listen": "127.0.0.1:26379", "upstream": "127.0.0.1:6379"}'
  curl 127.0.0.1:8474/proxies/db/toxics -d '{"type": "latency", "attributes": {"latency": 100}}'""",
    "completion": """\
Print a completion script for the shell (commands, options, config files), generated by shtab
from these very arguments: static, so pressing Tab runs nothing of anubis. Needs the optional
extra: pip install 'trioanubis[completion]'.

Examples:
  anubis completion bash > ~/.local/share/bash-completion/completions/anubis
  anubis completion zsh > "${fpath[1]}/_anubis"
  eval "$(anubis completion bash)"             this shell only""",
}


def version_line() -> str:
    """`anubis --version`: the version, and whether the data path runs compiled (setup.py)."""
    return f"anubis {__version__} ({'compiled' if compiled() else 'pure Python'})"


def _global_options(log_level: str) -> argparse.ArgumentParser:
    """Options that work on either side of the command (`anubis --log-level debug run` and
    `anubis run --log-level debug`). The copy given to the commands has SUPPRESS as its default, so
    a command line that sets them only before the command keeps that value."""
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("--version", action="version", version=version_line())
    options.add_argument("--log-level", default=log_level,
                         choices=["debug", "info", "warning", "error"],
                         help="how much to log on stderr (default: info)")  # fmt: skip
    return options


def _add_io(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--io", choices=IO_CHOICES, default="",
                        help="readiness backend: epoll (Linux fast path) or portable; "
                             "default: [settings] io, else auto")  # fmt: skip


RAW: Final = argparse.RawDescriptionHelpFormatter  # descriptions and examples keep their lines
# What shtab completes a config file argument with (its own FILE, spelt out so that parsing
# never imports shtab: completion is an optional extra).
FILE_COMPLETION: Final = {"bash": "_shtab_compgen_files", "zsh": "_files", "tcsh": "f"}
COMPLETION_SHELLS: Final = ("bash", "zsh", "tcsh")
SHTAB_MISSING: Final = "anubis completion needs the 'shtab' package: pip install 'trioanubis[completion]'"


def _add_config(parser: argparse.ArgumentParser, help: str, group: Any = None) -> None:
    """`-c FILE` and a positional CONFIG: either names the config file (both: the same one).
    Both default to None; `parse_arguments` settles which file is meant."""
    option: argparse.Action = (group or parser).add_argument("-c", "--config", metavar="FILE", help=help)
    positional = parser.add_argument("config_file", nargs="?", metavar="CONFIG",
                                     help="the config file, as -c (give one or the other)")  # fmt: skip
    for action in (option, positional):
        action.complete = FILE_COMPLETION  # type: ignore[attr-defined]  # read by shtab


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="anubis", description="A TCP load balancer on Trio.",
                                     epilog=HELP["anubis"], formatter_class=RAW,
                                     parents=[_global_options("info")])  # fmt: skip
    options = _global_options(argparse.SUPPRESS)  # argparse shares a parent's actions: a copy of its own
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        description, _, epilog = HELP.get(name, "").partition("\n\n")
        sub = commands.add_parser(name, help=help, description=description, epilog=epilog,
                                  formatter_class=RAW, parents=[options])  # fmt: skip
        sub.set_defaults(usage_error=sub.error)  # parse_arguments's errors show this command's usage
        return sub

    run = command("run", "run the balancer from a config file")
    _add_config(run, "the config file (default: ./anubis.toml)")
    run.add_argument("--watch", action="store_true",
                     help="reload when the config file changes (polls its modification time)")
    _add_io(run)
    run.add_argument("--workers", type=_workers_argument, default=None, metavar="N",
                     help='worker processes: a number or "auto" (default: [settings] workers)')

    reload = command("reload", "make the running balancer re-read its config")
    _add_config(reload, "the config whose [settings] pid_file names the process (default: ./anubis.toml)")

    upgrade = command("upgrade", "replace the running balancer by the anubis now on disk, "
                      "handing its sockets over (no connection refused)")
    _add_config(upgrade, "the config whose [settings] pid_file names the process (default: ./anubis.toml)")

    check = command("check", "validate a config file and summarise it")
    _add_config(check, "the config file (default: ./anubis.toml)")

    fleet = command("fleet", "list the fleet's instances (read from etcd) and where their views of the "
                    "servers disagree")  # fmt: skip
    _add_config(fleet, "the config whose [cluster] names the etcd (default: ./anubis.toml)")
    fleet.add_argument("--json", action="store_true", help="print what GET /fleet answers")

    proxy = command("proxy", "balance LISTEN over SERVERs, no config file")
    proxy.add_argument("listen", metavar="LISTEN",
                       help='where to listen: ":8000" (every interface) or "127.0.0.1:8000"')  # fmt: skip
    proxy.add_argument("servers", nargs="*", metavar="SERVER", help='a backend, "host:port"')
    proxy.add_argument("--strategy", default="round_robin", metavar="NAME",
                       help=f"one of {', '.join(STRATEGIES)} (default: round_robin)")  # fmt: skip
    _add_io(proxy)
    proxy.add_argument("--queue-timeout", default="10s",
                       help="hold a client this long while no server is up (default: 10s; 0: close it)")
    proxy.add_argument("--spawn", metavar="COMMAND",
                       help='run the servers: a command line with {port}, e.g. '
                            '"python -m http.server {port}"')  # fmt: skip
    proxy.add_argument("--replicas", type=int, default=1, help="how many --spawn replicas (default: 1)")
    proxy.add_argument("--ports", metavar="FIRST-LAST",
                       help="the --spawn replicas' ports, from this range (e.g. 4000-4099; default: "
                            "free ports the system picks)")  # fmt: skip
    proxy.add_argument("--watch", nargs="+", metavar="PATH", default=[],
                       help="files, directories or glob patterns: a change restarts the replicas, one "
                            "at a time")  # fmt: skip
    proxy.add_argument("--tls", action="store_true",
                       help="clients speak TLS (a self-signed localhost certificate, made once and kept "
                            "in $XDG_CACHE_HOME/trioanubis); servers get plaintext")  # fmt: skip

    demo = command("demo", "run hello-world backends behind the demo config")
    _add_config(demo, "the config file (default: ./anubis.toml, else the copy in the package)")
    _add_io(demo)

    top = command("top", "watch the admin endpoint live in a terminal (needs rich)")
    target = top.add_mutually_exclusive_group()
    _add_config(top, "take the admin address and token from this config (default: "
                f"./{DEFAULT_CONFIG} if it exists, else --admin {DEFAULT_ADMIN})", target)  # fmt: skip
    target.add_argument("--admin", help=f"the admin endpoint's URL, e.g. {DEFAULT_ADMIN}")
    secret = top.add_mutually_exclusive_group()
    secret.add_argument("--token-file", metavar="FILE",
                        help="read the admin token from this file (default: $ANUBIS_TOKEN, else the "
                             "config's [admin] token or token_file)")  # fmt: skip
    secret.add_argument("--token", help="the admin token on the command line, where other users of "
                        "this machine can read it (ps); prefer $ANUBIS_TOKEN or --token-file")  # fmt: skip

    hello = command("hello", "run one hello-world HTTP backend")
    hello.add_argument("--name", default="hello")
    hello.add_argument("--port", type=int, default=8080)
    hello.add_argument("--host", default=HELLO_HOST,
                       help=f"default: {HELLO_HOST}, this machine only (0.0.0.0: all)")  # fmt: skip

    toxiproxy = command("toxiproxy", "serve Toxiproxy's HTTP API, for its clients unchanged")
    toxiproxy.add_argument("--host", default="127.0.0.1",
                           help="where the API listens (default: 127.0.0.1, this machine only)")
    toxiproxy.add_argument("--port", type=int, default=8474, help="the API's port (default: 8474)")
    toxiproxy.add_argument("--seed", type=int, default=None,
                           help="seed the random draws (jitter, toxicity, slicer) so a run replays")
    _add_io(toxiproxy)

    completion = command("completion", "print a shell completion script (needs shtab)")
    completion.add_argument("shell", choices=COMPLETION_SHELLS, help="the shell the script is for")
    return parser


def parse_arguments(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line, with the config file settled: `anubis run lb.toml` is `anubis run -c
    lb.toml`; both at once must name the same file; `top` takes a config or --admin, not both."""
    args = build_parser().parse_args(argv)
    if not hasattr(args, "config_file"):
        return args
    given, option = args.config_file, args.config
    if given is not None and option is not None and given != option:
        args.usage_error(f"the config file is given twice: CONFIG {given!r} and -c {option!r}; give one")
    if given is not None and getattr(args, "admin", None) is not None:
        args.usage_error(f"CONFIG {given!r} and --admin {args.admin!r}: give one (each names the admin)")
    args.config = option or given
    if args.command != "top":  # top without a config: ./anubis.toml only if it exists
        args.config = args.config or DEFAULT_CONFIG
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_arguments(argv)
    configure_logging(args.log_level)
    try:
        if args.command == "check":
            config = load_config(args.config)
            print(f"{args.config}: ok")
            print(describe(config))
            print(f"io: {resolve_io(config.settings.io)}")
            sys.stdout.flush()  # a closed pipe (`anubis check | head -1`) is seen here, not at exit
            return 0
        if args.command == "fleet":
            from trioanubis.fleet.report import run_fleet

            return run_fleet(load_config(args.config), args.json)
        if args.command == "reload":
            return _signal_reload(args.config)
        if args.command == "upgrade":
            return _signal_upgrade(args.config)
        if args.command == "top":
            return run_top(_top_admin(args))
        if args.command == "completion":
            return _print_completion(args.shell)
        if args.command == "hello":
            trio.run(_run_hello, args.name, Address(args.host, args.port))
            return 0
        if args.command == "toxiproxy":
            trio.run(_run_toxiproxy, args.host, args.port, args.io or "auto", args.seed)
            return 0
        serving = _claim_environment()  # before anything could start a child that inherits it
        if args.command == "proxy":
            config = _proxy_config(args)
        else:
            config = load_config(_demo_config_path(args.config) if args.command == "demo"
                                 else args.config)  # fmt: skip
        configure_logging(args.log_level, config.settings.log_format)
        if args.command == "run" and _workers(args, config) > 1:
            return _run_workers(args, _workers(args, config), serving)
        book = SocketBook(serving.sockets, config)
        balancer = Balancer(
            config,
            config_path=None if args.command == "proxy" else str(config.source),
            watch=args.command == "run" and args.watch,  # (proxy --watch rolls replicas instead)
            io=args.io,
            open_socket=book.open_listener,
            open_admin=book.open_admin,
        )
        upgrader = balancer_upgrader(balancer, book) if args.command == "run" else None
        trio.run(_serve, balancer, args.command == "demo", args.command == "proxy", upgrader,
                 serving.predecessor)  # fmt: skip
    except ConfigError as exc:
        log_fatal(str(exc))
        return 1
    except BrokenPipeError:
        # Whoever read our output stopped reading (`| head`): quietly, as other tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # what a shell reports for SIGPIPE
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


async def _run_toxiproxy(host: str, port: int, io: str, seed: int | None) -> None:
    from trioanubis.testing.toxiproxy import serve_toxiproxy  # its toxics join the data path only here

    async with trio.open_nursery() as nursery:
        bound = await nursery.start(functools.partial(serve_toxiproxy, host, port, io=io, seed=seed))
        log.info("toxiproxy: API on http://%s (toxiproxy %s)", bound, "2.x")


def _proxy_config(args: argparse.Namespace) -> Config:
    """The config `anubis proxy` stands for. A bad argument is named as the user wrote it (LISTEN,
    SERVER), with an example, rather than by a config key they never wrote; the command line of
    --spawn is split like a shell's."""
    _check_argument("LISTEN", args.listen, listen=True)
    for server in args.servers:
        _check_argument("SERVER", server, listen=False)
    spawn = None
    if args.spawn is not None:
        try:
            spawn = shlex.split(args.spawn)
        except ValueError as exc:
            raise ConfigError(f"anubis proxy: --spawn: {exc}: {args.spawn!r}") from None
    elif not args.servers:
        raise ConfigError(f"anubis proxy: give at least one SERVER, or --spawn COMMAND. {PROXY_EXAMPLE}")
    if args.ports is not None and spawn is not None:
        _check_ports(args.ports, args.replicas)
    queue_timeout: str | float = args.queue_timeout
    with contextlib.suppress(ValueError):
        queue_timeout = float(queue_timeout)  # "0" or "2.5": seconds, as in a config file
    return proxy_config(args.listen, args.servers, args.strategy, queue_timeout=queue_timeout,
                        spawn=spawn, replicas=args.replicas, watch=args.watch, ports=args.ports,
                        tls=_dev_certificate(args.tls))  # fmt: skip


def _check_ports(value: str, replicas: int) -> None:
    try:
        port_range(value, replicas, f"--replicas {replicas}")
    except ValueError as exc:
        raise ConfigError(f"anubis proxy: --ports {show_value(value)}: {exc}") from None


def _check_argument(name: str, value: str, *, listen: bool) -> None:
    try:
        parse_address(value, allow_any_host=listen)
    except ValueError as exc:
        hint = f' Did you mean ":{value}" (every interface)?' if listen and value.isdigit() else ""
        raise ConfigError(f"{name} {show_value(value)}: {exc}.{hint} {PROXY_EXAMPLE}") from None


def _top_admin(args: argparse.Namespace) -> Admin:
    """Where `anubis top` looks (--admin, else the config's [admin] table) and with which token:
    --token, else --token-file, else $ANUBIS_TOKEN, else the config's."""
    url, token = args.admin, ""
    if url is None and (args.config is not None or Path(DEFAULT_CONFIG).exists()):
        url, token = admin_target(load_config(args.config or DEFAULT_CONFIG))
    if args.token is not None:
        token = args.token
    elif args.token_file is not None:
        token = read_token_file(args.token_file)
    elif os.environ.get(TOKEN_VARIABLE):
        token = os.environ[TOKEN_VARIABLE].strip()
    return Admin(admin_url(url or DEFAULT_ADMIN), token)


def _print_completion(shell: str) -> int:
    """`anubis completion SHELL`: shtab's static script for this parser."""
    try:
        import shtab
    except ImportError:
        print(f"anubis: {SHTAB_MISSING}", file=sys.stderr)
        return 1
    print(shtab.complete(build_parser(), shell=shell), end="")
    return 0


def _workers_argument(text: str) -> int:
    """`--workers`: a count ≥ 1, or "auto" (0)."""
    if text == "auto":
        return 0
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f'must be "auto" or a number ≥ 1, got {text!r}')
    return int(text)


def _workers(args: argparse.Namespace, config: Config) -> int:
    from trioanubis.workers.supervisor import worker_count  # only where workers are asked for

    setting = config.settings.workers if args.workers is None else args.workers
    return 1 if setting == 1 else worker_count(setting)


def _run_workers(args: argparse.Namespace, count: int, serving: Serving) -> int:
    """`workers` > 1: this process becomes the supervisor of `count` worker processes."""
    from trioanubis.workers.supervisor import Supervisor, read_config

    text, config = read_config(args.config)
    supervisor = Supervisor(config, text, count=count, log_level=args.log_level, watch=args.watch,
                            inherited=serving.sockets)  # fmt: skip
    log.info("starting anubis %s with %s, %d workers\n%s", __version__, config.source, count,
             describe(config))  # fmt: skip
    trio.run(_supervise, supervisor, serving.predecessor)
    log.info("stopped")
    return 0


async def _supervise(supervisor: Supervisor, predecessor: Predecessor | None) -> None:
    from trioanubis.workers.supervisor import run_supervised

    async with trio.open_nursery() as nursery:
        await nursery.start(run_supervised, supervisor)
        announce_ready(predecessor, f"serving with {len(supervisor.slots)} workers")


@dataclass(frozen=True, slots=True)
class Serving:
    """What a serving command took from its environment at start (ops/systemd.py, upgrade.py)."""

    sockets: list[tuple[str, socket.socket]]  # passed by systemd or by the process we replace
    predecessor: Predecessor | None  # the process we replace, told once we serve


def _claim_environment() -> Serving:
    return Serving(systemd.claim_environment(), Predecessor.claim())


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


def _signal_upgrade(config_path: str) -> int:
    """`anubis upgrade`: validate the file (the new process reads it), then SIGUSR2 the pid_file's process."""
    config = load_config(config_path)
    if not hasattr(signal, "SIGUSR2"):
        print("anubis: this platform has no SIGUSR2, so no upgrade in place; restart instead",
              file=sys.stderr)  # fmt: skip
        return 1
    return _signal_pid_file(config_path, config, signal.SIGUSR2,
                            "it logs whether the new process took over (the pid file then names it)")


def _signal_reload(config_path: str) -> int:
    """`anubis reload`: validate the file, then SIGHUP the process its pid_file names."""
    config = load_config(config_path)
    if not hasattr(signal, "SIGHUP"):
        print("anubis: this platform has no SIGHUP; run the balancer with --watch to reload",
              file=sys.stderr)  # fmt: skip
        return 1
    return _signal_pid_file(config_path, config, signal.SIGHUP, "it logs whether the reload was applied")


def _signal_pid_file(config_path: str, config: Config, signum: signal.Signals, outcome: str) -> int:
    """Send `signum` to the anubis process `config`'s pid_file names."""
    pid_file = config.settings.pid_file
    if not pid_file:
        raise ConfigError(f"{config_path}: settings.pid_file is not set, so the running "
                          f"process cannot be found; set it or send {signum.name} yourself")  # fmt: skip
    try:
        pid = int(Path(pid_file).read_text().strip())
        if not _is_anubis(pid):
            print(f"anubis: process {pid} in {pid_file} is not anubis (a stale pid file?); "
                  "nothing was signalled", file=sys.stderr)  # fmt: skip
            return 1
        os.kill(pid, signum)
    except (OSError, ValueError) as exc:
        print(f"anubis: cannot signal the process in {pid_file}: {exc}", file=sys.stderr)
        return 1
    print(f"sent {signum.name} to process {pid}; {outcome}")
    return 0


def _is_anubis(pid: int) -> bool:
    """Whether `pid` runs anubis, where /proc says (a pid file outlives a killed process, and its
    number may be another program's by now); True where there is no /proc to ask."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        if not Path("/proc/self").exists():
            return True  # no /proc here: trust the pid file
        raise ProcessLookupError(f"no process {pid}") from None
    return b"anubis" in command


async def _serve(balancer: Balancer, demo: bool, status: bool = False, upgrader: Upgrader | None = None,
                 predecessor: Predecessor | None = None) -> None:  # fmt: skip
    """Run `balancer` until it stops. The config's summary is logged once, at start (before
    anything can fail); "ready" then says only what start-up learnt: which servers are up."""
    config = balancer.config
    log.info("starting anubis %s with %s (io: %s)\n%s", __version__, config.source,
             balancer.poller.caps.name, describe(config))  # fmt: skip
    upgrade = None if upgrader is None else upgrader.upgrade
    async with trio.open_nursery() as nursery:
        if demo:
            await _start_demo_backends(nursery, config)
        bound: Mapping[str, Address] = await nursery.start(
            lambda task_status: run_until_signalled(balancer, upgrade=upgrade, task_status=task_status)
        )
        if demo:
            _print_demo_help(bound, balancer.admin_address, config)
        settle()
        log.info("ready\n%s", servers_up(balancer.pools))  # "ready" alone on its line, as before
        announce_ready(predecessor, "serving on " + ", ".join(f"{n} {a}" for n, a in bound.items()))
        if status:  # anubis proxy: a live line on a terminal, plain lines elsewhere
            nursery.start_soon(run_status, balancer, install_terminal_status())
        await balancer.stopped.wait()
        nursery.cancel_scope.cancel()
    log.info("stopped")


async def _start_demo_backends(nursery: trio.Nursery, config: Config) -> None:
    for pool in config.pools.values():
        for server in pool.servers:
            await nursery.start(serve_hello, server.name, server.address)


def _print_demo_help(bound: Mapping[str, Address], admin: Address | None, config: Config) -> None:
    """What to try: curl each listener; the dashboard and `anubis top`, when there is an admin."""
    for name, address in bound.items():
        host = "localhost" if address.host in ("0.0.0.0", "::", "") else address.host
        print(f"demo listener {name} is up: try  curl http://{host}:{address.port}/  "
              f"(a few times: the answer rotates), Ctrl-C to stop", flush=True)  # fmt: skip
    if admin is None:
        return
    url = url_of(admin)
    print(f"dashboard: {url}/  (in a browser)\nin a terminal:  {_top_command(url, config)}", flush=True)


def _top_command(url: str, config: Config) -> str:
    """The `anubis top` command line that finds this balancer's admin endpoint (and its token)."""
    source, token = Path(config.source), config.admin is not None and config.admin.token
    if source.resolve() == Path(DEFAULT_CONFIG).resolve():
        return "anubis top"  # it reads ./anubis.toml: the address and the token
    if token:
        return f"anubis top {shlex.quote(str(source))}"
    if url == DEFAULT_ADMIN and not Path(DEFAULT_CONFIG).exists():
        return "anubis top"  # it looks there by default
    return f"anubis top --admin {url}"


async def _run_hello(name: str, bind: Address) -> None:
    """`anubis hello` until SIGTERM or SIGINT, then exit 0 (as `docker stop` expects)."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_hello, name, bind)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


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


