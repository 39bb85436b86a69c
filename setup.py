"""The build: the data path's modules compiled with mypyc where this machine can, pure Python otherwise.

Theory of operation: everything about the package is in pyproject.toml; this
file only adds `ext_modules`. `pip install .` (a wheel) compiles the modules a
connection runs through (`COMPILED`, accept → pick → connect → relay) with
mypyc: the code is already `mypy --strict`, and a compiled module is a C
extension that imports and behaves as its source does, coroutines included
(Trio runs them as it runs any). The same build compiles
proxy/io/_park.c, a parked task's await (proxy/io/woken.py), and on POSIX
proxy/io/_sockcalls.c, the relay's recv and send keeping the GIL
(proxy/io/sockcalls.py). The `.py` files ship beside the extensions, and
Python imports an extension first.

Nothing here is required. The package is pure Python wherever a step is
missing, and the same tests pass on both:
- an editable install (`pip install -e .`, the README's test command) never
  compiles: an extension beside its source would shadow every edit;
- `ANUBIS_COMPILE=0` asks for pure Python;
- no mypyc (another Python than CPython), a type check that fails, or a C
  compiler or Python headers that are missing or fail: a warning (pip shows
  it with `-v`), then the pure modules (`BuildOrPure` removes what a half-done
  build left, so a module's extension never exists without the runtime
  library it imports);
- `ANUBIS_COMPILE=required` makes each of those a failed build instead (the
  container image and CI's compiled run ask for it).

`anubis --version` says which is installed, as do `trioanubis.compiled()` and
the metrics' `anubis_build_info`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

# The modules every connection runs through on the epoll backend, compiled together (and mypyc's one
# runtime library beside them). The rest (configuration, the operator's surface, TLS, the stream
# relay, the portable backend) is pure Python everywhere.
COMPILED = [
    "trioanubis/proxy/io/base.py",
    "trioanubis/proxy/io/epoll.py",
    "trioanubis/proxy/io/readable.py",
    "trioanubis/proxy/listener.py",
    "trioanubis/proxy/admission.py",
    "trioanubis/proxy/lifecycle.py",
    "trioanubis/proxy/connection.py",
    "trioanubis/proxy/failover.py",
    "trioanubis/proxy/connect.py",
    "trioanubis/proxy/relay.py",
    "trioanubis/proxy/makers.py",
    "trioanubis/proxy/filters.py",
    "trioanubis/proxy/rates.py",
    "trioanubis/proxy/mirror.py",
    "trioanubis/ops/accesslog.py",
    "trioanubis/proxy/timeouts.py",
    "trioanubis/pool.py",
    "trioanubis/hold_queue.py",
    "trioanubis/strategies/base.py",
    "trioanubis/strategies/round_robin.py",
]
# The relay's recv and send keeping the GIL (proxy/io/sockcalls.py), in C, built with the modules
# above: POSIX sockets only (Windows keeps the socket methods).
SOCKCALLS = Extension("trioanubis.proxy.io._sockcalls", ["trioanubis/proxy/io/_sockcalls.c"])
# A parked task's await without Trio's two Python frames (proxy/io/woken.py's `parking`): any CPython.
PARK = Extension("trioanubis.proxy.io._park", ["trioanubis/proxy/io/_park.c"])


def warn(message: str) -> None:
    """Fall back to pure Python, saying why; or fail, when the build was told to compile."""
    if os.environ.get("ANUBIS_COMPILE") == "required":
        raise SystemExit(f"trioanubis setup.py: {message}, and ANUBIS_COMPILE=required")
    print(f"trioanubis setup.py: {message}; installing the pure-Python modules", file=sys.stderr)


class BuildOrPure(build_ext):
    """Build the compiled modules, or none of them: a failed compile leaves the pure package."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # the compiler's or the linker's failure, whatever class it has
            for ext in self.extensions:
                built = Path(self.get_ext_fullpath(ext.name))
                if built.exists():
                    built.unlink()
            self.extensions = []
            warn(f"compiling failed ({exc})")


def compiled_extensions() -> list[Any]:
    if os.environ.get("ANUBIS_COMPILE", "1") == "0":
        return []
    if any(command in sys.argv for command in ("editable_wheel", "develop")):
        return []
    if not any(command in sys.argv for command in ("bdist_wheel", "build", "build_ext", "install")):
        return []  # pip's metadata steps (egg_info, dist_info) run this file too: no type check for them
    if sys.implementation.name != "cpython":
        warn(f"{sys.implementation.name} is not CPython")
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        warn("mypyc is not installed")
        return []
    root = Path(__file__).resolve().parent
    here = Path.cwd()
    os.chdir(root)  # mypyc names modules by their path from the working directory
    try:
        version = f"--python-version={sys.version_info.major}.{sys.version_info.minor}"
        extensions = list(mypycify([version, *COMPILED], opt_level="3"))
    except BaseException as exc:  # mypy's type check exits (SystemExit) when it finds an error
        warn(f"mypyc refused the modules ({exc!r}; pip install -v shows mypy's errors)")
        return []
    finally:
        os.chdir(here)
    extensions.append(PARK)
    if os.name == "posix":
        extensions.append(SOCKCALLS)
    return extensions


setup(ext_modules=compiled_extensions(), cmdclass={"build_ext": BuildOrPure})
