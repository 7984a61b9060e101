"""Goodput ranking and re-planning end to end on a small captured GPT (known answers and brute force)."""

from __future__ import annotations

import dataclasses
import itertools
import json

import pytest
import torch

import autopar
from autopar.api import plan_graph, plan_graph_ranked
from autopar.cli import run
from autopar.cost_models.cluster import Cluster
from autopar.errors import UserInputError
from autopar.examples.gpt import GPT, GPTConfig
from autopar.goodput import plan_goodput
from autopar.plan import Layout, Plan, Recompute, Schedule
from autopar.pricing import LayerPricer
from autopar.replanning import (
    _variants,
    contingency_for,
    precompute_contingencies,
    replan,
    restaged_layouts,
    survivor_layouts,
)
from autopar.solvers.costs import Formulas
from autopar.solvers.evaluate import evaluate_layout

BATCH = 48
"""Divisible by 1 … 4, 6, 8, 12, 16 and 24: every node count keeps it on some layout."""


@pytest.fixture(scope="module")
def graph():
    with torch.device("meta"):
        model = GPT(GPTConfig.from_name("125m", block_size=512))
    return autopar.capture(model, (torch.zeros(1, 512, dtype=torch.long, device="meta"),))


@pytest.fixture(scope="module")
def cluster() -> Cluster:
    # a failure-prone cluster (GPU MTBF 50 h) so that goodput differs visibly from throughput
    return Cluster.from_dict({"preset": "dgx-a100-80gb", "nodes": 4,
                              "reliability": {"gpu_mtbf_hours": 50, "node_mtbf_hours": 100}})


@pytest.fixture(scope="module")
def ranked(graph, cluster):
    return plan_graph_ranked(graph, cluster=cluster, global_batch_size=BATCH, top_k=6, constraints={"pp": 2})


def test_goodput_objective_orders_by_goodput_and_keeps_both_figures(graph, cluster, ranked) -> None:
    by_goodput = plan_graph_ranked(graph, cluster=cluster, global_batch_size=BATCH, top_k=6, constraints={"pp": 2},
                                   objective="goodput")
    goodputs = [p.reliability.goodput_tokens_per_s for p in by_goodput]
    assert goodputs == sorted(goodputs, reverse=True)
    steps = [p.predicted.step_time_s for p in ranked]
    assert steps == sorted(steps)
    # the goodput winner is at least as good as every plan the throughput ranking found
    assert goodputs[0] >= max(p.reliability.goodput_tokens_per_s for p in ranked) * (1 - 1e-12)
    for p in by_goodput:
        assert p.reliability == plan_goodput(p, cluster)  # one formula: the estimate is recomputable
        assert p.reliability.throughput_tokens_per_s == pytest.approx(p.predicted.tokens_per_s)
    assert "goodput" in by_goodput[0].explanation[0] and "fastest layouts" in by_goodput[0].explanation[1]
    with pytest.raises(UserInputError, match="objective"):
        plan_graph(graph, cluster=cluster, global_batch_size=BATCH, objective="speed")


def test_plan_files_without_the_new_fields_still_load(ranked) -> None:
    data = ranked[0].to_dict()
    assert data["reliability"]["interval_steps"] >= 1
    old = {k: v for k, v in data.items() if k not in ("reliability", "contingencies", "replanned_from")}
    assert Plan.from_dict(old) == dataclasses.replace(ranked[0], reliability=None)
    assert Plan.from_json(ranked[0].to_json()) == ranked[0]


def _template(**kw) -> Layout:
    base = dict(dp=8, tp=2, pp=2, micro_batch_size=2, num_micro_batches=3, zero_stage=1, recompute=Recompute.NONE,
                sequence_parallel=False, schedule=Schedule.ONE_F_ONE_B)
    return Layout(**{**base, **kw})


@pytest.mark.parametrize(("gpus", "batch", "mbs"), list(itertools.product((8, 12, 20, 28, 36), (24, 48, 60, 96),
                                                                         (1, 2))))
