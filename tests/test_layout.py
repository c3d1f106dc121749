"""The architecture's rules, checked on the code itself (static imports, then a real import in a clean process).

* Layers: ``stream`` < ``cache``, ``pruner`` < ``serve``; inside ``serve``: ``core`` (plain classes) < ``http``
  (FastAPI), ``deploy`` (Ray Serve) < ``cli``; ``eval`` builds on ``core``. No import runs against that order.
* ``serve.core`` imports neither Ray nor FastAPI (nor Starlette / uvicorn): checked statically, including lazy imports
  inside functions, and by importing every ``serve.core`` module in a fresh interpreter.
* Nothing below ``serve`` imports Ray or any ``serve`` module; no import cycle among the project's modules.
* Only public framework APIs (no ``ray._private``, ``serve._private``...) anywhere in the package or benchmarks.
"""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("stream", "cache", "pruner", "serve")
RANK = {"stream": 0, "cache": 1, "pruner": 1, "serve.core": 2, "serve.eval": 3, "serve.http": 3, "serve.deploy": 4,
        "serve.cli": 5}
WEB = ("fastapi", "starlette", "uvicorn")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _imports(path: Path, module: str) -> set[str]:
    """Every module named by an import anywhere in the file (top level or inside functions)."""
    out: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            out.update(f"{base}.{alias.name}" for alias in node.names)  # a module, or a name of module ``base``
    return out


def _graph() -> dict[str, set[str]]:
    """Project module -> project modules it imports (a name that is a package attribute resolves to the package)."""
    sources = _sources()
    graph = {}
    for name, path in sources.items():
        graph[name] = {imp if imp in sources else imp.rpartition(".")[0]
                       for imp in _imports(path, name)} & set(sources)
        graph[name].discard(name)
    return graph


def _layer(module: str) -> str:
    for key in sorted(RANK, key=len, reverse=True):
        if module == key or module.startswith(key + "."):
            return key
    return module.split(".")[0]  # serve/__init__.py and other top-level modules of serve


def test_the_layers_exist() -> None:
    sources = _sources()
    for layer in RANK:
        assert any(m == layer or m.startswith(layer + ".") for m in sources), f"no package {layer}"
    flat = sorted(p.name for p in (ROOT / "serve").glob("*.py") if p.name != "__init__.py")
    assert flat == [], f"serve/ holds only subpackages by layer, found modules {flat}"


def test_no_import_runs_up_a_layer() -> None:
    up = []
    for module, deps in _graph().items():
        here = _layer(module)
        if here not in RANK:
            continue
        for dep in deps:
            there = _layer(dep)
            if there in RANK and RANK[there] > RANK[here]:
                up.append(f"{module} -> {dep}")
            elif there in RANK and RANK[there] == RANK[here] and here != there:
                up.append(f"{module} -> {dep} (sideways between {here} and {there})")
    assert up == []


def test_no_import_cycle() -> None:
    graph, state, cycles = _graph(), {}, []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_below_serve_nothing_imports_ray_or_serve() -> None:
    sources = _sources()
    bad = [f"{m}: {imp}" for m, p in sources.items() if not m.startswith("serve")
           for imp in _imports(p, m) if imp.split(".")[0] in ("ray", "serve", *WEB)]
    assert bad == []


def test_the_plain_layer_imports_neither_ray_nor_fastapi_statically() -> None:
    sources = _sources()
    bad = [f"{m}: {imp}" for m, p in sources.items() if _layer(m) == "serve.core"
           for imp in _imports(p, m) if imp.split(".")[0] in ("ray", *WEB)]
    assert bad == []


def test_the_plain_layer_imports_neither_ray_nor_fastapi_when_run() -> None:
    core = sorted(m for m in _sources() if _layer(m) == "serve.core")
    code = ("import importlib, sys\n"
            f"for m in {core!r}: importlib.import_module(m)\n"
            f"loaded = sorted(n for n in sys.modules if n.split('.')[0] in ('ray', {', '.join(map(repr, WEB))}))\n"
            "print(loaded)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("root", ["stream", "cache", "pruner", "serve", "benchmarks"])
def test_no_private_framework_attributes(root: str) -> None:
    # __serve_build_asgi_app__ is the documented hook of serve.ingress() called without an app (see its docstring)
    pattern = re.compile(r"__serve_(?!build_asgi_app__)|_push_multiplexed|ray\._private|serve\._private|\._raylet|"
                         r"from ray\.serve\._|import ray\._")
    hits = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}" for p in sorted((ROOT / root).rglob("*.py"))
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert hits == []
