"""Turn priced layouts (``solvers.evaluate.Evaluation``) into ``Plan`` values (explanations: ``report.explain``)."""

from __future__ import annotations

from collections.abc import Sequence

from autopar.graph.ir import OpGraph
from autopar.pricing import LayerPricer
from autopar.plan import Plan, Predicted, StagePlan
from autopar.report.explain import explain_choice
from autopar.solvers.evaluate import Evaluation


def _stages(ev: Evaluation, graph: OpGraph, pricing: LayerPricer) -> tuple[StagePlan, ...]:
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


def _predicted(ev: Evaluation, pricing: LayerPricer, *, seq_len: int, sources: dict[str, str]) -> Predicted:
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


def build_plans(ranked: Sequence[Evaluation], graph: OpGraph, pricing: LayerPricer, *, cluster_name: str,
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
            explanation=explain_choice(ev, runner_up), runtime=pricing.runtime,
        ))
    return plans
