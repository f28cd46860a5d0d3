"""The package layout DESIGN.md promises, checked from the source: layers and no import cycles.

Run alone: ``.venv/bin/python -m pytest tests/unit/test_layout.py -v``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("gateway", "encoder")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _graph() -> dict[str, set[str]]:
    """Module -> project modules it imports (top-level and function-level imports alike)."""
    modules = {_module_name(path): path for package in PACKAGES for path in (ROOT / package).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                base = node.module
                candidates = [f"{base}.{alias.name}" for alias in node.names] + [base]
            elif isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            else:
                continue
            for candidate in candidates:
                if candidate in modules:
                    targets.add(candidate)
                    break
        graph[name] = targets - {name}
    return graph


def _external_imports(package: str) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in (ROOT / package).rglob("*.py"):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
        found[str(path.relative_to(ROOT))] = names
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles() -> None:
    graph = _graph()
    assert "gateway.core.service" in graph, "the graph must cover the package"
    # Package __init__ files that re-export their children are not cycles of behaviour; drop the
    # child -> parent-package edge that `from gateway.core.cache.base import ...` implies.
    assert _cycles(graph) == []


def test_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_core_knows_no_web_framework_and_encoder_knows_no_gateway() -> None:
    for path, names in _external_imports("gateway/core").items():
        bad = {n for n in names if n.split(".")[0] in {"litestar", "uvicorn"} or n.startswith("gateway.http")}
        assert not bad, f"{path} imports {bad}"
    for path, names in _external_imports("encoder").items():
        bad = {n for n in names if n.split(".")[0] in {"gateway", "litestar", "redis", "msgspec", "uvicorn"}}
        assert not bad, f"{path} imports {bad}"
    for path, names in _external_imports("bench").items():
        assert not {n for n in names if n.split(".")[0] == "tests"}, f"{path} imports the test suite"


def _is_http(name: str) -> bool:
    return name == "gateway.http" or name.startswith("gateway.http.")


def test_engine_never_imports_the_http_layer() -> None:
    """The engine process serves no HTTP: no module of gateway/engine imports gateway.http, directly
    or through the project modules it imports (its model loader, gateway.loading, included)."""
    for path, names in _external_imports("gateway/engine").items():
        assert not {n for n in names if _is_http(n)}, f"{path} imports the HTTP layer"
    graph = _graph()
    engine = sorted(name for name in graph if name.startswith("gateway.engine"))
    assert "gateway.engine.server" in engine, "the graph must cover the engine"
    for start in engine:
        reached: set[str] = set()
        pending = [start]
        while pending:
            for target in graph.get(pending.pop(), ()):
                if target not in reached:
                    reached.add(target)
                    pending.append(target)
        http = sorted(filter(_is_http, reached))
        assert not http, f"{start} reaches the HTTP layer through {http}"


def test_the_engine_process_loads_no_web_framework() -> None:
    code = (
        "import sys, pathlib, gateway.engine.server, gateway.engine.supervisor, gateway.loading;"
        # the CLI's engine entry, as the supervisor starts it (the engine itself stubbed out)
        "gateway.engine.server.run_engine = lambda *args, **kwargs: 0;"
        "from gateway.cli_serve import run_engine_process; from gateway.settings import Settings;"
        "run_engine_process(Settings(), pathlib.Path('/nonexistent/engine.sock'), None);"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('litestar', 'uvicorn') or m.startswith('gateway.http')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_importing_the_core_loads_no_web_framework() -> None:
    code = (
        "import sys, gateway.core.service, gateway.core.telemetry, gateway.core.outputs;"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('litestar', 'uvicorn')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_only_settings_reads_the_environment() -> None:
    for path in (ROOT / "gateway").rglob("*.py"):
        if path.name != "settings.py":
            assert "os.environ" not in path.read_text(), path
    for path in (ROOT / "encoder").rglob("*.py"):
        text = path.read_text()
        assert "os.environ[" not in text, path
        assert "os.getenv" not in text, path


def test_no_type_ignores_in_the_package() -> None:
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            assert "type: ignore" not in path.read_text(), path


def test_no_module_is_over_400_lines() -> None:
    """Small modules with one responsibility each (issue 25): a module past 400 lines is split."""
    long = {
        str(path.relative_to(ROOT)): count
        for package in ("gateway", "encoder")
        for path in (ROOT / package).rglob("*.py")
        if (count := len(path.read_text(encoding="utf-8").splitlines())) > 400
    }
    assert not long, f"split these by responsibility: {long}"
