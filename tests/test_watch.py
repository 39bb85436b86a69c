"""--watch (watch.py) against the layout the kubelet gives ConfigMap and Secret volumes; real processes."""

from __future__ import annotations

import itertools
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.conftest import (
    EVENTUALLY,
    connect_when_listening,
    free_port,
    name_handler,
    process_logging_to,
    request,
    start_backend,
    wait_for_log,
)
from tests.helpers import ANUBIS
from trioanubis.config import Address, load_config
from trioanubis.watch import changed, files_read_by, signature, signatures

pytestmark = pytest.mark.skipif(not hasattr(os, "symlink"), reason="the kubelet's layout is symlinks")

_stamps = itertools.count()


class KubeletVolume:
    """A directory laid out as the kubelet's atomic writer lays out a ConfigMap or Secret volume:
    `KEY -> ..data/KEY`, `..data -> ..2026_12_04_10_00_00.NNNN`; an update writes a new timestamped
    directory, renames a new `..data` link over the old one and deletes the old directory."""

    def __init__(self, root: Path, files: dict[str, str]) -> None:
        self.root = root
        root.mkdir()
        self.update(files)

    def update(self, files: dict[str, str]) -> None:
        data = self.root / "..data"
        old = os.readlink(data) if data.is_symlink() else None
        stamp = f"..2026_12_04_10_00_{next(_stamps):02d}.{os.getpid()}"
        (self.root / stamp).mkdir()
        for key, text in files.items():
            (self.root / stamp / key).write_text(text)
            (self.root / stamp / key).chmod(0o644)
        os.symlink(stamp, self.root / "..data_tmp")
        os.rename(self.root / "..data_tmp", data)  # the atomic swap
        for key in files:
            if not (self.root / key).is_symlink():
                os.symlink(f"..data/{key}", self.root / key)
        if old is not None:
            shutil.rmtree(self.root / old)


def config_text(port: int, admin: int, server: str, token_file: Path, workers: int = 1) -> str:
    return "\n".join([
        "[settings]", f"workers = {workers}", "access_log = false",
        "[admin]", f'bind = "127.0.0.1:{admin}"', f'token_file = "{token_file}"',
        "[listeners.web]", f'bind = "127.0.0.1:{port}"', 'pool = "web"',
        "[pools.web]", f"servers = {json.dumps([server])}", "[pools.web.health]", 'check = "none"',
    ]) + "\n"  # fmt: skip


async def admin_get(port: int, path: str, token: str) -> tuple[int, Any]:
    async with await connect_when_listening(port) as stream:
        await stream.send_all(f"GET {path} HTTP/1.0\r\nAuthorization: Bearer {token}\r\n\r\n".encode())
        answer = b""
        while data := await stream.receive_some(65536):
            answer += data
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    return status, json.loads(body) if status == 200 else None


async def wait_for_status(port: int, token: str, status: int) -> Any:
    with trio.fail_after(EVENTUALLY):
        while True:
            got, doc = await admin_get(port, "/stats", token)
            if got == status:
                return doc
            await trio.sleep(0.05)


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
async def test_a_secret_rotated_and_a_config_map_updated_the_kubelet_way_are_reloaded(
    nursery: trio.Nursery, tmp_path: Path, workers: int
) -> None:
    one = await start_backend(nursery, name_handler("one"))
    two = await start_backend(nursery, name_handler("two"))
    port, admin = free_port(), free_port()
    secret = KubeletVolume(tmp_path / "anubis-admin", {"token": "first-token\n"})
    token_file = secret.root / "token"
    configs = KubeletVolume(tmp_path / "anubis", {"anubis.toml": config_text(port, admin, one.address,
                                                                             token_file, workers)})
    config = configs.root / "anubis.toml"
    log = tmp_path / "anubis.log"
    async with process_logging_to([*ANUBIS, "run", "--watch", "-c", str(config)], log):
        doc = await wait_for_status(admin, "first-token", 200)
        assert await request(Address("127.0.0.1", port)) == b"one"
        before = doc["reloads"]
        secret.update({"token": "second-token\n"})  # kubectl create secret … --dry-run | kubectl apply
        await wait_for_status(admin, "second-token", 200)
        assert (await admin_get(admin, "/stats", "first-token"))[0] == 401
        await wait_for_log(log, f"{token_file} changed")
        configs.update({"anubis.toml": config_text(port, admin, two.address, token_file, workers)})
        with trio.fail_after(EVENTUALLY):
            while await request(Address("127.0.0.1", port)) != b"two":
                await trio.sleep(0.05)
        doc = await wait_for_status(admin, "second-token", 200)
        assert doc["reloads"] == before + 2


def test_a_kubelet_swap_changes_the_signature_though_the_path_itself_does_not(tmp_path: Path) -> None:
    volume = KubeletVolume(tmp_path / "cm", {"anubis.toml": "x = 1\n"})
    path = str(volume.root / "anubis.toml")
    before, link = signature(path), os.lstat(path)
    volume.update({"anubis.toml": "x = 1\n"})  # the same bytes, a new file
    after = signature(path)
    assert os.lstat(path).st_ino == link.st_ino  # what the path itself is did not change
    assert before is not None and after is not None and before[0] != after[0]  # where it leads did
    assert changed({path: before}, {path: after}) == [path]
    assert changed({path: after}, {path: after}) == []
    assert changed({}, {path: after}) == []  # newly watched is not a change
    volume.update({"other": "y"})  # the key vanished from the volume
    assert changed({path: after}, signatures([path])) == [path]


def test_the_files_a_config_reads_are_watched(tmp_path: Path) -> None:
    from tests.tlscerts import Authority

    token = tmp_path / "token"
    token.write_text("t0ken\n")
    authority = Authority(tmp_path)
    leaf, client = authority.issue("localhost"), authority.issue("client")
    text = config_text(8000, 9900, "127.0.0.1:1", token)
    tls = f'tls = {{ cert = "{leaf.cert}", key = "{leaf.key}" }}'
    text = text.replace('pool = "web"', f'pool = "web"\n{tls}', 1)
    text += f'[pools.web.tls]\nca = "{authority.pair.cert}"\ncert = "{client.cert}"\nkey = "{client.key}"\n'
    (tmp_path / "anubis.toml").write_text(text)
    expected = {str(token), leaf.cert, leaf.key, authority.pair.cert, client.cert, client.key}
    assert set(files_read_by(load_config(tmp_path / "anubis.toml"))) == expected
