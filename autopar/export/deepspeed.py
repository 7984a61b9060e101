"""A plan as a DeepSpeed config JSON, plus the code DeepSpeed reads the rest from.

DeepSpeed's JSON holds the batch triple, ZeRO stage, precision, AutoTP size and how
activation checkpointing behaves. It has no pipeline section: a pipeline is a
``deepspeed.pipe.PipelineModule`` built in code, and which layers are checkpointed is
code too. Those parts go into a Python snippet next to the JSON.

Refused (DeepSpeed cannot run them): Megatron-style sequence parallelism, GPipe or
interleaved schedules (its pipeline engine runs its own 1F1B), ZeRO-2/3 with a pipeline
(``PipelineEngine`` asserts stage < 2), and AutoTP combined with a pipeline.
"""

from __future__ import annotations

import json
from typing import Any

from autopar.export.base import ExportError, ExportResult, ExportTarget, header_lines, uniform_recompute
from autopar.plan import Plan, Recompute, Schedule

ACTIVATION_CHECKPOINTING: dict[str, Any] = {
    "partition_activations": False,
    "contiguous_memory_optimization": False,
    "cpu_checkpointing": False,
    "number_checkpoints": None,
    "synchronize_checkpoint_boundary": False,
    "profile": False,
}
"""DeepSpeed's ``activation_checkpointing`` section with its documented defaults: checkpoints are
kept whole on each GPU (``partition_activations`` would split them over the model-parallel group)."""

PIPELINE_SNIPPET = "deepspeed_pipeline.py"
"""Name of the snippet written when the plan has a pipeline."""
CHECKPOINT_SNIPPET = "deepspeed_checkpointing.py"
"""Name of the snippet written when the plan recomputes without a pipeline."""


def deepspeed_config(plan: Plan) -> dict[str, Any]:
    """The DeepSpeed config dict.

    Raises:
        ExportError: a plan feature DeepSpeed cannot run (see the module docstring).
    """
    lay = plan.layout
    _check_supported(plan)
    config: dict[str, Any] = {
        "train_batch_size": lay.global_batch_size,
        "train_micro_batch_size_per_gpu": lay.micro_batch_size,
        "gradient_accumulation_steps": lay.num_micro_batches,
        "zero_optimization": {"stage": lay.zero_stage},
    }
    if plan.dtype == "bfloat16":
        config["bf16"] = {"enabled": True}
    elif plan.dtype == "float16":
        config["fp16"] = {"enabled": True}
    if lay.tp > 1:
        config["tensor_parallel"] = {"autotp_size": lay.tp}
    if uniform_recompute(plan, "DeepSpeed") is not Recompute.NONE:
        config["activation_checkpointing"] = dict(ACTIVATION_CHECKPOINTING)
    return config


def _check_supported(plan: Plan) -> None:
    lay = plan.layout
    if lay.sequence_parallel:
        raise ExportError("DeepSpeed has no Megatron-style sequence parallelism inside tensor-parallel groups; "
                          "re-plan with --pin sequence_parallel=false, or export with --to megatron")
    if lay.pp > 1 and lay.schedule is not Schedule.ONE_F_ONE_B:
        raise ExportError(f"DeepSpeed's pipeline engine runs its own 1F1B schedule, not {lay.schedule.value!r}; "
                          "re-plan with --pin schedule=1f1b --pin virtual_stages=1, or export with --to megatron")
    if lay.pp > 1 and lay.zero_stage >= 2:
        raise ExportError(f"DeepSpeed's pipeline engine supports ZeRO stage 0 or 1, not {lay.zero_stage}; "
                          "re-plan with --pin zero_stage=1")
    if lay.pp > 1 and lay.tp > 1:
        raise ExportError("DeepSpeed's AutoTP does not combine with its pipeline engine; "
                          "export this plan with --to megatron")
    if plan.dtype not in ("bfloat16", "float16", "float32"):
        raise ExportError(f"DeepSpeed has no precision setting for dtype {plan.dtype!r}")


