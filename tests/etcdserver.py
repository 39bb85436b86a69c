"""A real etcd for tests: one member on 127.0.0.1, free ports, a temporary data directory.

`running_etcd` starts it and waits until `etcdctl endpoint health` says so;
`EtcdServer.kill` and `start` stop it hard and start it again on the same
ports and data (as a crash and a restart would). `etcdctl` runs the real
command-line client against it, with the same TLS files and credentials the
test gives, so what a test checks with our client was done by etcd's own.
The member elects itself quickly (10 ms heartbeat, 100 ms election timeout),
so a start takes about a second.
"""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import trio

from tests.conftest import free_port
from tests.peers import need
from tests.tlscerts import Authority

# Starting (and electing itself) takes about a second; a loaded CI machine may take much longer.
START_TIMEOUT = 60.0


@dataclass(frozen=True)
class TlsFiles:
    ca: str
    cert: str
    key: str
    client_cert: str = ""
    client_key: str = ""
    no_cn_cert: str = ""  # a client certificate whose subject has no CommonName
    no_cn_key: str = ""


class EtcdServer:
    def __init__(self, directory: Path, tls: TlsFiles | None = None) -> None:
        self.directory = directory
        self.tls = tls
        self.client_port = free_port()
        self.peer_port = free_port()
        self.process: trio.Process | None = None
        self.log = directory / "etcd.log"
        self.user: tuple[str, str] | None = None  # what etcdctl logs in as, once auth is on

    @property
    def endpoint(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.client_port}"

    def command(self) -> list[str]:
        peer = f"http://127.0.0.1:{self.peer_port}"
        command = [need("etcd"), "--name", "test", "--data-dir", str(self.directory / "data"),
                   "--listen-client-urls", self.endpoint, "--advertise-client-urls", self.endpoint,
                   "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                   "--initial-cluster", f"test={peer}", "--heartbeat-interval", "10",
                   "--election-timeout", "100"]  # fmt: skip
        if self.tls:
            command += ["--cert-file", self.tls.cert, "--key-file", self.tls.key,
                        "--trusted-ca-file", self.tls.ca, "--client-cert-auth"]  # fmt: skip
        return command

    async def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = await trio.lowlevel.open_process(self.command(), stdout=log, stderr=log)
        with trio.fail_after(START_TIMEOUT):
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"etcd exited with {self.process.returncode}:\n{self.log.read_text()}")
                result = await self.etcdctl("endpoint", "health", "--dial-timeout", "1s", check=False)
                if result.returncode == 0:
                    return
                await trio.sleep(0.05)

    async def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            await self.process.wait()
            self.process = None

    def ctl_command(self, *args: str) -> list[str]:
        command = [need("etcdctl"), "--endpoints", self.endpoint]
        if self.tls:
            command += ["--cacert", self.tls.ca, "--cert", self.tls.client_cert, "--key", self.tls.client_key]
        if self.user:
            command += ["--user", f"{self.user[0]}:{self.user[1]}"]
        return [*command, *args]

    async def enable_auth(self) -> None:
        """Users root (needed to turn auth on) and `anubis` (password s3cret, allowed only under
        /anubis/), then auth on; etcdctl logs in as root from then on."""
        for args in (("user", "add", "root:rootpw"), ("user", "add", "anubis:s3cret"),
                     ("role", "add", "fleet"),
                     ("role", "grant-permission", "fleet", "--prefix=true", "readwrite", "/anubis/"),
                     ("user", "grant-role", "anubis", "fleet"), ("auth", "enable")):  # fmt: skip
            await self.etcdctl(*args)
        self.user = ("root", "rootpw")

    async def etcdctl(self, *args: str, check: bool = True, stdin: bytes = b""
                      ) -> subprocess.CompletedProcess[bytes]:  # fmt: skip
        """Run etcdctl against this member; its output (check: fail on a non-zero exit)."""
        result = await trio.run_process(self.ctl_command(*args), stdin=stdin, capture_stdout=True,
                                        capture_stderr=True, check=False)  # fmt: skip
        if check and result.returncode != 0:
            raise AssertionError(f"etcdctl {' '.join(args)} failed: {result.stderr.decode()}")
        return result


def tls_files(directory: Path) -> TlsFiles:
    """A CA, a server certificate for 127.0.0.1 and two client certificates in `directory`: one with
    the CommonName anubis, one whose subject has none (with auth on, etcd's HTTP gateway refuses a
    client certificate that has one)."""
    authority = Authority(directory)
    server = authority.issue("127.0.0.1", "localhost", file="server")
    client = authority.issue("anubis", file="client")
    no_cn = authority.issue("anubis", file="client-no-cn", common_name=False)
    return TlsFiles(authority.pair.cert, server.cert, server.key, client.cert, client.key,
                    no_cn.cert, no_cn.key)


@asynccontextmanager
async def running_etcd(directory: Path, tls: TlsFiles | None = None) -> AsyncIterator[EtcdServer]:
    server = EtcdServer(directory, tls)
    try:
        await server.start()
        yield server
    finally:
        with trio.CancelScope(shield=True):
            await server.kill()
