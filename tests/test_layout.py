"""The package's layout holds: no import circle, the data plane apart from the operator's surface,
the config package at the bottom, and every file a docstring names exists."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "trioanubis"


def import_graph() -> dict[str, set[str]]:
    """Module → the package's modules it imports, type-only imports and imports in functions included."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
                targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


@pytest.mark.slow
def test_no_import_circle() -> None:
    assert circles(import_graph()) == []


def test_the_circle_finder_finds_a_circle() -> None:
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.slow
def test_layers_import_only_downwards() -> None:
    graph = import_graph()
    for name, imports in graph.items():
        if name.startswith("trioanubis.proxy"):  # the data plane never reaches up to the operator's surface
            assert not {i for i in imports if i.startswith(("trioanubis.ops", "trioanubis.app"))}, name
        if name.startswith("trioanubis.health"):  # health checks share socket-level connecting only
            data_path = {i for i in imports if i.startswith("trioanubis.proxy")}
            shared = {"trioanubis.proxy.connect", "trioanubis.proxy.proxy_protocol"}
            assert data_path <= shared, (name, data_path)
        if name.startswith("trioanubis.ops") and name != "trioanubis.ops.view":
            assert "trioanubis.app" not in imports, name  # they read a View
    assert "trioanubis.proxy.listener" not in graph["trioanubis.proxy.connection"]
    assert not {i for i in graph["trioanubis.pool"] if i.startswith("trioanubis.proxy")}


# The config package sits at the bottom: it imports itself and errors, and two leaves it loads
# while parsing so that `anubis check` proves what `run` will do (certificates, custom strategies).
CONFIG_MAY_IMPORT = ("trioanubis.config", "trioanubis.errors")
CONFIG_LEAVES = {
    "trioanubis.tls.context": ("trioanubis.errors",),
    "trioanubis.strategies": ("trioanubis.errors", "trioanubis.strategies"),
}


def within(name: str, packages: tuple[str, ...] | list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def config_escapes(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Module → what it imports that the config package may not reach (directly, or through a leaf)."""
    found: dict[str, set[str]] = {}
    for name, imports in graph.items():
        if within(name, ["trioanubis.config"]):
            allowed: tuple[str, ...] = (*CONFIG_MAY_IMPORT, *CONFIG_LEAVES)
        else:
            leaf = next((leaf for leaf in CONFIG_LEAVES if within(name, [leaf])), None)
            if leaf is None:
                continue
            allowed = CONFIG_LEAVES[leaf]
        bad = {i for i in imports if not within(i, allowed)}
        if bad:
            found[name] = bad
    return found


@pytest.mark.slow
def test_the_config_package_imports_nothing_above_it() -> None:
    assert config_escapes(import_graph()) == {}


@pytest.mark.slow
def test_the_config_rule_finds_an_upward_import() -> None:
    graph = import_graph()
    graph["trioanubis.config.values"] = graph["trioanubis.config.values"] | {"trioanubis.pool"}
    graph["trioanubis.tls.context"] = graph["trioanubis.tls.context"] | {"trioanubis.config"}
    graph["trioanubis.strategies.base"] = graph["trioanubis.strategies.base"] | {"trioanubis.proxy.io"}
    assert config_escapes(graph) == {
        "trioanubis.config.values": {"trioanubis.pool"},
        "trioanubis.tls.context": {"trioanubis.config"},
        "trioanubis.strategies.base": {"trioanubis.proxy.io"},
    }


# Files other projects' docstrings are named after, that our docstrings cite as models.
CITED_ELSEWHERE = {"_state.py"}  # h11's
_FILE_NAME = re.compile(r"\b[A-Za-z_][\w/]*\.py\b")


def files_named_but_missing(paths: list[Path]) -> list[str]:
    """Each `name.py` or `dir/name.py` the given sources mention that is not in the package (or,
    with a directory, at that path from the package or the repository)."""
    root = PACKAGE.parent
    ours = {path.name for path in PACKAGE.rglob("*.py")}
    missing = []
    for path in paths:
        for name in _FILE_NAME.findall(path.read_text()):
            if "*" in name or name in CITED_ELSEWHERE:
                continue
            found = (PACKAGE / name).exists() or (root / name).exists() if "/" in name else (
                name in ours or (root / name).exists())  # setup.py
            if not found:
                missing.append(f"{path.name} names {name}")
    return missing


@pytest.mark.slow
def test_every_file_a_docstring_or_comment_names_exists() -> None:
    """A module that says "see relay.py" must not point at a file that moved or never was."""
    assert files_named_but_missing(sorted(PACKAGE.rglob("*.py"))) == []


def test_the_file_name_check_finds_a_moved_file(tmp_path: Path) -> None:
    source = tmp_path / "example.py"
    source.write_text('"""See proxy/relay.py, relay.py, proxy/tls_relay.py and faulted.py."""\n')
    assert files_named_but_missing([source]) == ["example.py names proxy/tls_relay.py",
                                                 "example.py names faulted.py"]


def test_no_test_file_imports_another() -> None:
    """Shared helpers live in tests/helpers.py and fixtures in conftest.py (STYLE: tests mirror modules)."""
    tests = Path(__file__).resolve().parent
    imports = [f"{path.name}: {line.strip()}" for path in sorted(tests.glob("*.py"))
               for line in path.read_text().splitlines()
               if re.match(r"\s*(from|import) tests\.test_", line)]  # fmt: skip
    assert imports == []
