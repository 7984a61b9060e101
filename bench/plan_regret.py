"""Predicted vs measured: every layout autopar can emit, run for real on this machine's gloo ranks.

    python bench/plan_regret.py                       # GPT + Llama (HF) on 2 and 4 ranks (~10-15 min on 2 busy cores)
    python bench/plan_regret.py --models gpt --ranks 2   # one case (~2 min)
    python bench/plan_regret.py --models gpt --ranks 2 --memory-only   # the memory column only (~1 min)

For each model and rank count N:

1. measure this machine as a cluster of N ranks (``autopar profile --ranks N``'s code: per-rank
   compute with N processes busy, gloo alpha-beta fits) and time the model's ops the same way, at every
   micro-batch size a plan can use (the model captured at each);
2. plan on that cluster with the op table (fp32, the CPU's dtype) and keep every ranked layout
   (dp/tp/pp, micro-batch, ZeRO stage, recompute, SP, schedule);
3. run each layout with ``autopar.parallelize`` (AdamW), steps repeated until their minimum is
   stable (the step alone, on a shared machine; the median and spread are printed too), in two passes,
   the second in reverse order (a slow spell of the machine then hits one pass of a layout), and take
   each rank's peak live tensor bytes (see ``regret_worker.py`` for both mechanisms); a layout on
   fewer ranks than the cluster runs alone, its other ranks idle, as the planner priced it (with more
   ranks than cores, the busy ones take turns on them: ``Cluster.host_cores``);
4. print predicted vs measured step time and memory per layout, Spearman's rho, the regret of
   autopar's own choice (its measured time over the fastest measured, minus 1), the memory error,
   and save a scatter chart.

Predicted memory is the plan's tensors (weights, gradients, optimizer states and temporaries, activations,
communication buffers): the plan's total without the GPU runtime's reservation and the allocator's headroom.
Timings are noisy on a shared machine: each layout's spread (IQR / median) is printed.

``--memory-only`` runs each layout for the warm-up steps and the one measured step that peak memory needs and
skips the timing loop (no time column, Spearman or regret). Memory does not depend on load, so it can run
while other processes use the machine; the cluster is still measured, since the plans (the sharding ILP's
choices) are made on it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import regret_worker  # noqa: E402

import autopar  # noqa: E402
from autopar.cost_models.memory import ALLOCATOR_HEADROOM, RUNTIME_RESERVED_BYTES  # noqa: E402
from autopar.cost_models.profiling.fidelity import regret, relative_error, spearman  # noqa: E402
from autopar.cost_models.profiling.local_cluster import cluster_yaml, measure_local_cluster, run_and_gather  # noqa: E402
from autopar.cost_models.profiling.local_worker import free_port  # noqa: E402

log = logging.getLogger("plan_regret")

SEQ_LEN = 128
VOCAB = 2048
GLOBAL_BATCH = 8
CAPTURE_BATCH = 2
"""Batch the model is captured (and planned) at."""
MICRO_BATCHES = (1, 2, 4, 8)
"""Micro-batch sizes a plan can use (up to the global batch); the ops are timed at each."""
MODELS: dict[str, dict[str, Any]] = {
    # ~0.1-0.5 s a step on 2 single-threaded ranks
    "gpt": {"family": "gpt", "seq_len": SEQ_LEN, "vocab": VOCAB,
            "config": {"n_layer": 4, "n_embd": 128, "n_head": 4, "vocab_size": VOCAB, "block_size": SEQ_LEN,
                       "dropout": 0.0}},
    "llama": {"family": "llama", "seq_len": SEQ_LEN, "vocab": VOCAB,
              "config": {"hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 4,
                         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": VOCAB,
                         "max_position_embeddings": SEQ_LEN, "attn_implementation": "eager", "use_cache": False}},
}


def predicted_live_bytes(plan: Any) -> float:
    """The plan's tensors on its fullest rank: weights, gradients, optimizer states, activations, communication
    buffers and the optimizer's temporaries; not the GPU runtime's reservation or the caching allocator's
    headroom (``memory.estimate_rank_memory``), which a CPU rank does not have."""
    return max(m.total / (1 + ALLOCATOR_HEADROOM) - RUNTIME_RESERVED_BYTES for m in plan.predicted.memory)


def run_case(name: str, ranks: int, out_dir: Path, memory_only: bool = False, passes: int = 2) -> dict[str, Any]:
    spec = MODELS[name]
    model = regret_worker.build_model(spec)
    example = (torch.zeros(CAPTURE_BATCH, SEQ_LEN, dtype=torch.long),)
    graph = autopar.capture(model, example)
    others = {b / CAPTURE_BATCH: autopar.capture(model, (torch.zeros(b, SEQ_LEN, dtype=torch.long),))
              for b in MICRO_BATCHES if b != CAPTURE_BATCH}
    t0 = time.perf_counter()
    measured = measure_local_cluster(ranks, graph=graph, batch_graphs=others)
    yaml_path, calib_path = out_dir / f"{name}_local{ranks}.yaml", out_dir / f"{name}_local{ranks}_calib.json"
    yaml_path.write_text(cluster_yaml(measured, name=f"local{ranks}"))
    assert measured.calibration is not None
    measured.calibration.save(calib_path)
    log.info("%s on %d ranks: cluster measured in %.0f s", name, ranks, time.perf_counter() - t0)
    plans = autopar.plan_ranked(model, example, cluster=yaml_path, global_batch_size=GLOBAL_BATCH, dtype="float32",
                                calibration=measured.calibration, top_k=1000)
    by_size: dict[int, list[Any]] = defaultdict(list)
    for p in plans:
        by_size[p.layout.num_gpus].append(p)
    results: dict[str, dict[str, Any]] = {}
    for world, group in sorted(by_size.items()):
        results.update(_run_group(world, spec, group, memory_only, passes))
    rows = [{"layout": p.layout.describe(), "predicted_s": p.predicted.step_time_s,
             "predicted_bytes": predicted_live_bytes(p), "predicted_memory": [dataclasses.asdict(m) for m in p.predicted.memory],
             **results.get(p.layout.describe(), {"error": "not run"})}
            for p in plans]
    return {"model": name, "ranks": ranks, "rows": rows, "chosen": plans[0].layout.describe()}


def _run_group(world: int, spec: dict[str, Any], plans: list[Any],
               memory_only: bool = False, passes: int = 2) -> dict[str, dict[str, Any]]:
    """Run ``plans`` (each on ``world`` ranks) one after another in one job of ``world`` processes."""
    texts = [p.to_json(indent=None) for p in plans]
    if not memory_only and passes > 1:  # a second pass, in reverse: a slow spell of the machine hits one pass
        texts += texts[::-1]
    # read while the job runs: a long run of results would otherwise fill the queue's pipe and block both sides
    reported = run_and_gather(regret_worker.run_rank, (world, free_port(), spec, texts), (memory_only,), world)
    out: dict[str, dict[str, Any]] = {}
    for r in reported:
        seen = out.setdefault(r.pop("layout"), r)
        if seen is not r and "samples" in r and "samples" in seen:
            seen["samples"] = seen["samples"] + r["samples"]
            seen.update(regret_worker.timing_summary(seen["samples"]))
    return out


def summarize(case: dict[str, Any]) -> dict[str, float]:
    ok = [r for r in case["rows"] if "min_s" in r]
    pred, meas = [r["predicted_s"] for r in ok], [r["min_s"] for r in ok]
    chosen = next((r for r in ok if r["layout"] == case["chosen"]), None)
    mem_err = [abs(relative_error(r["predicted_bytes"], r["peak_bytes"])) for r in case["rows"]
               if r.get("peak_bytes", 0) > 0]
    return {"layouts": len(case["rows"]), "ran": len(ok),
            "spearman": spearman(pred, meas) if len(ok) >= 2 else math.nan,
            "regret": regret(chosen["min_s"], meas) if chosen else math.nan,
            "time_err_median": statistics.median(relative_error(p, m) for p, m in zip(pred, meas)) if ok else math.nan,
            "mem_err_median": statistics.median(mem_err) if mem_err else math.nan,
            "mem_err_max": max(mem_err) if mem_err else math.nan}


def print_case(case: dict[str, Any], summary: dict[str, float]) -> None:
    print(f"\n== {case['model']} on {case['ranks']} gloo ranks: autopar's choice {case['chosen']}")
    print(f"{'layout':44s} {'pred s':>8s} {'min s':>8s} {'median':>8s} {'spread':>7s} {'pred MB':>8s} {'meas MB':>8s}")
    for r in case["rows"]:
        if "min_s" not in r and "peak_bytes" in r:  # --memory-only
            print(f"{r['layout']:44s} {r['predicted_s']:8.3f} {'':35s}{r['predicted_bytes'] / 1e6:8.1f} "
                  f"{r['peak_bytes'] / 1e6:8.1f} {relative_error(r['predicted_bytes'], r['peak_bytes']):+7.1%}")
            continue
        if "min_s" not in r:
            print(f"{r['layout']:44s} {r['predicted_s']:8.3f}  not run: {r['error']}")
            continue
        print(f"{r['layout']:44s} {r['predicted_s']:8.3f} {r['min_s']:8.3f} {r['median_s']:8.3f} {r['spread']:7.1%} "
              f"{r['predicted_bytes'] / 1e6:8.1f} {r['peak_bytes'] / 1e6:8.1f}")
    print(f"ran {summary['ran']}/{summary['layouts']}: Spearman {summary['spearman']:.3f}, regret of autopar's "
          f"choice {summary['regret']:.1%}, time error median {summary['time_err_median']:+.1%}, memory error "
          f"median {summary['mem_err_median']:.1%} (max {summary['mem_err_max']:.1%})")


def chart(cases: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 6))
    for case in cases:
        ok = [r for r in case["rows"] if "min_s" in r]
        ax.scatter([r["min_s"] for r in ok], [r["predicted_s"] for r in ok], s=14,
                   label=f"{case['model']}, {case['ranks']} ranks")
        chosen = [r for r in ok if r["layout"] == case["chosen"]]
        ax.scatter([r["min_s"] for r in chosen], [r["predicted_s"] for r in chosen], s=80, facecolors="none",
                   edgecolors="black")
    lim = [min(ax.get_xlim()[0], ax.get_ylim()[0]), max(ax.get_xlim()[1], ax.get_ylim()[1])]
    ax.plot(lim, lim, "k--", lw=0.8)
    ax.set(xlabel="measured step time (s)", ylabel="predicted step time (s)",
           title="autopar: predicted vs measured (circled: autopar's choice)")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120, bbox_inches="tight")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--ranks", nargs="+", type=int, default=[2, 4])
    parser.add_argument("--out", type=Path, default=Path("bench/out/plan_regret"))
    parser.add_argument("--memory-only", action="store_true",
                        help="measure peak memory only: the few steps it needs, no timing loop")
    parser.add_argument("--passes", type=int, choices=(1, 2), default=2,
                        help="timing passes over the layouts (2: the second in reverse order)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    cases = []
    for ranks in args.ranks:
        for name in args.models:
            case = run_case(name, ranks, args.out, args.memory_only, args.passes)
            summary = summarize(case)
            case["summary"] = summary
            print_case(case, summary)
            cases.append(case)
            (args.out / "results.json").write_text(json.dumps(cases, indent=1))
    if args.memory_only:
        return
    chart(cases, args.out / "predicted_vs_measured.png")
    print(f"\nchart: {args.out / 'predicted_vs_measured.png'}; total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
