"""Intra-op parallelism: choose one sharding strategy per node of a graph, as an ILP (Alpa, §4.2).

Each node v has strategies with a cost ``c_v`` (compute + the op's own
communication) and memory ``m_v``; each edge (u, v) has a resharding cost
matrix ``R_uv[i, j]`` for u choosing i and v choosing j. With one-hot choice
vectors ``s_v`` the problem is Alpa's equation (1)::

    min  Σ_v s_vᵀ c_v  +  Σ_(u,v) s_uᵀ R_uv s_v      s.t.  Σ_v s_vᵀ m_v <= budget

The quadratic edge term is linearised with ``e_uv[i, j]`` (Alpa's code, constraints
(e)–(g)): ``Σ_j e[i, j] = s_u[i]`` and ``Σ_i e[i, j] = s_v[j]``. Given binary s,
these force e to be the outer product, so e can stay continuous in [0, 1].

Before building the ILP the graph is reduced exactly (constants and followers fold
into the nodes that choose; ``solvers/sharding_problem.py``).

This module knows nothing about tensors or torch; ``solvers/sharding/strategies.py`` turns a
layer's ATen ops into a ``ShardingProblem``.
"""

from __future__ import annotations

import logging
import math
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pulp

from autopar.errors import AutoparError, InfeasiblePlanError
from autopar.solvers.sharding.sharding_problem import (
    Reduction,
    ShardingEdge,
    ShardingNode,
    ShardingProblem,
    evaluate_assignment,
    reduce_problem,
)

logger = logging.getLogger(__name__)

OBJECTIVE_UNITS_PER_S = 2.0 ** 20
"""The ILP's objective counts time in units of 2⁻²⁰ s (about a microsecond), not in seconds.

A small layer's strategies cost microseconds. In seconds the solver's absolute tolerances (of the order
of 1e-7) swallow differences of a few tenths of a microsecond: of two choices 0.27 µs apart (a tiny Llama's
rotary ``cat`` split or not), CBC returned the dearer one, and which one came back could change with the
order of the variables (that is, with the names of the ops), not with the costs. A power of two scales every
coefficient exactly, so the scaled problem has the same optimum; ``ShardingSolution.cost_s`` is still
evaluated in seconds from the problem itself."""


class ShardingSolverError(AutoparError):
    """The ILP solver returned no usable answer (time limit without a solution, or an undefined status)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ShardingVars:
    """The PuLP variables of a built problem, with what is needed to read a solution back."""

    problem: ShardingProblem
    """The original problem."""
    reduction: Reduction
    """How nodes map to the roots that carry variables."""
    choice: Mapping[str, tuple[pulp.LpVariable | None, ...]]
    """Root → one binary per strategy (None where the strategy is forbidden)."""
    edge: Mapping[tuple[str, str], Mapping[tuple[int, int], pulp.LpVariable]]
    """(root a, root b) → (i, j) → linearisation variable, allowed pairs only."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ShardingSolution:
    """The chosen strategy per node and what it costs."""

    choice: Mapping[str, int]
    """Node name → strategy index."""
    cost_s: float
    """Objective: Σ node costs + Σ edge costs of the choice."""
    mem_bytes: float
    """Σ memory of the choice."""
    optimal: bool
    """False when the solver stopped at its time limit with a feasible but unproven solution."""
    solver: str
    """Which solver answered (``"CBC"``, ``"HiGHS"``, or ``"none"`` when the reduction left nothing to choose)."""

    def strategy_names(self, problem: ShardingProblem) -> dict[str, str]:
        """Node name → chosen strategy name."""
        return {n.name: n.strategies[self.choice[n.name]] for n in problem.nodes}


# ---- ILP -------------------------------------------------------------------------------------


def _lp_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", text)


def _new_var(lp: pulp.LpProblem, name: str, *, low: float, up: float, cat: str) -> pulp.LpVariable:
    """A variable attached to ``lp`` (PuLP >= 3.3 wants ``add_variable``; older PuLP builds it directly)."""
    if hasattr(lp, "add_variable"):
        return lp.add_variable(name, low, up, cat=cat)
    return pulp.LpVariable(name, lowBound=low, upBound=up, cat=cat)


def build_sharding_problem(problem: ShardingProblem) -> tuple[pulp.LpProblem, ShardingVars]:
    """The ILP of a (reduced) sharding problem, with named constraints, ready for ``solve``.

    Raises:
        InfeasiblePlanError: even the least-memory choice of every node exceeds the budget.
    """
    red = reduce_problem(problem)
    _check_feasible(problem, red)
    lp = pulp.LpProblem("intra_op_sharding", pulp.LpMinimize)
    choice = _add_choice_variables_a(lp, red)
    edge = _add_edge_linearisation_efg(lp, red, choice)
    _add_one_hot_b(lp, choice)
    _add_memory_budget_c(lp, red, choice, problem.mem_budget_bytes)
    _add_objective_eq1(lp, red, choice, edge)
    return lp, ShardingVars(problem=problem, reduction=red, choice=choice, edge=edge)


