"""Re-plan time: Llama-3-70B-shaped model on 1,024 H100s losing 1, 2 and 8 nodes.

    python bench/replan.py [--no-search] [--template-contingencies]

Prints, for each failure, the time and result of the three ways ``autopar.replan`` answers:

- contingency: the plan file carries plans precomputed for 1 … 8 lost nodes; re-planning is
  reading the file and a lookup (the time printed includes ``Plan.load``);
- templates: the plan's layout and its runners-up re-priced on the survivors, with the layer
  prices kept from planning (in-process, ``pricing=``);
- search: the full search on the survivors with the same warm prices (what the others save).

Target: under 1 s. Timings on a shared 2-core machine are noisy.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import autopar
from autopar.goodput import Objective, rank_plans
from autopar.models import resolve_model
from autopar.pricing import LayerPricer, model_shape, run_search
from autopar.replanning import precompute_contingencies, replan
from autopar.solvers.search import search_steps
from autopar.solvers.space import build_space

NODES, BATCH, SEQ = 128, 1024, 4096
"""1,024 GPUs in DGX H100 nodes; global batch and sequence length as in bench/planning_speed.py."""
LOST = (1, 2, 8)
"""Nodes lost."""
TEMPLATES = 8
"""Ranked plans kept from planning as pipeline templates."""


def _line(how: str, seconds: float, plan: autopar.Plan) -> str:
    rec = plan.replanned_from
    assert rec is not None
    return (f"    {how:<12} {seconds:8.3f} s  {plan.layout.describe():<44} "
            f"{plan.predicted.tokens_per_s / 1e3:8.1f} k tok/s  batch {plan.layout.global_batch_size}  "
            f"[{'; '.join(rec.changes) or 'no change'}]")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-search", action="store_true", help="skip the full-search comparison")
    parser.add_argument("--template-contingencies", action="store_true",
                        help="precompute contingencies from templates (seconds) instead of full searches (minutes)")
    args = parser.parse_args()
    resolved = resolve_model("llama:70b", seq_len=SEQ)
    start = time.perf_counter()
    graph = autopar.capture(resolved.module, resolved.example_inputs)
    cluster = autopar.Cluster.preset("dgx-h100", nodes=NODES)
    print(f"llama:70b seq {SEQ}, global batch {BATCH}, {cluster.num_gpus} × {cluster.gpu.name} "
          f"(captured in {time.perf_counter() - start:.1f} s)")
    start = time.perf_counter()
    pricing = LayerPricer(graph, cluster)  # kept from planning: its layer prices are what re-planning reuses
    space = build_space(model_shape(graph), num_gpus=cluster.num_gpus, gpus_per_node=8, global_batch_size=BATCH)
    result = run_search(search_steps(space, pricing.prices(), top_k=TEMPLATES + 1), pricing)
    plans = rank_plans(Objective.THROUGHPUT, result.ranked, graph, pricing, cluster=cluster, keep=TEMPLATES,
                       complete=False, dtype="bfloat16")
    plans = [p.__class__.from_dict({**p.to_dict(), "model_name": "llama:70b"}) for p in plans]
    plan, templates = plans[0], [p.layout for p in plans]
    print(f"  plan: {plan.layout.describe()} ({time.perf_counter() - start:.1f} s to plan)")
    start = time.perf_counter()
    with_c = precompute_contingencies(plan, max_lost_nodes=max(LOST), pricing=pricing, templates=templates,
                                      exhaustive=not args.template_contingencies)
    print(f"  contingencies for 1 … {max(LOST)} lost nodes precomputed in {time.perf_counter() - start:.1f} s")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "plan.json"
        with_c.save(path)
        for k in LOST:
            print(f"  losing {k} node(s): {cluster.num_gpus - 8 * k} GPUs left")
            start = time.perf_counter()
            cached = replan(autopar.Plan.load(path), lost_nodes=k)
            print(_line("contingency", time.perf_counter() - start, cached))
            start = time.perf_counter()
            fresh = replan(plan, lost_nodes=k, pricing=pricing, templates=templates)
            print(_line("templates", time.perf_counter() - start, fresh))
            if not args.no_search:
                start = time.perf_counter()
                full = replan(plan, lost_nodes=k, pricing=pricing, exhaustive=True)
                print(_line("search", time.perf_counter() - start, full))


if __name__ == "__main__":
    main()