def export_deepspeed(plan: Plan) -> ExportResult:
    """The config JSON as the main output; a pipeline or checkpointing snippet as an extra file."""
    config = deepspeed_config(plan)
    policy = uniform_recompute(plan, "DeepSpeed")
    extras: dict[str, str] = {}
    notes: list[str] = []
    if plan.layout.pp > 1:
        extras[PIPELINE_SNIPPET] = pipeline_snippet(plan, policy)
        notes.append(f"DeepSpeed's JSON has no pipeline section: build the {plan.layout.pp}-stage pipeline "
                     f"with the PipelineModule in {PIPELINE_SNIPPET}")
    elif policy is not Recompute.NONE:
        extras[CHECKPOINT_SNIPPET] = checkpoint_snippet(plan, policy)
        notes.append(f"DeepSpeed's JSON does not say what to recompute: wrap the modules as in {CHECKPOINT_SNIPPET}")
    if policy is Recompute.SELECTIVE and plan.layout.pp > 1:
        notes.append("selective recompute: checkpoint only the attention core inside each block "
                     "(deepspeed.checkpointing.checkpoint), as the snippet says")
    return ExportResult(target=ExportTarget.DEEPSPEED, text=json.dumps(config, indent=2) + "\n", suffix=".json",
                        extras=extras, notes=tuple(notes))


def pipeline_snippet(plan: Plan, policy: Recompute) -> str:
    """Python that builds a ``PipelineModule`` with the plan's exact stage boundaries."""
    bounds = [s.layer_start for s in plan.stages] + [plan.num_layers]
    layer_list = "\n".join(f"#   {s.layer_start + i:4d}: {path or '(root)'}"
                           for s in plan.stages for i, path in enumerate(s.module_paths))
    interval = {Recompute.NONE: 0, Recompute.FULL: 1, Recompute.SELECTIVE: 0}[policy]
    selective = ("\n# selective recompute: inside each block, run the attention core (scores, softmax, "
                 "dropout, @V)\n# through deepspeed.checkpointing.checkpoint(core, q, k, v).\n"
                 if policy is Recompute.SELECTIVE else "")
    header = "\n".join(f"# {line}" for line in header_lines(plan, "DeepSpeed pipeline"))
    return f'''{header}
# DeepSpeed's JSON has no pipeline section; the pipeline is built here. Pass your model's
# layers to build_pipeline() in this order (autopar's layer index: module path):
{layer_list}
{selective}
from deepspeed.pipe import PipelineModule

STAGE_BOUNDS = {bounds}
"""Layer index where each of the {plan.layout.pp} stages starts, then the number of layers."""


class AutoparPipelineModule(PipelineModule):
    """A PipelineModule that cuts the layers exactly where the autopar plan does."""

    def _partition_layers(self, method="uniform"):
        self.parts = list(STAGE_BOUNDS)
        stage_id = self._topo.get_coord(self.global_rank).pipe
        self._set_bounds(start=self.parts[stage_id], stop=self.parts[stage_id + 1])


def build_pipeline(layers, loss_fn):
    """The pipeline for deepspeed.initialize(model=..., config="ds_config.json")."""
    return AutoparPipelineModule(
        layers=layers,
        loss_fn=loss_fn,
        num_stages={plan.layout.pp},
        activation_checkpoint_interval={interval},  # 1 = recompute every layer (full), 0 = none
    )
'''


def checkpoint_snippet(plan: Plan, policy: Recompute) -> str:
    """Python showing which modules to run through ``deepspeed.checkpointing.checkpoint``."""
    header = "\n".join(f"# {line}" for line in header_lines(plan, "DeepSpeed activation checkpointing"))
    what = ("each transformer block: x = checkpoint(block, x)" if policy is Recompute.FULL else
            "the attention core of each block: y = checkpoint(core_attention, q, k, v)")
    return f'''{header}
# DeepSpeed's JSON configures how checkpoints are kept; what to recompute is set in code.
# Recompute policy of this plan: {policy.value} -> wrap {what}
import deepspeed
from deepspeed.checkpointing import checkpoint  # noqa: F401  (use it in your model's forward)


def configure_checkpointing(config_path="ds_config.json"):
    """Call once after deepspeed.initialize()."""
    deepspeed.checkpointing.configure(None, deepspeed_config=config_path)
'''


__all__ = ["ACTIVATION_CHECKPOINTING", "checkpoint_snippet", "deepspeed_config", "export_deepspeed",
           "pipeline_snippet"]
