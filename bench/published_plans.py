"""Sanity check against published layouts: Alpa's GPT plans on V100s and Llama 3 405B on H100s.

    python bench/published_plans.py                          # everything (~10 min on 2 busy cores)
    python bench/published_plans.py torchtitan breakdown     # the torchtitan runs and the 8B term by term
    python bench/published_plans.py bounds                   # the compiled Float8 runs between autopar's program and
                                                             # upper bounds of the mechanisms it lacks

Plans each setting of ../shared/reference/published-results.md freely (nothing pinned
but the GPU count and batch) and prints the chosen layout and predicted throughput next
to the published layout and throughput. This is a sanity check, not a tuning target.
"""

from __future__ import annotations

import dataclasses
import time

import torch

import autopar
from autopar.api import plan_graph
from autopar.examples.gpt import GPT, GPTConfig

# Alpa, 8 × p3.16xlarge, GPT seq 1024, V 51200, global batch 1024: (name, hidden, layers, heads, GPUs, published)
ALPA = [
    ("GPT-39B", 8192, 48, 64, 64, "PP16 TP4 DP1 (16 stages × (1,4))"),
    ("GPT-15B", 5120, 48, 40, 32, "PP4 TP8 (4 stages × (1,8))"),
    ("GPT-6.7B", 4096, 32, 32, 16, "PP2 TP8 (2 stages × (1,8))"),
    ("GPT-2.6B", 2560, 32, 32, 8, "PP3, uneven TP 2/2/4"),
]
LLAMA_405B = [(8192, 16 * 2**20 // 8192, "TP8 PP16 DP64, 430 TFLOP/s/GPU, MFU 43%"),
              (16384, 16 * 2**20 // 8192, "TP8 PP16 DP128, 400 TFLOP/s/GPU, MFU 41%")]
"""(GPUs, global batch in sequences: 16M tokens / 8,192, published layout and throughput)."""


def _row(label: str, plan: autopar.Plan, published: str, seconds: float) -> None:
    p = plan.predicted
    print(f"  {label}: {plan.layout.describe()}  {p.model_tflops_per_gpu:.0f} TFLOP/s/GPU, MFU {p.mfu:.1%}, "
          f"{p.tokens_per_s:,.0f} tok/s  (planned in {seconds:.1f} s)")
    print(f"  {'published':>{len(label)}}: {published}")


def alpa() -> None:
    print("Alpa GPT on p3.16xlarge (V100 16GB), seq 1024, global batch 1024")
    for name, hidden, layers, heads, gpus, published in ALPA:
        cfg = GPTConfig(n_layer=layers, n_embd=hidden, n_head=heads, vocab_size=51200, block_size=1024)
        with torch.device("meta"):
            model = GPT(cfg)
        graph = autopar.capture(model, (torch.zeros(1, 1024, dtype=torch.long, device="meta"),))
        start = time.perf_counter()
        try:
            plan = plan_graph(graph, cluster=autopar.Cluster.preset("v100-p3", nodes=gpus // 8),
                              global_batch_size=1024, dtype="float16")
        except autopar.InfeasiblePlanError as e:  # the emitted program's states may not fit where Alpa's did
            print(f"  {name}: no plan fits: {e}\n  {'published':>{len(name)}}: {published}")
            continue
        _row(name, plan, published, time.perf_counter() - start)


def llama_405b() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    print("Llama 3 405B on H100 (Dubey et al. 2024, Table 4), seq 8192")
    cfg = LlamaConfig(hidden_size=16384, intermediate_size=53248, num_hidden_layers=126, num_attention_heads=128,
                      num_key_value_heads=8, vocab_size=128256)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    graph = autopar.capture(model, {"input_ids": torch.zeros(1, 8192, dtype=torch.long, device="meta")})
    for gpus, batch, published in LLAMA_405B:
        start = time.perf_counter()
        plan = plan_graph(graph, cluster=autopar.Cluster.preset("dgx-h100", nodes=gpus // 8), global_batch_size=batch)
        _row(f"{gpus} GPUs", plan, published, time.perf_counter() - start)


def _llama(hidden: int, ffn: int, layers: int, heads: int, kv: int, seq: int,
           dtype: torch.dtype = torch.float32) -> autopar.OpGraph:
    """A Llama captured on meta; ``dtype=torch.bfloat16`` captures it as eager bf16 training runs it, so the
    model's own fp32 upcasts (RMSNorm's ``x.float()``) stay visible to the cost model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, vocab_size=128256)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg).to(dtype)
    return autopar.capture(model, {"input_ids": torch.zeros(1, seq, dtype=torch.long, device="meta")})


TORCHTITAN_CLUSTER = "h100-hbm2e-96gb"
"""The benchmark's own hardware (llama3_h100_202412_torchtitan.md, "Hardware"): H100s with 96 GB HBM2e at
2.4 TB/s and a 500 W limit, not the DGX H100's 80 GB HBM3 at 3.35 TB/s."""
TORCHTITAN_PP_MICROBATCHES = 8
"""torchtitan at the benchmark's commit (9dec370, 2024-12-26) splits a pipelined batch into
``experimental.pipeline_parallel_microbatches`` or, unset as in the benchmark, ``pipeline_parallel_degree``
micro-batches (torchtitan/parallelisms/pipelining_utils.py, build_pipeline_schedule): 8, so the local batch
of 32 runs as 8 micro-batches of 4; an interleaved schedule gets 2 stages per rank (generate_split_points)."""
TORCHTITAN_PP_ZERO = 2
"""torchtitan's FSDP under pipelining at the benchmark's commit (torchtitan/parallelisms/parallelize_llama.py,
``apply_fsdp``): "For PP, do not reshard after forward to avoid per-microbatch all-gathers" —
``fully_shard(..., reshard_after_forward=False)`` on every block and the root, which is autopar's ZeRO 2
(``emit/dp.py``: gathered once per step, kept to the last backward), not ZeRO 3's gathers per micro-batch."""


TORCHTITAN_CAPTURE = torch.bfloat16
"""The 8B run (Table 1, "FSDP") is eager bf16 (FSDP2 MixedPrecisionPolicy(param_dtype=bfloat16), no
torch.compile): captured in bf16, the norms' deliberate fp32 upcasts are priced at 4 bytes each."""
COMPILED_CAPTURE = torch.float32
"""The 405B runs (Table 5) use torch.compile + Float8 + AsyncTP. autopar prices neither Inductor's fusion nor
Float8 GEMMs; an fp32 capture (upcasts invisible, every tensor at bf16 width) is the nearer description of
the fused kernels, and both gaps leave the 405B prediction pessimistic."""


_MBS_405B = 32 // TORCHTITAN_PP_MICROBATCHES  # local batch 32 (global 256 over FSDP 8)
TORCHTITAN_RUNS = [
    ("Llama 3 8B, FSDP 8", (4096, 14336, 32, 32, 8), TORCHTITAN_CAPTURE, 8, 16,
     dict(dp=8, tp=1, pp=1, zero_stage=3, micro_batch_size=2), 5762),  # local batch 2, no accumulation
    ("Llama 3 8B, FSDP 128", (4096, 14336, 32, 32, 8), TORCHTITAN_CAPTURE, 128, 256,
     dict(dp=128, tp=1, pp=1, zero_stage=3, micro_batch_size=2), 5605),
    ("Llama 3 70B, FSDP32 TP8 (compile + Float8)", (8192, 28672, 80, 64, 8), COMPILED_CAPTURE, 256, 512,
     dict(dp=32, tp=8, pp=1, zero_stage=3, micro_batch_size=16, recompute="full"), 829),  # Table 4, full AC
    ("Llama 3.1 405B, FSDP8 TP8 PP8 1F1B", (16384, 53248, 126, 128, 8), COMPILED_CAPTURE, 512, 256,
     dict(dp=8, tp=8, pp=8, zero_stage=TORCHTITAN_PP_ZERO, schedule="1f1b", micro_batch_size=_MBS_405B), 100),
    ("Llama 3.1 405B, FSDP8 TP8 PP8 interleaved", (16384, 53248, 126, 128, 8), COMPILED_CAPTURE, 512, 256,
     dict(dp=8, tp=8, pp=8, zero_stage=TORCHTITAN_PP_ZERO, schedule="interleaved-1f1b", virtual_stages=2,
          micro_batch_size=_MBS_405B), 128),
]
"""torchtitan's H100 runs in published-results.md: (label, Llama shape, capture dtype, GPUs, global batch, the
layout as run, published tokens/s per GPU). The compiled ones (``COMPILED_CAPTURE``) ran compile + Float8, the
405B ones also async TP (the 70B one published 876 with it)."""


def torchtitan() -> None:
    """torchtitan's H100 runs (benchmarks/llama3_h100_202412_torchtitan.md), layouts pinned, seq 8192."""
    print(f"torchtitan on {TORCHTITAN_CLUSTER}, layouts pinned, seq 8192: predicted vs published tokens/s per GPU")
    graphs: dict[tuple[object, ...], autopar.OpGraph] = {}
    for label, shape, capture, gpus, batch, pins, published in TORCHTITAN_RUNS:
        graph = graphs.setdefault((*shape, capture), _llama(*shape, seq=8192, dtype=capture))
        try:
            plan = plan_graph(graph, cluster=autopar.Cluster.preset(TORCHTITAN_CLUSTER, nodes=gpus // 8),
                              global_batch_size=batch, constraints=pins)
        except autopar.InfeasiblePlanError as e:  # autopar's program (whole-vocabulary loss) may not fit
            print(f"  {label}: published {published:,} tok/s/GPU; {e}")
            continue
        per_gpu = plan.predicted.tokens_per_s / plan.layout.num_gpus
        print(f"  {label}: {plan.layout.describe()}  predicted {per_gpu:,.0f} tok/s/GPU, published {published:,}, "
              f"ratio {per_gpu / published:.3f}, MFU {plan.predicted.mfu:.1%}")


def _what_if(nodes: int, *, tp_free: bool = False, float8: bool = False) -> autopar.Cluster:
    """The torchtitan cluster with an upper bound of one of the published runs' mechanisms that autopar's
    program lacks: ``tp_free``, asynchronous TP hiding every intra-node (TP) collective under the matmuls
    (NVLink made free); ``float8``, Float8 GEMMs at the H100 data sheet's FP8 rate, twice bf16, with no cast
    kernels (the bf16 tensor peak doubled: attention and the output head too, so a bound, not a price)."""
    cluster = autopar.Cluster.preset(TORCHTITAN_CLUSTER, nodes=nodes)
    if tp_free:
        link = dataclasses.replace(cluster.intra_node, bytes_per_s=cluster.intra_node.bytes_per_s * 1e6, latency_s=1e-12)
        cluster = dataclasses.replace(cluster, intra_node=link)
    if float8:
        peaks = {**cluster.gpu.peak_flops_per_s, "bfloat16": 2 * cluster.gpu.peak_flops_per_s["bfloat16"]}
        cluster = dataclasses.replace(cluster, gpu=dataclasses.replace(cluster.gpu, peak_flops_per_s=peaks))
    return cluster


def torchtitan_bounds() -> None:
    """The torchtitan runs that used torch.compile + Float8 (+ async TP), priced as autopar's eager program and
    with each missing mechanism at its upper bound: where the published figure falls between them."""
    print(f"torchtitan's compiled Float8 runs on {TORCHTITAN_CLUSTER}: tokens/s per GPU (ratio to published), "
          "autopar's program and upper bounds of the mechanisms it lacks")
    bounds = (("autopar's program", {}), ("+ async TP hiding all TP", dict(tp_free=True)),
              ("Float8 at 2x, TP exposed", dict(float8=True)), ("both", dict(tp_free=True, float8=True)))
    graphs: dict[tuple[int, ...], autopar.OpGraph] = {}
    for label, shape, capture, gpus, batch, pins, published in TORCHTITAN_RUNS:
        if capture is not COMPILED_CAPTURE:
            continue
        graph = graphs.setdefault(shape, _llama(*shape, seq=8192, dtype=capture))
        cells = []
        for name, what_if in bounds:
            plan = plan_graph(graph, cluster=_what_if(gpus // 8, **what_if), global_batch_size=batch, constraints=pins)
            per_gpu = plan.predicted.tokens_per_s / gpus
            cells.append(f"{name} {per_gpu:,.0f} ({per_gpu / published:.2f})")
        print(f"  {label}, published {published:,}:\n    " + "; ".join(cells))


TORCHTITAN_SAVED_MM = 2
"""torchtitan's op-level SAC (parallelize_llama.py ``_save_list``) saves every other mm of a layer's forward (and
SDPA); the rest of the forward runs again in backward. autopar has no such policy; the planner prices full."""


def _layer_terms(graph: autopar.OpGraph, cluster: autopar.Cluster, layers: int) -> tuple[dict[str, float], float]:
    """Per-op prices of a 2-layer capture scaled to ``layers`` (ms), and what op-level SAC would recompute (s)."""
    from autopar.cost_models.compute import estimate_op_time, layer_capture_dtype, layer_grad_inputs

    terms: dict[str, float] = {}
    sac_s = 0.0
    for layer in graph.layers:
        repeat = layers / 2 if layer.kind == graph.layers[1].kind else 1
        grads, captured = layer_grad_inputs(layer), layer_capture_dtype(layer)
        mm_count = 0
        for op in layer.ops:
            t = estimate_op_time(op, cluster, dtype="bfloat16", batch_scale=2, grad_inputs=grads.get(op.name),
                                 capture_dtype=captured)
            key = {"matmul": "GEMMs", "attention": "attention (SDPA, masked: priced non-causal)"}.get(
                op.op_class.value)
            if key is None:
                key = ("eager RMSNorm (fp32 inside, casts)" if "norm" in op.module_path
                       else "other eager (rotary, SwiGLU, adds, GQA copies, mask)")
            terms[key] = terms.get(key, 0.0) + repeat * (t.forward_s + t.backward_s)
            mm_count += op.op_class.value == "matmul"
            saved = op.op_class.value == "attention" or (
                op.op_class.value == "matmul" and mm_count % TORCHTITAN_SAVED_MM == 1)
            if layer.kind == graph.layers[1].kind and not saved:
                sac_s += repeat * t.forward_s
    return terms, sac_s


def breakdown_8b() -> None:
    """torchtitan Llama 3 8B, FSDP 8, local batch 2 × 8,192: the predicted step term by term (ms per GPU).

    Per-layer terms come from a 2-layer capture of the real widths (every decoder layer is priced the
    same); the step's exposed communication and optimizer come from the pinned plan of the full model.
    """
    from autopar.cost_models import loss

    tokens_per_gpu = 2 * 8192
    cluster = autopar.Cluster.preset(TORCHTITAN_CLUSTER)
    terms, sac_s = _layer_terms(_llama(4096, 14336, 2, 32, 8, seq=8192, dtype=TORCHTITAN_CAPTURE), cluster, 32)
    ce = loss.estimate_cross_entropy_time(tokens_per_gpu, 128256, logits_dtype="bfloat16", gpu=cluster.gpu)
    terms["cross-entropy (fp32, V=128,256)"] = sum(ce)
    plan = plan_graph(_llama(4096, 14336, 32, 32, 8, seq=8192, dtype=TORCHTITAN_CAPTURE), cluster=cluster,
                      global_batch_size=16, constraints=dict(dp=8, tp=1, pp=1, zero_stage=3, micro_batch_size=2))
    p = plan.predicted
    recompute_s = p.compute_time_s - p.bubble_fraction * p.step_time_s - sum(terms.values())
    terms[f"recompute ({plan.layout.recompute.value}): forward again"] = recompute_s
    c = p.communication
    terms["optimizer: foreach AdamW + clip_grad_norm_ (96 B/param, optimizer.py)"] = (
        p.step_time_s - p.compute_time_s - c.dp_s)
    terms["exposed FSDP all-gather: first units (root + block) + FSDP2 copy-out"] = c.dp_all_gather_s
    terms["exposed FSDP reduce-scatter: last units + FSDP2 copy-in"] = c.dp_reduce_scatter_s
    terms["pipeline bubble"] = p.bubble_fraction * p.step_time_s
    published_s = 16 * 8192 / 8 / 5762
    print(f"torchtitan Llama 3 8B FSDP 8 ({plan.layout.describe()}) on {TORCHTITAN_CLUSTER}: predicted "
          f"{p.step_time_s * 1e3:,.0f} ms/step, published {published_s * 1e3:,.0f} ms (5,762 tok/s/GPU), "
          f"ratio {published_s / p.step_time_s:.2f}")
    for name, seconds in terms.items():
        print(f"  {name:72s} {seconds * 1e3:8.1f} ms")
    print(f"  sum of the terms {sum(terms.values()) * 1e3:,.0f} ms; the planner's step {p.step_time_s * 1e3:,.0f} ms")
    total = p.step_time_s - recompute_s + sac_s
    print(f"  torchtitan's op-level SAC instead of full recompute: {sac_s * 1e3:,.0f} ms instead of "
          f"{recompute_s * 1e3:,.0f} ms: {total * 1e3:,.0f} ms, ratio {published_s / total:.2f}")


if __name__ == "__main__":
    import sys

    parts = {"alpa": alpa, "llama_405b": llama_405b, "torchtitan": torchtitan, "bounds": torchtitan_bounds,
             "breakdown": breakdown_8b}
    for name in sys.argv[1:] or list(parts):
        parts[name]()
