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
