"""Hand-built plans shared by the report, export and CLI tests (a hand-written plan is a ``Plan`` too)."""

from __future__ import annotations

from autopar.layout import CommBreakdown
from autopar.plan import (
    Layout,
    MemoryBreakdown,
    Plan,
    Predicted,
    Recompute,
    Schedule,
    ShardingPlan,
    StagePlan,
    TPStyle,
)

GB = 10**9
GIB = 2**30

BLOCK_MODULES = {
    "ln_1": TPStyle.REPLICATE,
    "attn.q_proj": TPStyle.COLWISE,
    "attn.k_proj": TPStyle.COLWISE,
    "attn.v_proj": TPStyle.COLWISE,
    "attn.c_proj": TPStyle.ROWWISE,
    "ln_2": TPStyle.REPLICATE,
    "mlp.c_fc": TPStyle.COLWISE,
    "mlp.c_proj": TPStyle.ROWWISE,
}


def _block_sharding(hidden_bytes: int) -> ShardingPlan:
    return ShardingPlan(
        layer_kind="block",
        modules=BLOCK_MODULES,
        ops={"addmm": "S1 = R x S1", "addmm_1": "S1 = R x S1", "addmm_2": "S1 = R x S1",
             "addmm_3": "R = S1 x S0", "addmm_4": "S1 = R x S1", "addmm_5": "R = S1 x S0"},
        forward_collectives=(("all_reduce", hidden_bytes), ("all_reduce", hidden_bytes)),
    )


def _stages(bounds: list[int], pp: int, paths: list[str], recompute: Recompute, fwd_s: float, bwd_s: float,
            sharding: tuple[ShardingPlan, ...] = ()) -> tuple[StagePlan, ...]:
    stages = []
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        n_blocks = sum(1 for p in paths[a:b] if p.startswith("blocks."))
        stages.append(StagePlan(
            index=i, pp_rank=i % pp, layer_start=a, layer_end=b, module_paths=tuple(paths[a:b]),
            recompute=recompute, sharding=sharding,
            forward_time_s=fwd_s * max(n_blocks, 1), backward_time_s=bwd_s * max(n_blocks, 1),
        ))
    return tuple(stages)


def gpt_paths(n_blocks: int) -> list[str]:
    """Module paths of GPT's layers: embeddings at the root, the blocks, then ln_f + lm_head."""
    return ["tok_emb+pos_emb", *(f"blocks.{i}" for i in range(n_blocks)), "ln_f+lm_head"]


def gpt175b_plan() -> Plan:
    """Megatron's 175B setting (Korthikanti et al. Table 3): tp8 pp8 on 64 A100s, selective + SP."""
    paths = gpt_paths(96)
    bounds = [0, 13, 25, 37, 49, 61, 73, 85, 98]
    layout = Layout(dp=1, tp=8, pp=8, micro_batch_size=1, num_micro_batches=64, zero_stage=1,
                    recompute=Recompute.SELECTIVE, sequence_parallel=True, schedule=Schedule.ONE_F_ONE_B)
    memory = tuple(
        MemoryBreakdown(params=int(5.5 * GB), grads=int(5.5 * GB), optimizer=int(33 * GB),
                        activations=int((8 - r) * 1.3 * GB), buffers=2 * GB, capacity=80 * GIB)
        for r in range(8))
    predicted = Predicted(
        step_time_s=13.1, model_tflops_per_gpu=160.4, hardware_tflops_per_gpu=165.1, mfu=0.514,
        tokens_per_s=10004.6, bubble_fraction=0.0986,
        communication=CommBreakdown(tp_s=0.47, pp_p2p_s=0.256),
        memory=memory, compute_time_s=12.3, sources={"compute": "roofline", "calibration": "none"},
    )
    return Plan(
        graph_fingerprint="0123456789abcdef", model_name="gpt:175b", cluster_name="dgx-a100 x8",
        num_gpus_available=64, gpus_per_node=8, seq_len=2048, dtype="bfloat16", layout=layout,
        stages=_stages(bounds, 8, paths, Recompute.SELECTIVE, 0.0041, 0.0095,
                       (_block_sharding(2048 * 12288 * 2),)),
        predicted=predicted, num_layers=98,
        explanation=("beats the runner-up dp1 tp8 pp8 mb1x64 zero1 rc=full sp 1f1b by 24.1% step time:",
                     "  selective recompute fits in memory (peak 57.4 GiB) and skips 1/3 of the recomputed FLOPs"),
    )


