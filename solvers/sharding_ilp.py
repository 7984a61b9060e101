"""Intra-op parallelism: choose one sharding strategy per node of a graph, as an ILP (Alpa, §4.2).

Each node v has strategies with a cost ``c_v`` (compute + the op's own
communication) and memory ``m_v``; each edge (u, v) has a resharding cost
matrix ``R_uv[i, j]`` for u choosing i and v choosing j. With one-hot choice
vectors ``s_v`` the problem is Alpa's equation (1)::

    min  Σ_v s_vᵀ c_v  +  Σ_(u,v) s_uᵀ R_uv s_v      s.t.  Σ_v s_vᵀ m_v <= budget

The quadratic edge term is linearised with ``e_uv[i, j]`` (Alpa's code, constraints
(e)–(g)): ``Σ_j e[i, j] = s_u[i]`` and ``Σ_i e[i, j] = s_v[j]``. Given binary s,
these force e to be the outer product, so e can stay continuous in [0, 1].

Before building the ILP the graph is reduced exactly:

* a node with a single strategy is a constant: its costs and edges fold into its
  neighbours' cost vectors;
* a node that *follows* its producer (Alpa's "follow" strategy for views and
  reshapes: its choice is a function of the producer's) merges into the
  producer: its cost and memory join the producer's vectors and its edges are
  re-indexed by the producer's choice.

This module knows nothing about tensors or torch; ``solvers/strategies.py`` turns a
layer's ATen ops into a ``ShardingProblem``.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pulp

from autopar.errors import AutoparError, InfeasiblePlanError

logger = logging.getLogger(__name__)


class ShardingSolverError(AutoparError):
    """The ILP solver returned no usable answer (time limit without a solution, or an undefined status)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ShardingNode:
    """One node (an op, or a virtual node) and its candidate strategies."""

    name: str
    """Unique node name."""
    strategies: tuple[str, ...]
    """Readable strategy names, e.g. ``"S(1) = R x S(1)"``."""
    compute_s: tuple[float, ...]
    """Compute time per strategy."""
    comm_s: tuple[float, ...]
    """Communication inside the op per strategy."""
    mem_bytes: tuple[float, ...]
    """Memory per strategy (counted against the budget)."""
    follows: str | None = None
    """Producer node this node must follow, or None when it chooses freely."""
    follow_map: tuple[int, ...] = ()
    """For a follower: this node's strategy index for each strategy index of ``follows``."""

    def __post_init__(self) -> None:
        k = len(self.strategies)
        if k == 0:
            raise ValueError(f"node {self.name}: no strategies")
        for field_name in ("compute_s", "comm_s", "mem_bytes"):
            values = getattr(self, field_name)
            if len(values) != k or not all(math.isfinite(v) and v >= 0 for v in values):
                raise ValueError(f"node {self.name}: {field_name}={values} must be {k} finite values >= 0")
        if self.follows is not None and not all(0 <= i < k for i in self.follow_map):
            raise ValueError(f"node {self.name}: follow_map {self.follow_map} out of range for {k} strategies")

    @property
    def cost_s(self) -> tuple[float, ...]:
        """Compute + communication per strategy."""
        return tuple(a + b for a, b in zip(self.compute_s, self.comm_s))