def test_survivor_layouts_against_brute_force(gpus: int, batch: int, mbs: int) -> None:
    t = _template(micro_batch_size=mbs)
    got = {(lay.dp, lay.global_batch_size == batch) for lay, _ in survivor_layouts(
        t, num_gpus=gpus, global_batch_size=batch, num_layers=14)}
    limit = gpus // 4
    same = [d for d in range(1, limit + 1) if batch % (d * mbs) == 0 and 2 * d >= limit
            and batch // (d * mbs) >= 2]  # 1F1B with pp = 2 needs 2 micro-batches
    if same:
        assert (max(same), True) in got
    for lay, keeps in survivor_layouts(t, num_gpus=gpus, global_batch_size=batch, num_layers=14):
        assert lay.num_gpus <= gpus and (lay.tp, lay.pp, lay.micro_batch_size) == (2, 2, mbs)
        assert keeps == (lay.global_batch_size == batch)


def test_replan_is_the_best_template_on_the_survivors(graph, cluster, ranked) -> None:
    plan = ranked[0]
    pricing = LayerPricer(graph, cluster)
    new = replan(plan, lost_nodes=1, pricing=pricing, templates=[p.layout for p in ranked])
    survivors = cluster.with_nodes(3)
    assert new.num_gpus_available == 24 and new.layout.num_gpus <= 24
    assert new.layout.global_batch_size == BATCH and new.predicted.peak_memory_bytes <= new.predicted.memory[0].capacity
    # brute force: every template × every survivor layout, priced directly
    on = pricing.for_cluster(survivors)
    def options(t: Layout) -> list[Layout]:
        same = [lay for lay, keeps in survivor_layouts(t, num_gpus=24, global_batch_size=BATCH,
                                                       num_layers=plan.num_layers) if keeps]
        return same + restaged_layouts(t, num_gpus=24, global_batch_size=BATCH, num_layers=plan.num_layers)

    formulas = Formulas(survivors, on.dtype)
    best = max((evaluate_layout(lay, _variants(on, lay), formulas, gpus_per_node=8)
                for t in [plan.layout, *(p.layout for p in ranked)] for lay in options(t)),
               key=lambda ev: (ev.fits, -ev.step_time_s))
    assert new.predicted.step_time_s == pytest.approx(best.step_time_s, rel=1e-9)
    rec = new.replanned_from
    assert rec.method == "templates" and rec.lost_nodes == 1 and rec.previous_layout == plan.layout.describe()
    assert rec.global_batch_size == rec.previous_global_batch_size == BATCH
    changed = {c.split()[0] for c in rec.changes}
    assert changed == {n for n in ("dp", "tp", "pp", "micro_batch_size", "num_micro_batches", "zero_stage",
                                   "recompute", "sequence_parallel", "schedule", "virtual_stages")
                       if getattr(plan.layout, n) != getattr(new.layout, n)}
    full = replan(plan, lost_nodes=1, pricing=pricing, exhaustive=True)
    assert full.replanned_from.method == "search"
    assert full.predicted.step_time_s <= new.predicted.step_time_s * (1 + 1e-9)  # the search sees every template


def test_contingencies_answer_without_the_model(graph, cluster, ranked) -> None:
    pricing = LayerPricer(graph, cluster)
    with_c = precompute_contingencies(ranked[0], max_lost_nodes=2, pricing=pricing,
                                      templates=[p.layout for p in ranked])
    loaded = Plan.from_json(with_c.to_json())
    assert loaded == with_c and [c.num_gpus_available for c in loaded.contingencies] == [24, 16]
    direct = replan(ranked[0], lost_nodes=2, pricing=pricing, exhaustive=True)  # precomputed: full searches
    cached = replan(loaded, lost_nodes=2, cluster=cluster)  # no model, no pricing: a lookup
    assert cached.layout == direct.layout and cached.predicted == direct.predicted
    assert cached.replanned_from.method == "contingency (search)"
    quick = precompute_contingencies(ranked[0], max_lost_nodes=1, pricing=pricing, exhaustive=False)
    assert quick.contingencies[0].replanned_from.method == "templates"
    assert contingency_for(loaded, 3) is None
    with pytest.raises(UserInputError, match="give the model"):
        replan(loaded, lost_nodes=3, cluster=cluster)
    with pytest.raises(UserInputError, match="lost_nodes"):
        replan(loaded, lost_nodes=4, cluster=cluster)


def test_replans_and_contingencies_keep_the_plans_pins(graph, cluster, ranked) -> None:
    """A plan made with pins (here pp=2) re-plans under them; dp, which the survivors decide, is not held.
    Unpinned, the search on 24 GPUs drops the pipeline, so each assertion fails if the pins are ignored."""
    pricing = LayerPricer(graph, cluster)
    assert replan(ranked[0], lost_nodes=1, pricing=pricing, exhaustive=True).layout.pp == 1
    pins = {"pp": 2, "dp": 16}
    for exhaustive in (True, False):
        new = replan(ranked[0], lost_nodes=1, pricing=pricing, exhaustive=exhaustive, constraints=pins)
        assert new.layout.pp == 2 and new.layout.dp != 16
    with_c = precompute_contingencies(ranked[0], max_lost_nodes=2, pricing=pricing, exhaustive=False,
                                      constraints=pins)
    assert [c.layout.pp for c in with_c.contingencies] == [2, 2]
    unpinned = precompute_contingencies(ranked[0], max_lost_nodes=1, pricing=pricing)
    assert unpinned.contingencies[0].layout.pp == 1
    served = replan(unpinned, lost_nodes=1, pricing=pricing, constraints=pins)  # not the unpinned contingency
    assert served.layout.pp == 2 and not served.replanned_from.method.startswith("contingency")
    with pytest.raises(autopar.PlanValidationError, match="pp=20 is larger than the model's"):
        replan(ranked[0], lost_nodes=1, pricing=pricing, exhaustive=True, constraints={"pp": 20})


def test_cli_plan_goodput_then_replan(tmp_path, capsys) -> None:
    path = tmp_path / "plan.json"
    rc = run(["plan", "gpt:tiny", "-c", "dgx-h100", "--nodes", "4", "-b", str(BATCH), "--seq", "64", "--top", "2",
              "--objective", "goodput", "--contingency", "2", "--out", str(path)])
    out = capsys.readouterr().out
    assert rc == 0 and "goodput tokens/s" in out and "checkpoint every" in out
    rc = run(["replan", str(path), "--lost-nodes", "1", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert rc == 0 and data["replanned_from"]["method"].startswith("contingency")
    assert data["num_gpus_available"] == 24 and data["layout"]["dp"] * data["layout"]["tp"] * data["layout"]["pp"] <= 24
    rc = run(["replan", str(path), "--lost-nodes", "3"])  # not precomputed: re-plans from the model in the plan
    out = capsys.readouterr().out
    assert rc == 0 and "re-planned (templates" in out
    assert run(["replan", str(path), "--lost-nodes", "4"]) == 2


@pytest.fixture(scope="module")
def cpu_plan(tmp_path_factory) -> tuple[str, str]:
    """(cluster file, plan file): train_gpt's model planned for examples/gloo-4x1.yaml, 4 nodes of one gloo rank."""
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    cpu, path = str(repo / "examples" / "gloo-4x1.yaml"), tmp_path_factory.mktemp("cpu") / "plan.json"
    rc = run(["plan", f"{repo / 'examples' / 'train_gpt.py'}:build", "-c", cpu, "-b", "12", "--pin", "dp=4",
              "--pin", "micro_batch_size=1", "--dtype", "float32", "--out", str(path)])
    assert rc == 0 and Plan.load(path).layout.dp == 4
    return cpu, str(path)


@pytest.mark.parametrize("lost", [1, 2, 3])
def test_cli_replans_a_cpu_cluster_of_one_rank_nodes(cpu_plan, lost: int, capsys) -> None:
    """Losing k one-rank nodes is losing k ranks: the same re-planning as on GPUs, the batch kept."""
    cpu, path = cpu_plan
    capsys.readouterr()
    assert run(["replan", path, "--lost-nodes", str(lost), "-c", cpu, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    layout, record = data["layout"], data["replanned_from"]
    assert (data["num_gpus_available"], data["gpus_per_node"]) == (4 - lost, 1)
    assert layout["dp"] * layout["tp"] * layout["pp"] <= 4 - lost
    assert layout["dp"] * layout["micro_batch_size"] * layout["num_micro_batches"] == 12  # the batch is kept
    assert record["method"] == "templates" and record["global_batch_size"] == 12


def test_replanning_a_cluster_file_needs_the_file(cpu_plan, capsys) -> None:
    assert run(["replan", cpu_plan[1], "--lost-nodes", "1"]) == 2  # the plan names the file's cluster, not a preset
    assert "pass the cluster it was planned for (--cluster)" in capsys.readouterr().err


def test_goodput_bound_holds_for_every_layout_outside_the_top_k(graph, cluster) -> None:
    from autopar.goodput import goodput_bound_outside, rank_by_goodput
    from autopar.pricing import model_shape, run_search
    from autopar.solvers.search import search_steps
    from autopar.solvers.space import build_space

    pricing = LayerPricer(graph, cluster)
    space = build_space(model_shape(graph), num_gpus=cluster.num_gpus, gpus_per_node=8, global_batch_size=BATCH)
    every = run_search(search_steps(space, pricing.prices(), top_k=10_000), pricing).ranked  # all layouts that fit, fastest first
    assert len(every) > 20
    for k in (1, 3, 10):
        bound = goodput_bound_outside(every[:k], complete=False, cluster=cluster, seq_len=512,
                                      peak_flops_per_s=pricing.peak_flops_per_s)
        outside = rank_by_goodput(every[k:], cluster=cluster, seq_len=512)
        assert outside[0][1].goodput_tokens_per_s <= bound
    assert goodput_bound_outside(every, complete=True, cluster=cluster, seq_len=512, peak_flops_per_s=1.0) == 0.0


@pytest.mark.parametrize(("gpus", "batch"), [(1016, 1024), (120, 96), (56, 48)])
def test_restaged_layouts_keep_the_batch_and_fill_the_survivors(gpus: int, batch: int) -> None:
    t = _template(dp=16, tp=2, pp=1, num_micro_batches=2)
    got = restaged_layouts(t, num_gpus=gpus, global_batch_size=batch, num_layers=83, keep=100)
    assert {lay.pp for lay in got} == {pp for pp in range(2, min(83, gpus // 2) + 1)
                                       if any(batch % (d * 2) == 0 for d in range(1, gpus // (2 * pp) + 1))
                                       and batch // (2 * max(d for d in range(1, gpus // (2 * pp) + 1)
                                                             if batch % (d * 2) == 0)) >= pp}
    for lay in got:
        assert lay.global_batch_size == batch and lay.num_gpus <= gpus and lay.tp == 2
        # brute force: the largest data-parallel size that divides the batch on these GPUs
        assert lay.dp == max(d for d in range(1, gpus // (2 * lay.pp) + 1) if batch % (d * 2) == 0)


def test_replan_by_goodput_keeps_the_best_goodput(graph, cluster, ranked) -> None:
    pricing = LayerPricer(graph, cluster)
    kwargs = dict(lost_nodes=1, pricing=pricing, templates=[p.layout for p in ranked])
    fast = replan(ranked[0], **kwargs)
    good = replan(ranked[0], objective="goodput", **kwargs)
    assert good.reliability.goodput_tokens_per_s >= fast.reliability.goodput_tokens_per_s
    assert fast.predicted.tokens_per_s >= good.predicted.tokens_per_s
    assert good.layout.global_batch_size == BATCH
