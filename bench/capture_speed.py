"""Time the capture of big models on the meta device (goal: Llama-70B-shaped under 30 s on 2 cores).

    python bench/capture_speed.py [--seq 4096]

Prints, per model: capture wall time, capture path, parameters, layers and kinds,
and forward FLOPs per token.
"""

from __future__ import annotations

import argparse
import time

import torch

import autopar
from autopar.examples.gpt import GPT, GPTConfig


def llama_70b():
    """A Llama-3-70B-shaped Hugging Face model on meta (hidden 8192, 80 layers, GQA 64/8, vocab 128256)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192)
    with torch.device("meta"):
        return LlamaForCausalLM(cfg)


def gpt_175b():
    with torch.device("meta"):
        return GPT(GPTConfig.from_name("175b", block_size=2048))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seq", type=int, default=2048)
    args = parser.parse_args()
    print(f"{'model':<12} {'path':<7} {'capture s':>9} {'params':>16} {'layers':>6} {'kinds':>5} {'GFLOP/token':>12}")
    for name, build, kw in [("llama-70b", llama_70b, True), ("gpt-175b", gpt_175b, False)]:
        model = build()
        ids = torch.zeros(1, args.seq, dtype=torch.long, device="meta")
        start = time.perf_counter()
        graph = autopar.capture(model, {"input_ids": ids} if kw else (ids,))
        elapsed = time.perf_counter() - start
        s = graph.summary()
        print(f"{name:<12} {s.capture_method:<7} {elapsed:9.2f} {s.num_params:16,d} {s.num_layers:6d} "
              f"{s.num_layer_kinds:5d} {s.forward_flops / args.seq / 1e9:12.1f}")


if __name__ == "__main__":
    main()
