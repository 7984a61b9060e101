"""Architecture rules: one-way imports between rooms, fast import, no torch in solvers, plans round-trip."""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import autopar.solvers


def _run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def test_import_does_not_load_torch():
    # planning never needs torch: `import autopar` (and so `autopar plan`) does not load it
    out = _run("import sys; import autopar; print('torch' in sys.modules, 'torch.distributed' in sys.modules)")
    assert out.split() == ["False", "False"]


def test_solvers_never_import_torch():
    prefix = "autopar.solvers."
    names = [m.name.removeprefix(prefix) for m in pkgutil.walk_packages(autopar.solvers.__path__, prefix)]
    assert {"search", "pipeline.stage_dp", "evaluate", "space", "sharding.strategies"} <= set(names)
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


# ---- one-way data flow (../shared/DESIGN.md) ---------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]

LEAF = ("layout", "schedule", "errors", "_compat", "_modules", "_io", "_signals")
"""``autopar.<name>`` modules that hold the shared vocabulary: everyone may import them, they import no room."""

ROOM_OF = {"api": "api", "pricing": "planner", "planner": "planner", "goodput": "planner", "replanning": "api",
           "replan_record": "plan", "__main__": "package"}
"""Top-level modules of ``autopar`` that are rooms of their own (others are named by their folder or file)."""

ALLOWED: dict[str, frozenset[str]] = {
    "leaf": frozenset(),
    "graph": frozenset({"leaf"}),
    "capture": frozenset({"leaf", "graph"}),
    "cost_models": frozenset({"leaf", "graph"}),
    "plan": frozenset({"leaf", "cost_models"}),  # downstream of the cost models: may carry their records
    "solvers": frozenset({"leaf", "graph", "cost_models", "plan"}),
    "planner": frozenset({"leaf", "graph", "cost_models", "solvers", "plan", "report"}),  # prose: report/
    "emit": frozenset({"leaf", "graph", "capture", "plan"}),
    "export": frozenset({"leaf", "graph", "plan"}),
    "report": frozenset({"leaf", "cost_models", "plan"}),
    "api": frozenset({"leaf", "graph", "capture", "cost_models", "solvers", "plan", "planner", "emit"}),
    "examples": frozenset({"leaf"}),
    "models": frozenset({"leaf", "examples"}),
}
"""Room → the rooms it may import, in the order of DESIGN.md's flow (capture → graph → cost models → solvers
→ plan → emit | export | report; api drives it). ``cli`` and the package's lazy attribute table may import
any room. A room missing here fails the test until someone places it."""

TEMPORARY_BACK_EDGES: frozenset[tuple[str, str]] = frozenset()
"""Known back edges being removed on another branch (none today: ``emit`` no longer imports ``api``). Delete an
entry once it is gone; the test tolerates a listed edge but never an unlisted one."""


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] in ("cost_models", "solvers"):  # installed as autopar.cost_models / autopar.solvers
        parts.insert(0, "autopar")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _room(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "autopar":
        return None
    if len(parts) == 1:
        return "package"
    name = parts[1]
    return "leaf" if name in LEAF else ROOM_OF.get(name, name)


def _is_module(name: str) -> bool:
    rel = Path(*name.split(".")[1:]) if name.startswith("autopar.") else None
    if rel is None:
        return False
    bases = [ROOT] if rel.parts[0] in ("cost_models", "solvers") else [ROOT / "autopar"]
    return any((b / rel).with_suffix(".py").exists() or (b / rel / "__init__.py").exists() for b in bases)


def _imports(path: Path) -> set[str]:
    """Every ``autopar`` module the file imports, at module level or inside functions (lazy imports count)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            subs = [f"{node.module}.{a.name}" for a in node.names if _is_module(f"{node.module}.{a.name}")]
            found.update(subs or [node.module])
    return {m for m in found if m.split(".")[0] == "autopar"}


def import_edges() -> list[tuple[str, str, str, str]]:
    """(importer, imported, importer's room, imported's room) for every cross-room import in the source."""
    edges = []
    for base in ("autopar", "cost_models", "solvers"):
        for path in sorted((ROOT / base).rglob("*.py")):
            src = _module_name(path)
            for dst in sorted(_imports(path)):
                a, b = _room(src), _room(dst)
                if a is not None and b is not None and a != b:
                    edges.append((src, dst, a, b))
    return edges


def back_edges(edges: list[tuple[str, str, str, str]]) -> list[str]:
    """The edges the table does not allow."""
    free = {"cli", "package"}
    return [f"{src} ({a}) imports {dst} ({b})" for src, dst, a, b in edges
            if a not in free and b not in ALLOWED.get(a, frozenset()) and (src, dst) not in TEMPORARY_BACK_EDGES]


def test_imports_follow_the_data_flow() -> None:
    edges = import_edges()
    assert len(edges) > 50  # the scan sees the code
    assert back_edges(edges) == []


def test_a_back_edge_fails() -> None:
    """The check catches what issue 11 found: cost models importing plan.py, solvers importing api."""
    planted = [("autopar.cost_models.memory", "autopar.plan", "cost_models", "plan"),
               ("autopar.solvers.search", "autopar.pricing", "solvers", "planner"),
               ("autopar.graph.ir", "autopar.cost_models.cluster", "graph", "cost_models")]
    assert len(back_edges(planted)) == 3
    assert back_edges([("autopar.solvers.search", "autopar.layout", "solvers", "leaf")]) == []


@pytest.mark.parametrize("module", ["autopar.layout", "autopar.errors"])
def test_vocabulary_is_a_leaf(module: str) -> None:
    path = ROOT / "autopar" / (module.split(".")[1] + ".py")
    assert {m for m in _imports(path) if _room(m) != "leaf"} == set()
