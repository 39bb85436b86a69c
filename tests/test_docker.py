"""docker/: Docker cannot run here, so check what can be checked and run what the image runs."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
import yaml

from tests.conftest import free_port
from tests.test_cli import http_get
from tests.test_operations import wait_port
from trioanubis.config import load_config, parse_config_text

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"


def dockerfile_instruction(name: str) -> list[str]:
    for line in (DOCKER / "Dockerfile").read_text().splitlines():
        if line.startswith(f"{name} "):
            return list(json.loads(line[len(name) + 1 :]))
    raise AssertionError(f"no {name} in the Dockerfile")


def compose() -> dict[str, Any]:
    return dict(yaml.safe_load((DOCKER / "docker-compose.yml").read_text()))


def test_dockerfile_copies_files_that_exist_and_runs_as_non_root() -> None:
    text = (DOCKER / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.\d+-slim$", text, re.MULTILINE)
    for line in text.splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), source
    assert re.search(r"^USER anubis$", text, re.MULTILINE)
    assert dockerfile_instruction("ENTRYPOINT") == ["anubis"]
    assert dockerfile_instruction("CMD") == ["run", "-c", "/etc/anubis/anubis.toml"]
    exposed = {int(p) for p in re.search(r"^EXPOSE (.+)$", text, re.MULTILINE).group(1).split()}  # type: ignore[union-attr]
    config = load_config(DOCKER / "anubis.compose.toml")
    assert config.admin is not None
    assert exposed == {config.listeners["web"].bind.port, config.admin.bind.port}
    assert "9900/healthz" in text


def test_compose_file_agrees_with_its_config() -> None:
    services = compose()["services"]
    assert set(services) == {"web1", "web2", "web3", "anubis"}
    build = services["web1"]["build"]
    assert (DOCKER / build["context"] / build["dockerfile"]).exists()
    config = load_config(DOCKER / "anubis.compose.toml")
    servers = {s.name: s.address for s in config.pools["web"].servers}
    for name in ("web1", "web2", "web3"):
        command = services[name]["command"]
        assert command[:3] == ["hello", "--name", name]
        assert servers[name].host == name and servers[name].port == int(command[command.index("--port") + 1])
        assert command[command.index("--host") + 1] == "0.0.0.0"  # reached from the anubis container
    published = {int(p.split(":")[-1]) for p in services["anubis"]["ports"]}
    assert config.admin is not None
    assert published == {config.listeners["web"].bind.port, config.admin.bind.port}
    for volume in services["anubis"]["volumes"]:
        source, target = volume.split(":")[:2]
        assert (DOCKER / source).exists()
        assert target == dockerfile_instruction("CMD")[2]


def test_compose_and_k8s_configs_pass_anubis_check(tmp_path: Path) -> None:
    documents = list(yaml.safe_load_all((DOCKER / "k8s-sidecar.yaml").read_text()))
    config_map = next(d for d in documents if d["kind"] == "ConfigMap")
    k8s_config, token = tmp_path / "k8s.toml", tmp_path / "token"
    token.write_text("from-the-secret\n")  # what the Secret volume holds in the pod
    k8s_config.write_text(config_map["data"]["anubis.toml"].replace("/etc/anubis-admin/token", str(token)))
    for path in (DOCKER / "anubis.compose.toml", k8s_config):
        result = subprocess.run([sys.executable, "-m", "trioanubis", "check", "-c", str(path)],
                                capture_output=True, text=True, timeout=60)  # fmt: skip
        assert result.returncode == 0, result.stderr


def test_k8s_manifest_probes_and_ports_agree_with_the_config() -> None:
    documents = list(yaml.safe_load_all((DOCKER / "k8s-sidecar.yaml").read_text()))
    kinds = {d["kind"] for d in documents}
    assert kinds == {"ConfigMap", "Service", "Pod"}
    text = next(d for d in documents if d["kind"] == "ConfigMap")["data"]["anubis.toml"]
    assert re.search(r"^token_file = \"/etc/anubis-admin/token\"", text, re.MULTILINE)
    config = parse_config_text(re.sub(r"^token_file = .*$", "", text, flags=re.MULTILINE))
    service = next(d for d in documents if d["kind"] == "Service")
    assert service["spec"]["clusterIP"] == "None"  # headless: one A record per pod
    discovery = config.pools["api"].discovery[0]
    assert discovery.name == f"{service['metadata']['name']}.default.svc.cluster.local"
    assert discovery.port == service["spec"]["ports"][0]["port"]
    pod = next(d for d in documents if d["kind"] == "Pod")
    sidecar = next(c for c in pod["spec"]["containers"] if c["name"] == "anubis")
    assert config.admin is not None
    assert sidecar["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": config.admin.bind.port}
    assert sidecar["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": config.admin.bind.port}
    assert sidecar["resources"]["requests"]["memory"]
    mount = sidecar["volumeMounts"][0]["mountPath"]
    assert sidecar["args"] == ["run", "-c", f"{mount}/anubis.toml"]
    secret_volume = next(v for v in pod["spec"]["volumes"] if "secret" in v)  # the admin token
    secret_mount = next(m for m in sidecar["volumeMounts"] if m["name"] == secret_volume["name"])
    assert secret_mount["mountPath"] == "/etc/anubis-admin" and "subPath" not in secret_mount


async def test_the_image_command_runs_as_pid_1_and_drains_on_sigterm(tmp_path: Path) -> None:
    """The exact ENTRYPOINT + CMD, with the compose config pointed at loopback, as PID 1."""
    if not shutil.which("unshare") or subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True
    ).returncode:
        pytest.skip("cannot make a PID namespace here (unshare needs root), so no PID 1 to test")
    listen, admin = free_port(), free_port()
    text = (DOCKER / "anubis.compose.toml").read_text()
    text = text.replace('bind = ":8000"', f'bind = "127.0.0.1:{listen}"')
    text = text.replace('bind = "0.0.0.0:9900"', f'bind = "127.0.0.1:{admin}"')
    hello_ports = {}
    for name in ("web1", "web2", "web3"):
        hello_ports[name] = free_port()
        text = text.replace(f'"{name}:80"', f'"127.0.0.1:{hello_ports[name]}"')
    config = tmp_path / "anubis.toml"
    config.write_text(text)
    anubis = str(Path(sys.executable).with_name("anubis"))
    command = [anubis, *dockerfile_instruction("CMD")]
    command[command.index("/etc/anubis/anubis.toml")] = str(config)
    async with trio.open_nursery() as nursery:
        for name, port in hello_ports.items():  # the compose backends' command
            nursery.start_soon(trio.run_process, [anubis, "hello", "--name", name, "--port", str(port)])
        for port in hello_ports.values():
            await wait_port(port)
        process = await trio.lowlevel.open_process(
            ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc", "sh", "-c",
             'echo "pid $$"; exec "$@"', "pid1", *command],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        assert process.stdout is not None
        assert (await process.stdout.receive_some()).startswith(b"pid 1")
        bodies = {(await http_get(listen)).split(b"\r\n\r\n", 1)[1] for _ in range(3)}
        assert bodies == {b"hello from web1\n", b"hello from web2\n", b"hello from web3\n"}
        assert (await http_get(admin, "/healthz")).startswith(b"HTTP/1.1 200")
        anubis_pid = int(subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True,
                                        text=True).stdout.split()[0])  # fmt: skip
        subprocess.run(["kill", "-TERM", str(anubis_pid)], check=True)  # what `docker stop` sends PID 1
        with trio.fail_after(30):
            await process.wait()
        assert process.returncode == 0
        nursery.cancel_scope.cancel()