def _check_feasible(problem: ShardingProblem, red: Reduction) -> None:
    """Cheap infeasibility proofs before any solver runs: a node with no allowed strategy, or memory."""
    for r in red.roots:
        if not any(math.isfinite(c) for c in red.cost_s[r]):
            raise InfeasiblePlanError(f"sharding node {r}: every strategy needs a forbidden resharding")
    if problem.mem_budget_bytes is None:
        return
    least = red.const_mem_bytes + sum(
        min(m for m, c in zip(red.mem_bytes[r], red.cost_s[r]) if math.isfinite(c)) for r in red.roots
    )
    if least > problem.mem_budget_bytes:
        raise InfeasiblePlanError(
            f"sharding needs at least {least:.4g} bytes (every node at its least-memory strategy) but the "
            f"budget is {problem.mem_budget_bytes:.4g} bytes"
        )


def _add_choice_variables_a(lp: pulp.LpProblem, red: Reduction) -> dict[str, tuple[pulp.LpVariable | None, ...]]:
    """Alpa (a): binary s_v[i] per root and strategy; strategies of infinite cost get no variable."""
    return {
        r: tuple(
            _new_var(lp, f"s_{_lp_name(r)}_{i}", low=0, up=1, cat=pulp.LpBinary) if math.isfinite(c) else None
            for i, c in enumerate(red.cost_s[r])
        )
        for r in red.roots
    }


def _add_one_hot_b(lp: pulp.LpProblem, choice: Mapping[str, Sequence[pulp.LpVariable | None]]) -> None:
    """Alpa (b): each root picks exactly one strategy, ``Σ_i s_v[i] = 1``."""
    for r, xs in choice.items():
        lp += pulp.lpSum(x for x in xs if x is not None) == 1, f"one_hot_{_lp_name(r)}"


def _add_memory_budget_c(lp: pulp.LpProblem, red: Reduction, choice: Mapping[str, Sequence[pulp.LpVariable | None]],
                         budget: float | None) -> None:
    """Alpa (c): ``Σ_v s_vᵀ m_v + constant <= budget`` (one budget: parameters live for the whole step)."""
    if budget is None:
        return
    terms = [m * x for r, xs in choice.items() for m, x in zip(red.mem_bytes[r], xs) if x is not None and m]
    lp += pulp.lpSum(terms) <= budget - red.const_mem_bytes, "mem_budget"


def _add_edge_linearisation_efg(lp: pulp.LpProblem, red: Reduction,
                                choice: Mapping[str, Sequence[pulp.LpVariable | None]],
                                ) -> dict[tuple[str, str], dict[tuple[int, int], pulp.LpVariable]]:
    """Alpa (e)–(g): e_uv[i, j] in [0, 1] with ``Σ_j e[i, j] = s_u[i]`` and ``Σ_i e[i, j] = s_v[j]``.

    Pairs with an infinite resharding cost (or a forbidden endpoint) get no
    variable, so choosing both ends becomes infeasible.
    """
    out: dict[tuple[str, str], dict[tuple[int, int], pulp.LpVariable]] = {}
    for (a, b), mat in red.edges.items():
        tag = f"{_lp_name(a)}__{_lp_name(b)}"
        xa, xb = choice[a], choice[b]
        pairs = {
            (i, j): _new_var(lp, f"e_{tag}_{i}_{j}", low=0, up=1, cat=pulp.LpContinuous)
            for i in range(len(xa)) for j in range(len(xb))
            if xa[i] is not None and xb[j] is not None and math.isfinite(mat[i][j])
        }
        for i, x in enumerate(xa):
            if x is not None:
                lp += pulp.lpSum(e for (p, _), e in pairs.items() if p == i) == x, f"edge_row_{tag}_{i}"
        for j, y in enumerate(xb):
            if y is not None:
                lp += pulp.lpSum(e for (_, q), e in pairs.items() if q == j) == y, f"edge_col_{tag}_{j}"
        out[(a, b)] = pairs
    return out


def _add_objective_eq1(lp: pulp.LpProblem, red: Reduction, choice: Mapping[str, Sequence[pulp.LpVariable | None]],
                       edge: Mapping[tuple[str, str], Mapping[tuple[int, int], pulp.LpVariable]]) -> None:
    """Alpa eq. (1): ``Σ_v s_vᵀ c_v + Σ_(u,v) Σ_ij e_uv[i, j] R_uv[i, j]`` (+ the folded constant),
    in units of ``1 / OBJECTIVE_UNITS_PER_S`` seconds."""
    k = OBJECTIVE_UNITS_PER_S
    node_terms = [c * k * x for r, xs in choice.items() for c, x in zip(red.cost_s[r], xs) if x is not None and c]
    edge_terms = [red.edges[key][i][j] * k * e for key, pairs in edge.items() for (i, j), e in pairs.items()
                  if red.edges[key][i][j]]
    lp += pulp.lpSum(node_terms + edge_terms) + red.const_cost_s * k, "eq1_total_cost"