@dataclass(frozen=True, slots=True, kw_only=True)
class ShardingEdge:
    """A data dependency src → dst and its resharding cost matrix."""

    src: str
    """Producer node."""
    dst: str
    """Consumer node."""
    cost_s: tuple[tuple[float, ...], ...]
    """``cost_s[i][j]``: time to reshard when src uses strategy i and dst strategy j (``inf`` forbids the pair)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ShardingProblem:
    """Nodes in topological order (a follower after the node it follows), edges, and a memory budget."""

    nodes: tuple[ShardingNode, ...]
    """All nodes."""
    edges: tuple[ShardingEdge, ...]
    """All edges."""
    mem_budget_bytes: float | None = None
    """Bound on Σ memory of the chosen strategies; None for no bound."""

    def __post_init__(self) -> None:
        sizes: dict[str, int] = {}
        for node in self.nodes:
            if node.name in sizes:
                raise ValueError(f"duplicate node name {node.name!r}")
            if node.follows is not None:
                if node.follows not in sizes:
                    raise ValueError(f"node {node.name} follows {node.follows!r}, which is not an earlier node")
                if len(node.follow_map) != sizes[node.follows]:
                    raise ValueError(f"node {node.name}: follow_map has {len(node.follow_map)} entries, "
                                     f"{node.follows} has {sizes[node.follows]} strategies")
            sizes[node.name] = len(node.strategies)
        for edge in self.edges:
            if edge.src not in sizes or edge.dst not in sizes:
                raise ValueError(f"edge {edge.src} -> {edge.dst} names an unknown node")
            rows, cols = sizes[edge.src], sizes[edge.dst]
            if len(edge.cost_s) != rows or any(len(r) != cols for r in edge.cost_s):
                raise ValueError(f"edge {edge.src} -> {edge.dst}: cost matrix is not {rows} x {cols}")

    def node(self, name: str) -> ShardingNode:
        """The node called ``name``."""
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)


@dataclass(frozen=True, slots=True, kw_only=True)
class Reduction:
    """The exact reduction of a problem to its free ("root") nodes."""

    roots: tuple[str, ...]
    """Nodes that keep their own choice variables."""
    root_of: Mapping[str, str | None]
    """Node → the root that decides it (None: a constant)."""
    choice_map: Mapping[str, tuple[int, ...]]
    """Node → its strategy for each strategy of its root (one entry for constants)."""
    cost_s: Mapping[str, tuple[float, ...]]
    """Root → merged cost vector (its own, its followers', and edges to constants)."""
    mem_bytes: Mapping[str, tuple[float, ...]]
    """Root → merged memory vector."""
    edges: Mapping[tuple[str, str], tuple[tuple[float, ...], ...]]
    """(root a, root b) → merged edge matrix, a before b in ``roots``."""
    const_cost_s: float
    """Cost that no choice changes."""
    const_mem_bytes: float
    """Memory that no choice changes."""


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


# ---- reduction -------------------------------------------------------------------------------


def reduce_problem(problem: ShardingProblem) -> Reduction:
    """Fold constants and followers into the roots (exact: the optimum is unchanged).

    Example:
        >>> a = ShardingNode(name="a", strategies=("x", "y"), compute_s=(1, 2), comm_s=(0, 0), mem_bytes=(0, 0))
        >>> b = ShardingNode(name="b", strategies=("x", "y"), compute_s=(5, 0), comm_s=(0, 0), mem_bytes=(0, 0),
        ...                  follows="a", follow_map=(0, 1))
        >>> reduce_problem(ShardingProblem(nodes=(a, b), edges=())).cost_s["a"]
        (6.0, 2.0)
    """
    root_of: dict[str, str | None] = {}
    choice_map: dict[str, tuple[int, ...]] = {}
    for node in problem.nodes:
        if node.follows is not None:
            parent = node.follows
            root_of[node.name] = root_of[parent]
            choice_map[node.name] = tuple(node.follow_map[i] for i in choice_map[parent])
        elif len(node.strategies) == 1:
            root_of[node.name], choice_map[node.name] = None, (0,)
        else:
            root_of[node.name], choice_map[node.name] = node.name, tuple(range(len(node.strategies)))
    roots = tuple(n.name for n in problem.nodes if root_of[n.name] == n.name)
    merged = _Merger(roots, root_of, choice_map)
    for node in problem.nodes:
        merged.add_node(node)
    for edge in problem.edges:
        merged.add_edge(edge)
    return merged.result()


class _Merger:
    """Accumulates cost/memory vectors and edge matrices onto the roots."""

    def __init__(self, roots: tuple[str, ...], root_of: dict[str, str | None],
                 choice_map: dict[str, tuple[int, ...]]) -> None:
        self.roots, self.root_of, self.choice_map = roots, root_of, choice_map
        self.order = {r: i for i, r in enumerate(roots)}
        self.cost = {r: [0.0] * len(choice_map[r]) for r in roots}
        self.mem = {r: [0.0] * len(choice_map[r]) for r in roots}
        self.edges: dict[tuple[str, str], list[list[float]]] = {}
        self.const_cost = 0.0
        self.const_mem = 0.0

    def add_node(self, node: ShardingNode) -> None:
        root, phi, cost = self.root_of[node.name], self.choice_map[node.name], node.cost_s
        if root is None:
            self.const_cost += cost[phi[0]]
            self.const_mem += node.mem_bytes[phi[0]]
            return
        for s, i in enumerate(phi):
            self.cost[root][s] += cost[i]
            self.mem[root][s] += node.mem_bytes[i]

    def add_edge(self, edge: ShardingEdge) -> None:
        ra, rb = self.root_of[edge.src], self.root_of[edge.dst]
        pa, pb, r = self.choice_map[edge.src], self.choice_map[edge.dst], edge.cost_s
        if ra is None and rb is None:
            self.const_cost += r[pa[0]][pb[0]]
        elif ra is None or rb is None or ra == rb:
            root = rb if ra is None else ra
            assert root is not None
            for s in range(len(self.cost[root])):
                i = pa[0] if ra is None else pa[s]
                j = pb[0] if rb is None else pb[s]
                self.cost[root][s] += r[i][j]
        else:
            if self.order[ra] > self.order[rb]:  # keep one matrix per root pair, oriented by root order
                ra, rb, pa, pb = rb, ra, pb, pa
                r = tuple(zip(*r))
            mat = self.edges.setdefault((ra, rb), [[0.0] * len(pb) for _ in pa])
            for s, i in enumerate(pa):
                for t, j in enumerate(pb):
                    mat[s][t] += r[i][j]

    def result(self) -> Reduction:
        if not math.isfinite(self.const_cost):
            raise InfeasiblePlanError("sharding problem: a fixed node is joined to another by a forbidden edge")
        return Reduction(
            roots=self.roots, root_of=self.root_of, choice_map=self.choice_map,
            cost_s={r: tuple(v) for r, v in self.cost.items()}, mem_bytes={r: tuple(v) for r, v in self.mem.items()},
            edges={k: tuple(tuple(row) for row in m) for k, m in self.edges.items()},
            const_cost_s=self.const_cost, const_mem_bytes=self.const_mem,
        )


# ---- ILP -------------------------------------------------------------------------------------


def _lp_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", text)


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
            pulp.LpVariable(f"s_{_lp_name(r)}_{i}", cat=pulp.LpBinary) if math.isfinite(c) else None
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
            (i, j): pulp.LpVariable(f"e_{tag}_{i}_{j}", lowBound=0, upBound=1)
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
    """Alpa eq. (1): ``Σ_v s_vᵀ c_v + Σ_(u,v) Σ_ij e_uv[i, j] R_uv[i, j]`` (+ the folded constant)."""
    node_terms = [c * x for r, xs in choice.items() for c, x in zip(red.cost_s[r], xs) if x is not None and c]
    edge_terms = [red.edges[k][i][j] * e for k, pairs in edge.items() for (i, j), e in pairs.items()
                  if red.edges[k][i][j]]
    lp += pulp.lpSum(node_terms + edge_terms) + red.const_cost_s, "eq1_total_cost"


def _make_solver(time_limit_s: float, msg: bool) -> tuple[pulp.LpSolver, str]:
    highs = getattr(pulp, "HiGHS", None)
    if highs is not None:
        solver = highs(msg=msg, timeLimit=time_limit_s)
        if solver.available():
            return solver, "HiGHS"
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


def evaluate_assignment(problem: ShardingProblem, choice: Mapping[str, int]) -> tuple[float, float]:
    """(cost, memory) of a full assignment, straight from the original problem.

    Example:
        >>> a = ShardingNode(name="a", strategies=("x", "y"), compute_s=(1, 2), comm_s=(0, 0), mem_bytes=(5, 1))
        >>> evaluate_assignment(ShardingProblem(nodes=(a,), edges=()), {"a": 1})
        (2.0, 1.0)
    """
    cost = math.fsum(n.cost_s[choice[n.name]] for n in problem.nodes)
    cost += math.fsum(e.cost_s[choice[e.src]][choice[e.dst]] for e in problem.edges)
    mem = math.fsum(n.mem_bytes[choice[n.name]] for n in problem.nodes)
    return float(cost), float(mem)


def solve_sharding(problem: ShardingProblem, *, time_limit_s: float = 30.0) -> ShardingSolution:
    """Build and solve in one call."""
    lp, variables = build_sharding_problem(problem)
    return solve(lp, variables, time_limit_s=time_limit_s)


def brute_force_sharding(problem: ShardingProblem) -> ShardingSolution:
    """Oracle for tests: enumerate every assignment of the free (non-follower) nodes.

    Raises:
        InfeasiblePlanError: nothing fits the budget with a finite cost.
    """
    import itertools

    free = [n for n in problem.nodes if n.follows is None]
    best: tuple[float, float, dict[str, int]] | None = None
    for combo in itertools.product(*(range(len(n.strategies)) for n in free)):
        choice = dict(zip((n.name for n in free), combo))
        for node in problem.nodes:
            if node.follows is not None:
                choice[node.name] = node.follow_map[choice[node.follows]]
        cost, mem = evaluate_assignment(problem, choice)
        fits = problem.mem_budget_bytes is None or mem <= problem.mem_budget_bytes
        if fits and math.isfinite(cost) and (best is None or cost < best[0]):
            best = (cost, mem, choice)
    if best is None:
        raise InfeasiblePlanError("brute force: no assignment fits the memory budget")
    return ShardingSolution(choice=best[2], cost_s=best[0], mem_bytes=best[1], optimal=True, solver="brute-force")


__all__ = [
    "Reduction",
    "ShardingEdge",
    "ShardingNode",
    "ShardingProblem",
    "ShardingSolution",
    "ShardingSolverError",
    "ShardingVars",
    "brute_force_sharding",
    "build_sharding_problem",
    "evaluate_assignment",
    "reduce_problem",
    "solve",
    "solve_sharding",
]
