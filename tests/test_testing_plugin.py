"""The `anubis_proxy` fixture loads from a fresh install by its pytest11 entry point, with nothing of
this repository around it: tests/test_testing_redis.py, copied alone into an empty directory, passes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.peers import need

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_a_user_test_file_gets_the_fixture_from_a_fresh_install(wheel: Path, tmp_path: Path) -> None:
    need("redis-server")
    fresh = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(fresh)], check=True, timeout=120)
    python = fresh / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert installed.returncode == 0, installed.stderr
    # The dependencies (pytest, redis, trio, ...) from this environment, after the fresh site's own.
    (site / "zz_dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    project = tmp_path / "user"
    project.mkdir()
    shutil.copy(ROOT / "tests" / "test_testing_redis.py", project / "test_redis.py")
    fresh = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}  # no checkout
    run = subprocess.run(
        [str(python), "-m", "pytest", "-p", "no:cacheprovider", "-q", "test_redis.py", "--trace-config"],
        cwd=project,
        env=fresh,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "3 passed" in run.stdout
    plugin = next(line for line in run.stdout.splitlines() if "trioanubis.testing.plugin" in line)
    assert str(site) in plugin, plugin  # the entry point of the fresh install, not this checkout
