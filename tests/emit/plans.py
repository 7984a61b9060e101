"""Hand-written plans for the emitter tests: the same ``Plan`` type the planner returns.

Layer paths follow ``autopar.capture``'s naming (checked in ``test_emit_single.py``):
GPT is ``tok_emb+pos_emb``, ``blocks.i``, ``ln_f+lm_head``; a Hugging Face Llama is
``model.embed_tokens+model.rotary_emb``, ``model.layers.i``, ``model.norm+lm_head``.
Embedding/head layers are not modules, so their sharding paths are from the model root.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from autopar.plan import (
    CommBreakdown,
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

COL, ROW, REP = TPStyle.COLWISE, TPStyle.ROWWISE, TPStyle.REPLICATE

GPT_BLOCK = {"ln_1": REP, "attn.q_proj": COL, "attn.k_proj": COL, "attn.v_proj": COL, "attn.c_proj": ROW,
             "ln_2": REP, "mlp.c_fc": COL, "mlp.c_proj": ROW}
GPT_EMBED = {"tok_emb": ROW, "pos_emb": ROW}
GPT_HEAD = {"lm_head": COL}

LLAMA_BLOCK = {"self_attn.q_proj": COL, "self_attn.k_proj": COL, "self_attn.v_proj": COL,
               "self_attn.o_proj": ROW, "mlp.gate_proj": COL, "mlp.up_proj": COL, "mlp.down_proj": ROW}
LLAMA_EMBED = {"model.embed_tokens": ROW}
LLAMA_HEAD = {"lm_head": COL}


def gpt_layer_paths(n_layer: int) -> tuple[str, ...]:
    """GPT's layers as capture names them."""
    return ("tok_emb+pos_emb", *(f"blocks.{i}" for i in range(n_layer)), "ln_f+lm_head")


def llama_layer_paths(n_layer: int) -> tuple[str, ...]:
    """A Hugging Face Llama's layers as capture names them."""
    return ("model.embed_tokens+model.rotary_emb", *(f"model.layers.{i}" for i in range(n_layer)),
            "model.norm+lm_head")


def shardings(family: str) -> tuple[ShardingPlan, ...]:
    """One ShardingPlan per layer kind (block, embeddings, head) of a model family."""
    block, embed, head = (GPT_BLOCK, GPT_EMBED, GPT_HEAD) if family == "gpt" else (LLAMA_BLOCK, LLAMA_EMBED, LLAMA_HEAD)
    return tuple(ShardingPlan(layer_kind=kind, modules=dict(mods), ops={})
                 for kind, mods in (("block", block), ("embed", embed), ("head", head)))


def even_bounds(num_layers: int, num_stages: int) -> list[int]:
    """Stage boundaries with layer counts differing by at most one (earlier stages larger).

    Example:
        >>> even_bounds(6, 4)
        [0, 2, 4, 5, 6]
    """
    base, extra = divmod(num_layers, num_stages)
    bounds = [0]
    for i in range(num_stages):
        bounds.append(bounds[-1] + base + (1 if i < extra else 0))
    return bounds


def make_plan(
    layer_paths: Sequence[str], *, family: str = "gpt", dp: int = 1, tp: int = 1, pp: int = 1,
    schedule: Schedule | str = Schedule.ONE_F_ONE_B, virtual_stages: int = 1, micro_batch_size: int = 2,
    num_micro_batches: int = 2, zero_stage: int = 0, recompute: Recompute | str = Recompute.NONE,
    sequence_parallel: bool = False, dtype: str = "float32", seq_len: int = 16,
    bounds: Sequence[int] | None = None, sharding: tuple[ShardingPlan, ...] | None = None,
    stage_recompute: Mapping[int, Recompute | str] | None = None,
) -> Plan:
    """A valid ``Plan`` for a model with the given layers, written by hand.

    Args:
        layer_paths: Module paths of the graph's layers, in order.
        family: ``"gpt"`` or ``"llama"``: which TP styles to use when ``tp > 1``.
        bounds: Stage boundaries (len = stages + 1); even split by default.
        sharding: Sharding plans for every stage; the family's defaults when ``tp > 1``.
        stage_recompute: Per-stage override of ``recompute``.
    """
    schedule, recompute = Schedule(schedule), Recompute(recompute)
    num_stages = pp * virtual_stages
    bounds = list(bounds) if bounds is not None else even_bounds(len(layer_paths), num_stages)
    if sharding is None:
        sharding = shardings(family) if tp > 1 else ()
    layout = Layout(dp=dp, tp=tp, pp=pp, micro_batch_size=micro_batch_size, num_micro_batches=num_micro_batches,
                    zero_stage=zero_stage, recompute=recompute, sequence_parallel=sequence_parallel,
                    schedule=schedule, virtual_stages=virtual_stages)
    stages = tuple(
        StagePlan(index=i, pp_rank=i % pp, layer_start=a, layer_end=b, module_paths=tuple(layer_paths[a:b]),
                  recompute=Recompute((stage_recompute or {}).get(i, recompute)), sharding=sharding)
        for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True))
    )
    memory = tuple(MemoryBreakdown(params=0, grads=0, optimizer=0, activations=0, buffers=0, capacity=2**30)
                   for _ in range(pp))
    predicted = Predicted(step_time_s=1.0, model_tflops_per_gpu=0.0, hardware_tflops_per_gpu=0.0, mfu=0.0,
                          tokens_per_s=0.0, bubble_fraction=0.0, communication=CommBreakdown(), memory=memory)
    return Plan(graph_fingerprint="hand-written", model_name=family, cluster_name="cpu-gloo",
                num_gpus_available=layout.num_gpus, gpus_per_node=layout.num_gpus, seq_len=seq_len, dtype=dtype,
                layout=layout, stages=stages, predicted=predicted, num_layers=len(layer_paths))
