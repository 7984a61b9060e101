"""Planning time after capture: Llama-70B-shaped on 1,024 H100s and GPT-3-175B on 1,536 A100s.

    python bench/planning_speed.py

Goal: under 10 s each on a 2-core machine (stretch: under 2 s). Prints capture time,
planning time (pricing + search, the whole ``plan_graph``), layouts priced, groups
enumerated and pruned, and the plan found.
"""

from __future__ import annotations

import logging
import time

import torch

import autopar
from autopar.api import plan_graph
from autopar.examples.gpt import GPT, GPTConfig


def llama_70b():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                      num_key_value_heads=8, vocab_size=128256)
    with torch.device("meta"):
        return LlamaForCausalLM(cfg), {"input_ids": torch.zeros(1, 4096, dtype=torch.long, device="meta")}


def gpt_175b():
    with torch.device("meta"):
        model = GPT(GPTConfig.from_name("175b", block_size=2048))
    return model, (torch.zeros(1, 2048, dtype=torch.long, device="meta"),)


class _Counter(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.line = ""

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("search:"):
            self.line = record.getMessage()


def main() -> None:
    counter = _Counter()
    logging.getLogger("autopar.solvers.search").addHandler(counter)
    logging.getLogger("autopar.solvers.search").setLevel(logging.INFO)
    cases = [("llama-70b", llama_70b, "dgx-h100", 128, 1024), ("gpt-175b", gpt_175b, "dgx-a100-80gb", 192, 1536)]
    for name, build, preset, nodes, batch in cases:
        model, inputs = build()
        start = time.perf_counter()
        graph = autopar.capture(model, inputs)
        captured = time.perf_counter() - start
        cluster = autopar.Cluster.preset(preset, nodes=nodes)
        start = time.perf_counter()
        plan = plan_graph(graph, cluster=cluster, global_batch_size=batch)
        planned = time.perf_counter() - start
        p = plan.predicted
        print(f"{name} on {cluster.num_gpus} × {cluster.gpu.name}, global batch {batch}:")
        print(f"  capture {captured:.2f} s, planning {planned:.2f} s ({counter.line})")
        print(f"  plan: {plan.layout.describe()}  step {p.step_time_s:.2f} s, MFU {p.mfu:.1%}, "
              f"peak {p.peak_memory_bytes / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
