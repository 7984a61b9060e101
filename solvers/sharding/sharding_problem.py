"""The intra-op sharding problem as plain data, and its exact reduction to the nodes that really choose.

A ``ShardingProblem`` is a graph: nodes with candidate strategies (cost, memory),
edges with resharding cost matrices. Before any solver runs it is reduced exactly:

* a node with a single strategy is a constant: its costs and edges fold into its
  neighbours' cost vectors;
* a node that *follows* its producer (Alpa's "follow" strategy for views and
  reshapes: its choice is a function of the producer's) merges into the
  producer: its cost and memory join the producer's vectors and its edges are
  re-indexed by the producer's choice.

Nothing here knows about tensors, torch or the solver.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from autopar.errors import InfeasiblePlanError


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


__all__ = [
    "Reduction",
    "ShardingEdge",
    "ShardingNode",
    "ShardingProblem",
    "evaluate_assignment",
    "reduce_problem",
]