def _make_solver(time_limit_s: float, msg: bool) -> tuple[pulp.LpSolver, str]:
    """HiGHS when ``highspy`` is installed, else a system CBC, else the CBC binary bundled with PuLP."""
    highs = getattr(pulp, "HiGHS", None)
    if highs is not None:
        solver = highs(msg=msg, timeLimit=time_limit_s)
        if solver.available():
            return solver, "HiGHS"
    coin = pulp.COIN_CMD(msg=msg, timeLimit=time_limit_s)
    if coin.available():
        return coin, "CBC"
    with warnings.catch_warnings():  # PuLP 3.3 flags its bundled CBC for removal in 4.0; it is still the fallback
        warnings.simplefilter("ignore", DeprecationWarning)
        return pulp.PULP_CBC_CMD(msg=msg, timeLimit=time_limit_s), "CBC"


def solve(lp: pulp.LpProblem, variables: ShardingVars, *, time_limit_s: float = 30.0,
          msg: bool = False) -> ShardingSolution:
    """Solve a built problem and read the choice of every node back.

    Args:
        lp: from ``build_sharding_problem``.
        variables: from ``build_sharding_problem``.
        time_limit_s: wall-clock limit handed to the solver.
        msg: let the solver print its log.

    Returns:
        The solution; ``optimal`` is False if the time limit stopped a feasible search.

    Raises:
        InfeasiblePlanError: no choice fits the memory budget (or every choice uses a forbidden pair).
        ShardingSolverError: the solver stopped without any solution, or reported an undefined status.
    """
    red = variables.reduction
    if not red.roots:
        return _solution(variables, {}, optimal=True, solver="none")
    solver, name = _make_solver(time_limit_s, msg)
    status = lp.solve(solver)
    match status:
        case pulp.LpStatusOptimal:
            picks = {r: _argmax(xs) for r, xs in variables.choice.items()}
            return _solution(variables, picks, optimal=lp.sol_status == pulp.LpSolutionOptimal, solver=name)
        case pulp.LpStatusInfeasible:
            raise InfeasiblePlanError(
                f"sharding ILP is infeasible: no choice for {len(red.roots)} nodes fits the memory budget "
                f"{variables.problem.mem_budget_bytes} bytes without a forbidden resharding"
            )
        case pulp.LpStatusNotSolved:
            raise ShardingSolverError(f"{name} found no solution within {time_limit_s} s "
                                      f"({len(lp.variables())} variables); raise time_limit_s")
        case _:
            raise ShardingSolverError(f"{name} returned status {pulp.LpStatus.get(status, status)!r}")


def _argmax(xs: Sequence[pulp.LpVariable | None]) -> int:
    values = [(x.varValue or 0.0) if x is not None else -1.0 for x in xs]
    return max(range(len(values)), key=values.__getitem__)


def _solution(variables: ShardingVars, picks: Mapping[str, int], *, optimal: bool, solver: str) -> ShardingSolution:
    red, problem = variables.reduction, variables.problem
    choice = {}
    for node in problem.nodes:
        root = red.root_of[node.name]
        choice[node.name] = red.choice_map[node.name][0 if root is None else picks[root]]
    cost, mem = evaluate_assignment(problem, choice)
    if problem.mem_budget_bytes is not None and mem > problem.mem_budget_bytes * (1 + 1e-9):
        raise InfeasiblePlanError(f"sharding needs {mem:.4g} bytes, budget {problem.mem_budget_bytes:.4g}")
    return ShardingSolution(choice=choice, cost_s=cost, mem_bytes=mem, optimal=optimal, solver=solver)


def solve_sharding(problem: ShardingProblem, *, time_limit_s: float = 30.0) -> ShardingSolution:
    """Build and solve in one call.

    Example:
        >>> a = ShardingNode(name="a", strategies=("R", "S"), compute_s=(4, 1), comm_s=(0, 0), mem_bytes=(8, 2))
        >>> b = ShardingNode(name="b", strategies=("R", "S"), compute_s=(4, 1), comm_s=(0, 0), mem_bytes=(8, 2))
        >>> e = ShardingEdge(src="a", dst="b", cost_s=((0, 0), (5, 0)))
        >>> solve_sharding(ShardingProblem(nodes=(a, b), edges=(e,))).choice
        {'a': 1, 'b': 1}
    """
    lp, variables = build_sharding_problem(problem)
    return solve(lp, variables, time_limit_s=time_limit_s)


__all__ = [
    "OBJECTIVE_UNITS_PER_S",
    "ShardingEdge",
    "ShardingNode",
    "ShardingProblem",
    "ShardingSolution",
    "ShardingSolverError",
    "ShardingVars",
    "build_sharding_problem",
    "evaluate_assignment",
    "solve",
    "solve_sharding",
]
