"""``isc/`` is the framework-free core: it must never import Lightning or Hydra."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ISC = Path(__file__).resolve().parents[1] / "isc"
FORBIDDEN = ("lightning", "pytorch_lightning", "hydra", "omegaconf")


def test_isc_sources_do_not_import_frameworks() -> None:
    offenders = []
    for path in ISC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in FORBIDDEN]
    assert not offenders, offenders


def test_importing_every_isc_module_loads_no_framework() -> None:
    modules = sorted(
        "isc." + ".".join(p.relative_to(ISC).with_suffix("").parts)
        for p in ISC.rglob("*.py")
        if p.name != "__init__.py"
    )
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        f"bad = [m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r}]\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


STAGE_ORDER = ("formats", "augment", "data", "train", "models", "losses", "evaluation")
"""Bottom first: a package may import only itself and the packages before it (docs/architecture.md)."""


def _isc_imports() -> dict[str, set[str]]:
    """Every ``isc.*`` module each isc module imports, at any depth (function-level imports included)."""
    graph: dict[str, set[str]] = {}
    for path in ISC.rglob("*.py"):
        parts = path.relative_to(ISC).with_suffix("").parts
        name = ".".join(("isc",) + (parts[:-1] if parts[-1] == "__init__" else parts))
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("isc.")}
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("isc"):
                found.add(node.module)
        graph[name] = found - {name}
    return graph


def test_stage_packages_import_only_earlier_stages() -> None:
    graph = _isc_imports()
    rank = {stage: i for i, stage in enumerate(STAGE_ORDER)}
    packages = {p.name for p in ISC.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert packages == set(STAGE_ORDER), f"a new isc package needs a place in STAGE_ORDER: {packages}"
    offenders = [
        f"{module} imports {target}"
        for module, targets in graph.items()
        for target in targets
        if module.count(".") >= 1
        and target.count(".") >= 1
        and rank[target.split(".")[1]] > rank[module.split(".")[1]]
    ]
    assert not offenders, offenders


def test_no_import_cycle_between_isc_modules() -> None:
    graph = _isc_imports()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    cycles: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if target not in graph:
                continue
            if state.get(target) == 1:
                cycles.append(path[path.index(target) :] + [target] if target in path else [module, target])
            elif state.get(target) is None:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, cycles