def interleaved_plan() -> Plan:
    """A 24-block GPT on 16 GPUs: dp2 tp2 pp4, two chunks per rank, full recompute."""
    paths = gpt_paths(24)
    bounds = [0, 4, 7, 10, 13, 16, 19, 22, 26]
    layout = Layout(dp=2, tp=2, pp=4, micro_batch_size=2, num_micro_batches=8, zero_stage=1,
                    recompute=Recompute.FULL, sequence_parallel=False, schedule=Schedule.INTERLEAVED_1F1B,
                    virtual_stages=2)
    memory = tuple(
        MemoryBreakdown(params=2 * GB, grads=2 * GB, optimizer=6 * GB, activations=(4 - r) * GB,
                        buffers=GB, capacity=40 * GIB)
        for r in range(4))
    predicted = Predicted(
        step_time_s=1.25, model_tflops_per_gpu=120.0, hardware_tflops_per_gpu=160.0, mfu=0.385,
        tokens_per_s=26214.4, bubble_fraction=0.158, communication=CommBreakdown(pp_p2p_s=0.032, dp_reduce_scatter_s=0.1),
        memory=memory,
    )
    return Plan(
        graph_fingerprint="fedcba9876543210", model_name="gpt:1.3b", cluster_name="dgx-a100-40g x2",
        num_gpus_available=16, gpus_per_node=8, seq_len=1024, dtype="bfloat16", layout=layout,
        stages=_stages(bounds, 4, paths, Recompute.FULL, 0.004, 0.012, (_block_sharding(1024 * 2048 * 2 * 2),)),
        predicted=predicted, num_layers=26,
    )


def data_parallel_plan() -> Plan:
    """A 12-block GPT on 8 GPUs: pure data parallel with ZeRO-2, no recompute."""
    paths = gpt_paths(12)
    layout = Layout(dp=8, tp=1, pp=1, micro_batch_size=4, num_micro_batches=4, zero_stage=2,
                    recompute=Recompute.NONE, sequence_parallel=False, schedule=Schedule.ONE_F_ONE_B)
    memory = (MemoryBreakdown(params=250_000_000, grads=31_250_000, optimizer=187_500_000,
                              activations=9 * GB, buffers=GB // 2, capacity=80 * GIB),)
    predicted = Predicted(
        step_time_s=0.42, model_tflops_per_gpu=210.0, hardware_tflops_per_gpu=210.0, mfu=0.673,
        tokens_per_s=312076.2, bubble_fraction=0.0, communication=CommBreakdown(dp_reduce_scatter_s=0.01, dp_all_gather_s=0.008),
        memory=memory,
    )
    return Plan(
        graph_fingerprint="00000000deadbeef", model_name="gpt:small", cluster_name="dgx-h100",
        num_gpus_available=8, gpus_per_node=8, seq_len=1024, dtype="bfloat16", layout=layout,
        stages=_stages([0, 14], 1, paths, Recompute.NONE, 0.002, 0.004),
        predicted=predicted, num_layers=14,
    )


def uneven_plan() -> Plan:
    """A 24-block GPT on 4 pipeline ranks with uneven stages (5, 7, 7, 5 blocks), ZeRO-3, no TP."""
    paths = gpt_paths(24)
    bounds = [0, 6, 13, 20, 26]
    layout = Layout(dp=4, tp=1, pp=4, micro_batch_size=1, num_micro_batches=16, zero_stage=3,
                    recompute=Recompute.NONE, sequence_parallel=False, schedule=Schedule.ONE_F_ONE_B)
    memory = tuple(MemoryBreakdown(params=GB, grads=GB, optimizer=3 * GB, activations=(4 - r) * GB, buffers=GB,
                                   capacity=80 * GIB) for r in range(4))
    predicted = Predicted(step_time_s=2.0, model_tflops_per_gpu=100.0, hardware_tflops_per_gpu=100.0, mfu=0.32,
                          tokens_per_s=32768.0, bubble_fraction=0.158, communication=CommBreakdown(pp_p2p_s=0.05), memory=memory)
    return Plan(
        graph_fingerprint="1111222233334444", model_name="gpt:1.3b", cluster_name="dgx-h100 x2",
        num_gpus_available=16, gpus_per_node=8, seq_len=1024, dtype="bfloat16", layout=layout,
        stages=_stages(bounds, 4, paths, Recompute.NONE, 0.004, 0.008), predicted=predicted, num_layers=26,
    )
