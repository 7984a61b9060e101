"""solvers/ is torch-free: every module imports in a fresh interpreter without pulling torch in."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import autopar.solvers

OWN_MODULES = {"stage_dp", "sharding_ilp", "sharding_problem", "strategies", "op_strategies",
               "op_rules", "view_rules", "placement", "layer_graph", "layer_result", "oracles"}


def test_every_solvers_module_imports_without_torch() -> None:
    names = sorted(m.name for m in pkgutil.iter_modules(autopar.solvers.__path__))
    assert OWN_MODULES <= set(names), f"missing modules: {OWN_MODULES - set(names)}"
    code = "; ".join(["import sys", "import autopar.schedule", "import autopar.layout",
                      *(f"import autopar.solvers.{n}" for n in names),
                      "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))"])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", f"solvers pulled in {out}"
