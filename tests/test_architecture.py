"""Architecture rules: fast import, no torch in solvers, plans round-trip."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import autopar.solvers


def _run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def test_import_is_light():
    out = _run("import sys, time; t = time.perf_counter(); import autopar; "
               "print(time.perf_counter() - t, 'torch' in sys.modules, 'torch.distributed' in sys.modules)")
    seconds, torch_loaded, dist_loaded = out.split()
    assert float(seconds) < 1.0 and torch_loaded == "False" and dist_loaded == "False"


def test_solvers_never_import_torch():
    names = [m.name for m in pkgutil.iter_modules(autopar.solvers.__path__)]
    assert {"search", "stage_dp", "evaluate", "space"} <= set(names)
    imports = "; ".join(f"import autopar.solvers.{n}" for n in names)
    assert _run(f"import sys; {imports}; print('torch' in sys.modules)") == "False"


def test_function_names_survive_submodule_imports():
    """``autopar.plan`` and ``autopar.capture`` are callables even after their submodules load."""
    code = ("import autopar, autopar.plan, autopar.capture.trace, inspect; "
            "print(callable(autopar.plan), callable(autopar.capture), autopar.plan.Plan.__name__)")
    assert _run(code) == "True True Plan"


def test_typed_rooms_pass_mypy():
    """solvers/, cost_models/ and plan.py are fully annotated and type-check (config in pyproject.toml)."""
    import pytest

    pytest.importorskip("mypy")
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-m", "mypy"], cwd=root, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:]
