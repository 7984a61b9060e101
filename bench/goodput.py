"""Peak-throughput plan vs goodput plan: GPT-3 175B and Llama 3 405B on 1,024 → 16,384 H100s.

    python bench/goodput.py [--gpu-mtbf-hours H] [--sizes 1024,4096,16384] [--models gpt:175b]

For each cluster size it plans once (the search's 64 fastest layouts, re-ranked by goodput)
and prints the fastest plan and the plan with the highest expected goodput, each with its
throughput, goodput, checkpoint interval and layout; where they differ, the note says which
goodput terms made the difference. Failure rates: Meta's Llama 3 report (per-GPU MTBF
86,333 h and per-node MTBF 15,338 h, i.e. a failure every 3.09 h on 16,384 GPUs) unless
``--gpu-mtbf-hours`` overrides the per-GPU figure. Storage: 2 TB/s aggregate (Llama 3's
Tectonic), 400 Gb/s per node; restart 10 min (an assumption; see cost_models/reliability.py).
This is a model's prediction, not a measurement.
"""

from __future__ import annotations

import argparse
import time

import autopar
from autopar.api import plan_graph_ranked
from autopar.goodput import goodput_differences
from autopar.models import resolve_model

MODELS = (("GPT-3 175B", "gpt:175b", 2048, 1536), ("Llama 3 405B", "llama:405b", 8192, 2048))
"""(name, model spec, sequence length, global batch in sequences): GPT-3's 3.2M-token batch (Brown et al.
2020, Table 2.1); Llama 3 405B's 16M-token batch (Dubey et al. 2024, §3.4.1)."""
SIZES = (1024, 2048, 4096, 8192, 16384)
"""GPUs (DGX H100 nodes of 8)."""


def _row(label: str, plan: autopar.Plan) -> str:
    r = plan.reliability
    assert r is not None
    return (f"    {label:<8} {plan.predicted.tokens_per_s / 1e6:7.3f} M tok/s  goodput {r.goodput_tokens_per_s / 1e6:7.3f} "
            f"M tok/s ({r.goodput_fraction:5.1%})  ckpt {r.mode.value:>5} every {r.interval_steps:4d} steps "
            f"= {r.interval_s / 60:5.1f} min  MTBF {r.mtbf_s / 3600:5.2f} h  {plan.layout.describe()} "
            f"({plan.layout.num_gpus} GPUs)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu-mtbf-hours", type=float, default=None)
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    parser.add_argument("--candidates", type=int, default=64)
    parser.add_argument("--models", default=",".join(spec for _, spec, _, _ in MODELS))
    args = parser.parse_args()
    reliability = {} if args.gpu_mtbf_hours is None else {"gpu_mtbf_hours": args.gpu_mtbf_hours}
    for name, spec, seq, batch in MODELS:
        if spec not in args.models.split(","):
            continue
        start = time.perf_counter()
        resolved = resolve_model(spec, seq_len=seq)
        graph = autopar.capture(resolved.module, resolved.example_inputs)
        print(f"{name}, seq {seq}, global batch {batch} (captured in {time.perf_counter() - start:.0f} s)")
        for gpus in map(int, args.sizes.split(",")):
            cluster = autopar.Cluster.from_dict({"preset": "dgx-h100", "nodes": gpus // 8, "reliability": reliability})
            start = time.perf_counter()
            plans = plan_graph_ranked(graph, cluster=cluster, global_batch_size=batch, top_k=args.candidates,
                                      objective="goodput")
            peak = min(plans, key=lambda p: p.predicted.step_time_s)
            best = plans[0]
            print(f"  {gpus} GPUs (planned in {time.perf_counter() - start:.0f} s; {best.explanation[1].strip()})")
            print(_row("peak", peak))
            print(_row("goodput", best))
            if best.layout == peak.layout:
                print("    same plan: no faster layout loses less to failures and checkpoints")
            else:
                gain = best.reliability.goodput_tokens_per_s / peak.reliability.goodput_tokens_per_s - 1
                cost = 1 - best.predicted.tokens_per_s / peak.predicted.tokens_per_s
                print(f"    differ: the goodput plan gives up {cost:.1%} of throughput for {gain:+.1%} goodput: "
                      + "; ".join(goodput_differences(best.reliability, peak.reliability)))


if __name__ == "__main__":
    main()
