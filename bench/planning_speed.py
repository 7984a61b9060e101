"""Planning time after capture, and how it grows with the cluster and with the model's depth.

    python bench/planning_speed.py            # the named cases and both curves
    python bench/planning_speed.py --cases    # only the named cases
    python bench/planning_speed.py --curves   # only the two curves
    python bench/planning_speed.py --depth    # only the curve over identical layers

Targets (issue 11): Llama-70B on 1,024 H100s and GPT-3 175B on 1,536 A100s in under 2 s each,
Llama-3 405B on 16,384 H100s in under 5 s, and a "does not fit" answer (10T parameters on 8 GPUs)
in under 5 s. The curves: planning time over 64 → 16,384 GPUs (GPT-3 175B, one sample per GPU),
and over 32 → 320 identical layers (flat: at most 1.5× between the ends). Times are wall-clock
on this machine: on a shared one, compare figures from one run only.
"""

from __future__ import annotations

import argparse
import logging
import resource
import time
from collections.abc import Callable
from typing import Any

import torch

import autopar
from autopar.api import plan_graph
from autopar.examples.gpt import GPT, GPTConfig
from autopar.graph.ir import OpGraph


def llama(hidden: int, ffn: int, layers: int, heads: int, kv_heads: int, seq: int) -> tuple[Any, Any]:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, vocab_size=128256)
    with torch.device("meta"):
        return LlamaForCausalLM(cfg), {"input_ids": torch.zeros(1, seq, dtype=torch.long, device="meta")}


def gpt(config: GPTConfig) -> tuple[Any, Any]:
    with torch.device("meta"):
        model = GPT(config)
    return model, (torch.zeros(1, config.block_size, dtype=torch.long, device="meta"),)


def llama_70b() -> tuple[Any, Any]:
    return llama(8192, 28672, 80, 64, 8, 4096)


def llama3_405b() -> tuple[Any, Any]:
    return llama(16384, 53248, 126, 128, 8, 8192)  # Llama 3 paper, Table 3


def gpt_175b() -> tuple[Any, Any]:
    return gpt(GPTConfig.from_name("175b", block_size=2048))


def gpt_10t() -> tuple[Any, Any]:
    return gpt(GPTConfig(n_layer=200, n_embd=65536, n_head=512, block_size=2048))  # 12·L·h² ≈ 10.3e12


class _Counter(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.line = ""

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("search:"):
            self.line = record.getMessage()


COUNTER = _Counter()


def _capture(build: Callable[[], tuple[Any, Any]]) -> tuple[OpGraph, float]:
    model, inputs = build()
    start = time.perf_counter()
    graph = autopar.capture(model, inputs)
    return graph, time.perf_counter() - start


def _cpu_s() -> float:
    """CPU seconds of this process and its finished children (the ILP's CBC runs as one)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def _plan(graph: OpGraph, cluster: autopar.Cluster, batch: int) -> tuple[str, float]:
    """(what came out, seconds) of planning ``graph`` after capture."""
    start = time.perf_counter()
    try:
        plan = plan_graph(graph, cluster=cluster, global_batch_size=batch)
        p = plan.predicted
        outcome = (f"{plan.layout.describe()}  step {p.step_time_s:.2f} s, MFU {p.mfu:.1%}, "
                   f"peak {p.peak_memory_bytes / 2**30:.1f} GiB")
    except autopar.InfeasiblePlanError as e:
        outcome = f"does not fit: {str(e)[:120]}…"
    return outcome, time.perf_counter() - start


def cases() -> None:
    table = [("llama-70b", llama_70b, "dgx-h100", 128, 1024, 2.0),
             ("gpt-175b", gpt_175b, "dgx-a100-80gb", 192, 1536, 2.0),
             ("llama3-405b", llama3_405b, "dgx-h100", 2048, 2048, 5.0),
             ("gpt-10t (does not fit)", gpt_10t, "dgx-h100", 1, 64, 5.0)]
    for name, build, preset, nodes, batch, target in table:
        graph, captured = _capture(build)
        cluster = autopar.Cluster.preset(preset, nodes=nodes)
        outcome, planned = _plan(graph, cluster, batch)
        print(f"{name} on {cluster.num_gpus} × {cluster.gpu.name}, global batch {batch}:", flush=True)
        print(f"  capture {captured:.2f} s, planning {planned:.2f} s (target {target:.0f} s) ({COUNTER.line})")
        print(f"  {outcome}", flush=True)


def curves() -> None:
    gpus_curve()
    depth_curve()


def gpus_curve() -> None:
    graph, _ = _capture(gpt_175b)
    print("planning time over GPUs (GPT-3 175B on dgx-a100-80gb, one sample per GPU):", flush=True)
    times = []
    for nodes in (8, 32, 128, 512, 2048):
        cluster = autopar.Cluster.preset("dgx-a100-80gb", nodes=nodes)
        outcome, planned = _plan(graph, cluster, cluster.num_gpus)
        times.append(planned)
        print(f"  {cluster.num_gpus:>6} GPUs  {planned:6.2f} s  {outcome}", flush=True)
    print(f"  largest / smallest: {max(times) / min(times):.2f}×")


def depth_curve(repeats: int = 5) -> None:
    print("planning time over identical layers (GPT, h = 5120, on 64 × H100, global batch 512; the least of "
          f"{repeats} runs each, the sizes taking turns, after one run to warm up):", flush=True)
    cluster = autopar.Cluster.preset("dgx-h100", nodes=8)
    graphs = {layers: _capture(lambda: gpt(GPTConfig(n_layer=layers, n_embd=5120, n_head=40, block_size=2048)))[0]
              for layers in (32, 64, 128, 192, 256, 320)}
    _plan(graphs[32], cluster, 512)  # the first plan in a process also pays for lazy imports and first calls
    runs: dict[int, list[tuple[float, float]]] = {layers: [] for layers in graphs}
    outcomes = {}
    for _ in range(repeats):  # in turns, so a machine that slows down or speeds up weighs on every size alike
        for layers, graph in graphs.items():
            used = _cpu_s()
            outcomes[layers], planned = _plan(graph, cluster, 512)
            runs[layers].append((planned, _cpu_s() - used))  # CPU time: less sensitive to other work on the machine
    times = [min(wall for wall, _ in r) for r in runs.values()]
    cpu = [min(c for _, c in r) for r in runs.values()]
    for layers, wall, c in zip(graphs, times, cpu):
        print(f"  {layers:>4} layers  {wall:6.2f} s ({c:5.2f} s CPU)  {outcomes[layers]}", flush=True)
    print(f"  320 layers / 32 layers: {times[-1] / times[0]:.2f}× ({cpu[-1] / cpu[0]:.2f}× in CPU time) "
          f"(target at most 1.5×)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", action="store_true", help="only the named cases")
    parser.add_argument("--curves", action="store_true", help="only the two curves")
    parser.add_argument("--depth", action="store_true", help="only the curve over identical layers")
    args = parser.parse_args()
    logging.getLogger("autopar.solvers.search").addHandler(COUNTER)
    logging.getLogger("autopar.solvers.search").setLevel(logging.INFO)
    if args.depth:
        depth_curve()
        return
    if not args.curves:
        cases()
    if not args.cases:
        curves()


if __name__ == "__main__":
    main()
