"""Turn priced layouts (``solvers.evaluate.Evaluation``) into ``Plan`` values with explanations."""

from __future__ import annotations

from collections.abc import Sequence

from autopar.graph.ir import OpGraph
from autopar.plan import Plan, Predicted, StagePlan
from autopar.solvers.costs import Pricing
from autopar.solvers.evaluate import Evaluation


def _stages(ev: Evaluation, graph: OpGraph, pricing: Pricing) -> tuple[StagePlan, ...]:
    lay, part = ev.layout, ev.partition
    shardings = pricing.sharding_plans(tp=lay.tp, sequence_parallel=lay.sequence_parallel) if lay.tp > 1 else {}
    stages = []
    for j in range(part.num_stages):
        layers = graph.layers[part.boundaries[j]:part.boundaries[j + 1]]
        kinds = dict.fromkeys(layer.kind for layer in layers)
        stages.append(StagePlan(
            index=j, pp_rank=j % lay.pp, layer_start=part.boundaries[j], layer_end=part.boundaries[j + 1],
            module_paths=tuple(layer.module_path for layer in layers), recompute=ev.stage_recompute[j],
            sharding=tuple(shardings[k] for k in kinds if k in shardings),
            forward_time_s=part.forward_time_s[j], backward_time_s=part.backward_time_s[j],
        ))
    return tuple(stages)


def _predicted(ev: Evaluation, pricing: Pricing, *, seq_len: int, sources: dict[str, str]) -> Predicted:
    gpus = ev.layout.num_gpus
    step = ev.step_time_s
    model_tflops = ev.model_flops / step / gpus / 1e12
    tokens = ev.layout.global_batch_size * seq_len
    return Predicted(
        step_time_s=step, model_tflops_per_gpu=model_tflops,
        hardware_tflops_per_gpu=ev.hardware_flops / step / gpus / 1e12,
        mfu=model_tflops * 1e12 / pricing.peak_flops_per_s, tokens_per_s=tokens / step,
        bubble_fraction=ev.bubble_fraction, communication=ev.communication, memory=ev.memory,
        compute_time_s=ev.pipeline_time_s, sources=sources,
    )



def explain_choice(winner: Evaluation, runner_up: Evaluation | None) -> tuple[str, ...]:
    """Lines saying why ``winner`` beat ``runner_up``: the layout knobs that differ and the cost terms that moved."""
    if runner_up is None:
        return ("  no other layout fits: this is the only candidate",)
    a, b = winner.layout, runner_up.layout
    diffs = [f"{name} {getattr(b, name)} → {getattr(a, name)}" for name in
             ("dp", "tp", "pp", "micro_batch_size", "zero_stage", "recompute", "sequence_parallel", "schedule",
              "virtual_stages") if getattr(a, name) != getattr(b, name)]
    lines = [f"  runner-up: {b.describe()} at {runner_up.step_time_s:.3f} s/step "
             f"(+{runner_up.step_time_s / winner.step_time_s - 1:.1%})",
             f"  it differs in: {', '.join(diffs) or 'stage boundaries only'}"]
    # the three terms of the step time (they add up to the difference in step time); TP collectives and
    # pipeline sends are part of the pipeline term and are named inside it
    a_comm, b_comm = winner.communication, runner_up.communication
    deltas = {
        "pipeline compute + bubble": runner_up.pipeline_time_s - winner.pipeline_time_s,
        "optimizer update": runner_up.optimizer_time_s - winner.optimizer_time_s,
        "exposed data-parallel communication": b_comm.dp_s - a_comm.dp_s,
    }
    inside = {"TP collectives": b_comm.tp_s - a_comm.tp_s, "pipeline send/recv": b_comm.pp_p2p_s - a_comm.pp_p2p_s}
    for name, delta in sorted(deltas.items(), key=lambda kv: -abs(kv[1])):
        if abs(delta) > 1e-6 * winner.step_time_s:
            lines.append(f"  {name}: {_signed_ms(delta)} for the runner-up")
    parts = [f"{name} {_signed_ms(delta)}" for name, delta in inside.items() if abs(delta) > 1e-6 * winner.step_time_s]
    if parts:
        lines.append(f"    (inside the pipeline term: {', '.join(parts)})")
    if winner.bubble_fraction != runner_up.bubble_fraction:
        lines.append(f"  pipeline bubble {winner.bubble_fraction:.1%} vs {runner_up.bubble_fraction:.1%}")
    lines.append(f"  peak memory {winner.peak_memory_bytes / 2**30:.1f} GiB vs "
                 f"{runner_up.peak_memory_bytes / 2**30:.1f} GiB per GPU")
    return tuple(lines)


def _signed_ms(seconds: float) -> str:
    return f"{'+' if seconds > 0 else '−'}{abs(seconds) * 1e3:.1f} ms"


def build_plans(ranked: Sequence[Evaluation], graph: OpGraph, pricing: Pricing, *, cluster_name: str,
                num_gpus: int, gpus_per_node: int, dtype: str, sources: dict[str, str], keep: int) -> list[Plan]:
    """Plans for the first ``keep`` ranked evaluations; each explains itself against the next one."""
    seq_len = int(graph.info.get("seq_len", 1))
    plans = []
    for i, ev in enumerate(ranked[:keep]):
        runner_up = ranked[i + 1] if i + 1 < len(ranked) else None
        plans.append(Plan(
            graph_fingerprint=graph.fingerprint(), model_name=graph.model_name, cluster_name=cluster_name,
            num_gpus_available=num_gpus, gpus_per_node=gpus_per_node, seq_len=seq_len, dtype=dtype,
            layout=ev.layout, stages=_stages(ev, graph, pricing),
            predicted=_predicted(ev, pricing, seq_len=seq_len, sources=sources), num_layers=len(graph.layers),
            explanation=explain_choice(ev, runner_up),
        ))
    return plans
