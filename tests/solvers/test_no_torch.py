"""solvers/ is torch-free: every module imports in a fresh interpreter without pulling torch in."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import autopar.solvers

OWN_MODULES = {"pipeline.stage_dp", "pipeline.stage_policies", "sharding.sharding_ilp", "sharding.sharding_problem",
               "sharding.strategies", "sharding.op_strategies", "sharding.op_rules", "sharding.view_rules",
               "sharding.placement", "sharding.layer_graph", "sharding.layer_result", "oracles", "search"}


def test_every_solvers_module_imports_without_torch() -> None:
    prefix = "autopar.solvers."
    names = sorted(m.name.removeprefix(prefix) for m in pkgutil.walk_packages(autopar.solvers.__path__, prefix))
    assert OWN_MODULES <= set(names), f"missing modules: {OWN_MODULES - set(names)}"
    code = "; ".join(["import sys", "import autopar.schedule", "import autopar.layout",
                      *(f"import autopar.solvers.{n}" for n in names),
                      "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))"])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", f"solvers pulled in {out}"
