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
from tests.helpers import http_get, wait_port
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


def manifests() -> dict[str, list[dict[str, Any]]]:
    """Every Kubernetes manifest in docker/: file name → its documents."""
    return {path.name: [d for d in yaml.safe_load_all(path.read_text()) if d]
            for path in sorted(DOCKER.glob("k8s-*.yaml"))}  # fmt: skip


def pods() -> list[tuple[str, dict[str, Any]]]:
    return [(name, d) for name, docs in manifests().items() for d in docs if d["kind"] == "Pod"]


def containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod["spec"].get("initContainers", []), *pod["spec"]["containers"]]


def sidecar(pod: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in containers(pod) if c["name"] == "anubis")


def config_map_of(documents: list[dict[str, Any]], pod: dict[str, Any]) -> str:
    """The anubis.toml of the ConfigMap the pod mounts at the sidecar's config directory."""
    volume = next(v for v in pod["spec"]["volumes"] if "configMap" in v)
    config_map = next(d for d in documents if d["kind"] == "ConfigMap"
                      and d["metadata"]["name"] == volume["configMap"]["name"])  # fmt: skip
    return str(config_map["data"]["anubis.toml"])


def dockerfile_user() -> tuple[int, int]:
    match = re.search(r"^USER (\S+)$", (DOCKER / "Dockerfile").read_text(), re.MULTILINE)
    assert match is not None
    uid, _, gid = match.group(1).partition(":")
    assert uid.isdigit() and gid.isdigit(), f"USER {match.group(1)}: Kubernetes needs numbers"
    return int(uid), int(gid)


def test_dockerfile_copies_files_that_exist_and_runs_as_non_root() -> None:
    text = (DOCKER / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.\d+-slim$", text, re.MULTILINE)
    for line in text.splitlines():
        if line.startswith("COPY ") and not line.startswith("COPY --from="):  # from a build stage
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), source
    uid, gid = dockerfile_user()  # a name fails runAsNonRoot: "image has non-numeric user"
    assert uid != 0 and f"--uid {uid} --gid {gid}" in text and f"--gid {gid} anubis" in text
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


@pytest.mark.slow
def test_compose_and_k8s_configs_pass_anubis_check(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("from-the-secret\n")  # what the Secret volume holds in the pod
    paths = [DOCKER / "anubis.compose.toml"]
    for name, documents in manifests().items():
        for document in (d for d in documents if d["kind"] == "ConfigMap"):
            paths.append(tmp_path / f"{name}-{document['metadata']['name']}.toml")
            text = document["data"]["anubis.toml"]
            paths[-1].write_text(text.replace("/etc/anubis-admin/token", str(token)))
    assert len(paths) == 3
    for path in paths:
        result = subprocess.run([sys.executable, "-m", "trioanubis", "check", "-c", str(path)],
                                capture_output=True, text=True, timeout=60)  # fmt: skip
        assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_k8s_manifest_probes_and_ports_agree_with_the_config() -> None:
    documents = manifests()["k8s-sidecar.yaml"]
    assert {d["kind"] for d in documents} == {"ConfigMap", "Service", "Pod"}
    service = next(d for d in documents if d["kind"] == "Service")
    assert service["spec"]["clusterIP"] == "None"  # headless: one A record per pod
    for name, pod in pods():
        documents = manifests()[name]
        text = config_map_of(documents, pod)
        assert re.search(r"^token_file = \"/etc/anubis-admin/token\"", text, re.MULTILINE)
        config = parse_config_text(re.sub(r"^token_file = .*$", "", text, flags=re.MULTILINE))
        discovery = config.pools["api"].discovery[0]
        assert discovery.name == f"{service['metadata']['name']}.default.svc.cluster.local"
        assert discovery.port == service["spec"]["ports"][0]["port"]
        anubis = sidecar(pod)
        assert config.admin is not None
        assert anubis["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": config.admin.bind.port}
        assert anubis["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": config.admin.bind.port}
        assert anubis["resources"]["requests"]["memory"]
        mounts = {m["name"]: m for m in anubis["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        config_mount = next(m for n, m in mounts.items() if "configMap" in volumes[n])
        # --watch: the kubelet's ConfigMap and Secret updates are applied (no subPath, or none arrive)
        assert anubis["args"] == ["run", "--watch", "-c", f"{config_mount['mountPath']}/anubis.toml"]
        secret_mount = next(m for n, m in mounts.items() if "secret" in volumes[n])
        assert secret_mount["mountPath"] == "/etc/anubis-admin"
        assert all("subPath" not in m for m in mounts.values())
        # The pid file's directory is a writable emptyDir (the root file system is read-only).
        pid_dir = str(Path(config.settings.pid_file).parent)
        run_mount = next(m for m in mounts.values() if m["mountPath"] == pid_dir)
        assert "emptyDir" in volumes[run_mount["name"]] and not run_mount.get("readOnly")


def test_the_main_example_is_a_native_sidecar_and_the_two_container_form_delays_its_shutdown() -> None:
    native = next(pod for name, pod in pods() if name == "k8s-sidecar.yaml")
    init = native["spec"]["initContainers"]
    assert [c["name"] for c in init] == ["anubis"] and init[0]["restartPolicy"] == "Always"
    assert init[0]["startupProbe"]["httpGet"]["path"] == "/healthz"  # the application waits for it
    name, classic = next((n, pod) for n, pod in pods() if n == "k8s-sidecar-two-containers.yaml")
    assert "initContainers" not in classic["spec"]
    assert {c["name"] for c in classic["spec"]["containers"]} == {"app", "anubis"}
    settings = parse_config_text(re.sub(r"^token_file = .*$", "", config_map_of(manifests()[name], classic),
                                        flags=re.MULTILINE)).settings  # fmt: skip
    assert settings.shutdown_delay > 0  # the application finishing its requests still gets through
    assert classic["spec"]["terminationGracePeriodSeconds"] > settings.shutdown_delay + settings.drain_timeout


# What the "restricted" Pod Security Standard allows as volumes.
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}  # fmt: skip


def effective(pod: dict[str, Any], container: dict[str, Any], key: str) -> Any:
    """A securityContext field as the kubelet applies it: the container's, else the pod's."""
    own = container.get("securityContext", {})
    return own[key] if key in own else pod["spec"].get("securityContext", {}).get(key)


def test_every_container_of_every_manifest_passes_the_restricted_pod_security_standard() -> None:
    uid, gid = dockerfile_user()
    assert len(pods()) == 2
    for name, pod in pods():
        spec = pod["spec"]
        assert not any(spec.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")), name
        for volume in spec["volumes"]:
            assert set(volume) - {"name"} <= RESTRICTED_VOLUMES, (name, volume)
        for container in containers(pod):
            where = f"{name}: {container['name']}"
            context = container.get("securityContext", {})
            assert effective(pod, container, "runAsNonRoot") is True, where
            user = effective(pod, container, "runAsUser")
            assert isinstance(user, int) and user != 0, where  # a number: the kubelet can check it
            assert effective(pod, container, "seccompProfile") == {"type": "RuntimeDefault"}, where
            assert context.get("allowPrivilegeEscalation") is False, where
            assert context.get("capabilities", {}).get("drop") == ["ALL"], where
            assert not context.get("capabilities", {}).get("add"), where
            assert not context.get("privileged"), where
            assert context.get("readOnlyRootFilesystem") is True, where
            assert not any("hostPort" in p for p in container.get("ports", [])), where
            if container["name"] == "anubis":
                assert (user, effective(pod, container, "runAsGroup")) == (uid, gid), where


@pytest.mark.slow
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


