"""What `pip install .` installs (the Quick start's demo line and docker/Dockerfile do that, not
an editable install): every module and data file of the source tree, importable from the wheel."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import COMPILED_RUN
from tests.helpers import tracked_files

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "trioanubis"

IMPORT_ALL = """
import importlib, pkgutil, trioanubis
assert trioanubis.__file__.startswith(%r), trioanubis.__file__
for module in pkgutil.walk_packages(trioanubis.__path__, "trioanubis."):
    if not module.name.endswith("__main__"):  # that one runs the command line
        importlib.import_module(module.name)
from trioanubis.ops import dashboard
assert b"uPlot" in dashboard.page()
print("ok", "compiled" if trioanubis.compiled() else "pure")
"""
BUILD = "compiled" if COMPILED_RUN else "pure"


@pytest.mark.slow
def test_the_wheel_holds_every_module_and_data_file(wheel: Path) -> None:
    wanted = set(tracked_files("trioanubis"))
    with zipfile.ZipFile(wheel) as archive:
        shipped = {name for name in archive.namelist() if name.startswith("trioanubis/")}
    assert wanted - shipped == set()


@pytest.mark.slow
def test_the_installed_package_imports_and_checks_the_reference_config(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    env = dict(os.environ, PYTHONPATH=str(site))
    imported = subprocess.run([sys.executable, "-c", IMPORT_ALL % str(site)], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)  # fmt: skip
    assert imported.stdout.strip() == f"ok {BUILD}", imported.stderr
    reference = site / "trioanubis" / "anubis.toml"
    checked = subprocess.run([sys.executable, "-m", "trioanubis", "check", "-c", str(reference)],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert checked.returncode == 0, checked.stderr


@pytest.mark.slow
def test_the_wheel_holds_extensions_only_when_compiled(wheel: Path) -> None:
    """`ANUBIS_COMPILE=0` (the fixture's, outside the compiled run) builds no extension at all; the
    compiled build has one per module setup.py names, the runtime library they share, and on POSIX
    the relay's C helper (`SOCKCALLS`); everywhere the parked task's await (`PARK`)."""
    with zipfile.ZipFile(wheel) as archive:
        extensions = sorted(name for name in archive.namelist() if name.endswith(".so"))
    if not COMPILED_RUN:
        assert extensions == []
        return
    setup = ast.parse((ROOT / "setup.py").read_text())
    [compiled] = [ast.literal_eval(node.value) for node in setup.body if isinstance(node, ast.Assign)
                  and getattr(node.targets[0], "id", "") == "COMPILED"]  # fmt: skip
    modules = sorted([name.removesuffix(".py") for name in compiled] + ["trioanubis/proxy/io/_park"]
                     + (["trioanubis/proxy/io/_sockcalls"] if os.name == "posix" else []))
    assert sorted(name.split(".")[0] for name in extensions if name.startswith("trioanubis/")) == modules
    assert len(extensions) == len(modules) + 1  # and mypyc's runtime library, at the top level


@pytest.mark.slow
def test_a_build_whose_compiler_fails_installs_the_whole_pure_package(tmp_path: Path) -> None:
    """No working C compiler: a warning, and a wheel of pure modules that all import, never some
    extensions without the library they need; with ANUBIS_COMPILE=required, no wheel at all. Run in
    CI's compiled run only (two minutes of CPU)."""
    if not COMPILED_RUN:
        pytest.skip("the compiled run (ANUBIS_EXPECT_COMPILED=1) builds this one")
    from tests.helpers import build_wheel

    env = {"CC": "/bin/false", "ANUBIS_COMPILE": "1"}
    wheel = build_wheel(tmp_path / "wheel", tmp_path / "source", env=env)
    required = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w",
                               str(tmp_path / "refused"), str(tmp_path / "source")],
                              env={**os.environ, "CC": "/bin/false", "ANUBIS_COMPILE": "required"},
                              capture_output=True, text=True, timeout=600)  # fmt: skip
    assert required.returncode != 0 and "ANUBIS_COMPILE=required" in required.stderr, required.stderr
    assert not (tmp_path / "refused").exists() or not list((tmp_path / "refused").iterdir())
    with zipfile.ZipFile(wheel) as archive:
        assert [name for name in archive.namelist() if name.endswith(".so")] == []
        archive.extractall(tmp_path / "site")
    imported = subprocess.run([sys.executable, "-c", IMPORT_ALL % str(tmp_path / "site")], cwd=tmp_path,
                              env=dict(os.environ, PYTHONPATH=str(tmp_path / "site")), capture_output=True,
                              text=True, timeout=120)  # fmt: skip
    assert imported.stdout.strip() == "ok pure", imported.stderr


def readme_packages() -> set[str]:
    """The Debian packages the README's "Running the tests" tells a contributor to install."""
    text = (ROOT / "README.md").read_text()
    block = text.split("### Running the tests", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    words = block.replace("\\\n", " ").split()
    return set(words[words.index("install") + 1 :])


def test_the_readme_lists_the_peers_ci_installs_and_every_peer_tests_ask_for() -> None:
    from tests.peers import PACKAGES

    script = (ROOT / ".ci" / "run").read_text()
    ci = set(script.split('PEERS="', 1)[1].split('"', 1)[0].split())
    asked = {package for packages in PACKAGES.values() for package in packages.split()}
    assert readme_packages() == ci
    assert asked <= ci, asked - ci
