"""Sharding ILP: the reduction, the named constraints, error mapping, and the brute-force cross-check."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest

from autopar.errors import InfeasiblePlanError
from autopar.solvers.oracles import brute_force_sharding
from autopar.solvers.sharding.sharding_ilp import build_sharding_problem, solve, solve_sharding
from autopar.solvers.sharding.sharding_problem import (
    ShardingEdge,
    ShardingNode,
    ShardingProblem,
    evaluate_assignment,
    reduce_problem,
)


def _node(name: str, cost: list[float], mem: list[float] | None = None, *, follows: str | None = None,
          follow_map: tuple[int, ...] = ()) -> ShardingNode:
    k = len(cost)
    return ShardingNode(name=name, strategies=tuple(f"{name}{i}" for i in range(k)), compute_s=tuple(cost),
                        comm_s=(0.0,) * k, mem_bytes=tuple(mem if mem is not None else [0.0] * k), follows=follows,
                        follow_map=follow_map)


def _edge(src: str, dst: str, matrix: list[list[float]]) -> ShardingEdge:
    return ShardingEdge(src=src, dst=dst, cost_s=tuple(tuple(row) for row in matrix))


# ---- known answers ---------------------------------------------------------------------------


def test_resharding_cost_makes_neighbours_agree() -> None:
    # alone, a prefers 0 and b prefers 1; disagreeing costs 10, so both take a's favourite
    problem = ShardingProblem(nodes=(_node("a", [1, 2]), _node("b", [2, 1])),
                              edges=(_edge("a", "b", [[0, 10], [10, 0]]),))
    sol = solve_sharding(problem)
    assert sol.choice == {"a": 0, "b": 0} or sol.choice == {"a": 1, "b": 1}
    assert sol.cost_s == pytest.approx(3.0)
    assert sol.optimal and sol.solver in ("CBC", "HiGHS")


def test_memory_budget_forces_the_lean_strategy() -> None:
    problem = ShardingProblem(nodes=(_node("a", [1, 5], [100, 10]),), edges=(), mem_budget_bytes=50)
    assert solve_sharding(problem).choice == {"a": 1}
    unbounded = ShardingProblem(nodes=(_node("a", [1, 5], [100, 10]), _node("b", [0, 1])), edges=())
    assert solve_sharding(unbounded).choice["a"] == 0


def test_infeasible_memory_names_the_bytes_needed() -> None:
    problem = ShardingProblem(nodes=(_node("a", [1, 2], [30, 20]), _node("b", [1, 2], [40, 25])), edges=(),
                              mem_budget_bytes=44)
    with pytest.raises(InfeasiblePlanError, match="at least 45 bytes"):
        solve_sharding(problem)


def test_forbidden_pairs_are_never_chosen() -> None:
    problem = ShardingProblem(nodes=(_node("a", [0, 5]), _node("b", [0, 5])),
                              edges=(_edge("a", "b", [[math.inf, 1], [1, 0]]),))
    sol = solve_sharding(problem)
    assert (sol.choice["a"], sol.choice["b"]) != (0, 0)
    assert sol.cost_s == pytest.approx(6.0)  # (0, 1) or (1, 0): 5 + 1
    every_pair_forbidden = ShardingProblem(nodes=(_node("a", [0, 5]), _node("b", [0, 5])),
                                           edges=(_edge("a", "b", [[math.inf, math.inf], [math.inf, math.inf]]),))
    with pytest.raises(InfeasiblePlanError):
        solve_sharding(every_pair_forbidden)


# ---- reduction -------------------------------------------------------------------------------


def test_constants_fold_into_their_neighbours() -> None:
    problem = ShardingProblem(nodes=(_node("in", [7]), _node("a", [1, 1])), edges=(_edge("in", "a", [[0, 3]]),))
    red = reduce_problem(problem)
    assert red.roots == ("a",)
    assert red.cost_s["a"] == (1.0, 4.0)
    assert red.const_cost_s == 7.0


def test_followers_merge_into_their_producer() -> None:
    # v follows u (u's strategy i → v's strategy map[i]); w reads v
    problem = ShardingProblem(
        nodes=(_node("u", [1, 2], [10, 5]), _node("v", [0, 3, 9], [1, 2, 3], follows="u", follow_map=(2, 1)),
               _node("w", [0, 0])),
        edges=(_edge("u", "v", [[0, 1, 2], [3, 4, 5]]), _edge("v", "w", [[1, 2], [3, 4], [5, 6]])),
    )
    red = reduce_problem(problem)
    assert red.roots == ("u", "w")
    # u's vector: own + v at map[i] + edge u→v at (i, map[i])
    assert red.cost_s["u"] == (1 + 9 + 2, 2 + 3 + 4)
    assert red.mem_bytes["u"] == (10 + 3, 5 + 2)
    assert red.edges[("u", "w")] == ((5.0, 6.0), (3.0, 4.0))  # rows re-indexed through the follow map


def test_problem_validation() -> None:
    with pytest.raises(ValueError, match="not an earlier node"):
        ShardingProblem(nodes=(_node("v", [0], follows="u", follow_map=(0,)), _node("u", [0])), edges=())
    with pytest.raises(ValueError, match="not 2 x 2"):
        ShardingProblem(nodes=(_node("a", [0, 0]), _node("b", [0, 0])), edges=(_edge("a", "b", [[0, 0]]),))
    with pytest.raises(ValueError, match="unknown node"):
        ShardingProblem(nodes=(_node("a", [0]),), edges=(_edge("a", "zzz", [[0]]),))
    with pytest.raises(ValueError, match="duplicate"):
        ShardingProblem(nodes=(_node("a", [0]), _node("a", [0])), edges=())


# ---- the LP as written -----------------------------------------------------------------------


def test_constraints_are_named_after_the_paper(tmp_path: Path) -> None:
    problem = ShardingProblem(nodes=(_node("x.0", [1, 2], [5, 1]), _node("y", [2, 1, 3])),
                              edges=(_edge("x.0", "y", [[0, 1, 1], [1, 0, 1]]),), mem_budget_bytes=100)
    lp, variables = build_sharding_problem(problem)
    lp.writeLP(str(tmp_path / "sharding.lp"))
    text = (tmp_path / "sharding.lp").read_text()
    for name in ("one_hot_x_0:", "one_hot_y:", "mem_budget:", "edge_row_x_0__y_0:", "edge_row_x_0__y_1:",
                 "edge_col_x_0__y_2:", "eq1_total_cost:"):
        assert name in text
    assert len(variables.edge[("x.0", "y")]) == 6
    sol = solve(lp, variables, time_limit_s=10)
    assert sol.cost_s == pytest.approx(brute_force_sharding(problem).cost_s)


def test_nothing_to_choose_skips_the_solver() -> None:
    problem = ShardingProblem(nodes=(_node("a", [3]), _node("b", [1, 2], follows="a", follow_map=(1,))),
                              edges=(_edge("a", "b", [[0, 4]]),))
    sol = solve_sharding(problem)
    assert sol.solver == "none"
    assert sol.choice == {"a": 0, "b": 1}
    assert sol.cost_s == evaluate_assignment(problem, sol.choice)[0] == 3 + 2 + 4


# ---- brute-force cross-check -----------------------------------------------------------------


def _random_problem(seed: int) -> ShardingProblem:
    """≤ 8 nodes × ≤ 3 strategies, some followers, some forbidden pairs, sometimes a memory budget."""
    rng = random.Random(seed)
    n = rng.randint(1, 8)
    nodes: list[ShardingNode] = []
    for i in range(n):
        k = rng.randint(1, 3)
        cost = [round(rng.uniform(0, 10), 3) for _ in range(k)]
        mem = [float(rng.randint(0, 5)) for _ in range(k)]
        if nodes and rng.random() < 0.25:
            parent = rng.choice(nodes)
            fmap = tuple(rng.randrange(k) for _ in parent.strategies)
            nodes.append(_node(f"n{i}", cost, mem, follows=parent.name, follow_map=fmap))
        else:
            nodes.append(_node(f"n{i}", cost, mem))
    edges = []
    for _ in range(rng.randint(0, 2 * n)):
        a, b = sorted(rng.sample(range(n), 2)) if n > 1 else (0, 0)
        if a == b:
            continue
        matrix = [[math.inf if rng.random() < 0.05 else round(rng.uniform(0, 10), 3) for _ in nodes[b].strategies]
                  for _ in nodes[a].strategies]
        edges.append(_edge(nodes[a].name, nodes[b].name, matrix))
    budget = None if rng.random() < 0.4 else float(rng.randint(0, 4 * n))
    return ShardingProblem(nodes=tuple(nodes), edges=tuple(edges), mem_budget_bytes=budget)


@pytest.mark.parametrize("seed", range(80))
def test_ilp_matches_brute_force(seed: int) -> None:
    problem = _random_problem(seed)
    try:
        expected = brute_force_sharding(problem)
    except InfeasiblePlanError:
        with pytest.raises(InfeasiblePlanError):
            solve_sharding(problem)
        return
    got = solve_sharding(problem)
    cost, mem = evaluate_assignment(problem, got.choice)
    assert got.cost_s == pytest.approx(cost)
    assert got.cost_s == pytest.approx(expected.cost_s, abs=1e-6)
    if problem.mem_budget_bytes is not None:
        assert mem <= problem.mem_budget_bytes
    for node in problem.nodes:
        if node.follows is not None:
            assert got.choice[node.name] == node.follow_map[got.choice[node.follows]]


def test_random_instances_exercise_every_path() -> None:
    """The seeds above include infeasible, follower-heavy, budgeted and forbidden-pair instances."""
    problems = [_random_problem(seed) for seed in range(80)]
    assert any(any(n.follows for n in p.nodes) for p in problems)
    assert any(p.mem_budget_bytes is not None for p in problems)
    assert any(math.inf in row for p in problems for e in p.edges for row in e.cost_s)
    outcomes = []
    for p in problems:
        try:
            brute_force_sharding(p)
            outcomes.append(True)
        except InfeasiblePlanError:
            outcomes.append(False)
    assert 10 <= outcomes.count(True) and 5 <= outcomes.count(False)
