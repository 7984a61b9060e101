"""A plan as Megatron-LM command-line arguments (``pretrain_gpt.py`` flags).

Flag names are megatron-core's config fields with dashes (``tensor_model_parallel_size`` →
``--tensor-model-parallel-size``), plus the training script's own flags; see
``/work/shared/reference/export-targets.md``. Megatron takes the data-parallel size from the
world size, so the plan's dp becomes the number of GPUs to launch on.

Pipeline stages: an even split (the same number of blocks on every stage, the embedding with
the first and the head with the last) is written as ``--pipeline-model-parallel-size`` and, for
interleaved schedules, ``--num-layers-per-virtual-pipeline-stage``; any other split as
``--pipeline-model-parallel-layout`` (``E`` embedding, ``t`` block, ``L`` head and loss, ``|``
between stages in model order), which states every stage exactly.
"""

from __future__ import annotations

from autopar.export.base import (
    DecoderLayout,
    ExportError,
    ExportResult,
    ExportTarget,
    decoder_layout,
    header_lines,
    uniform_recompute,
)
from autopar.plan import Plan, Recompute, Schedule

ZERO_FLAGS: dict[int, tuple[str, ...]] = {
    0: (),
    1: ("--use-distributed-optimizer",),
    2: ("--use-distributed-optimizer", "--use-megatron-fsdp", "--data-parallel-sharding-strategy", "optim_grads",
        "--ckpt-format", "fsdp_dtensor"),
    3: ("--use-distributed-optimizer", "--use-megatron-fsdp", "--data-parallel-sharding-strategy",
        "optim_grads_params", "--ckpt-format", "fsdp_dtensor"),
}
"""ZeRO stage → flags: Megatron's distributed optimizer shards optimizer states (ZeRO-1);
Megatron-FSDP shards gradients (``optim_grads``) and parameters too (``optim_grads_params``)."""

DTYPE_FLAGS: dict[str, tuple[str, ...]] = {"bfloat16": ("--bf16",), "float16": ("--fp16",), "float32": ()}
"""Training precision → flags."""


def megatron_args(plan: Plan) -> list[str]:
    """The plan as an argv list for Megatron-LM's ``pretrain_gpt.py``.

    Raises:
        ExportError: the plan's layers are not a decoder, stages mix recompute policies, the
            schedule is GPipe, or the dtype has no Megatron flag.
    """
    lay = plan.layout
    if lay.pp > 1 and lay.schedule is Schedule.GPIPE:
        raise ExportError("Megatron-LM runs 1F1B or interleaved 1F1B pipelines, not GPipe; "
                          "re-plan with --pin schedule=1f1b to export this plan")
    if lay.schedule is Schedule.INTERLEAVED_1F1B and lay.num_micro_batches % lay.pp:
        raise ExportError(f"Megatron-LM's interleaved schedule needs micro-batches ({lay.num_micro_batches}) "
                          f"to be a multiple of pp={lay.pp}; re-plan with a global batch that makes it so")
    if plan.dtype not in DTYPE_FLAGS:
        raise ExportError(f"Megatron-LM has no flag for training dtype {plan.dtype!r}")
    layout = decoder_layout(plan, "Megatron-LM")
    args = ["--num-layers", str(layout.num_blocks), "--seq-length", str(plan.seq_len),
            "--tensor-model-parallel-size", str(lay.tp), "--pipeline-model-parallel-size", str(lay.pp)]
    args += _pipeline_args(plan, layout)
    args += ["--micro-batch-size", str(lay.micro_batch_size), "--global-batch-size", str(lay.global_batch_size)]
    if lay.sequence_parallel:
        args.append("--sequence-parallel")
    args += _recompute_args(uniform_recompute(plan, "Megatron-LM"))
    args += ZERO_FLAGS[lay.zero_stage]
    args += DTYPE_FLAGS[plan.dtype]
    return args


def _pipeline_args(plan: Plan, layout: DecoderLayout) -> list[str]:
    lay = plan.layout
    if lay.pp == 1:
        return []
    per_stage = layout.uniform_blocks()
    if per_stage is not None:
        return ["--num-layers-per-virtual-pipeline-stage", str(per_stage)] if lay.virtual_stages > 1 else []
    return ["--pipeline-model-parallel-layout", pipeline_layout_string(layout)]


def pipeline_layout_string(layout: DecoderLayout) -> str:
    """Megatron's layout string: stages in model order, ``t*k`` for k blocks, joined by ``|``.

    Example:
        >>> pipeline_layout_string(DecoderLayout(roles=(), stage_roles=("Ett", "tttL"), block_paths=()))
        'Et*2|t*3L'
    """
    def stage(roles: str) -> str:
        k = roles.count("t")
        blocks = f"t*{k}" if k > 1 else "t" * k
        return ("E" if "E" in roles else "") + blocks + ("L" if "L" in roles else "")

    return "|".join(stage(r) for r in layout.stage_roles)


def _recompute_args(policy: Recompute) -> list[str]:
    match policy:
        case Recompute.NONE:
            return []
        case Recompute.SELECTIVE:  # Megatron's default selective module is the attention core
            return ["--recompute-granularity", "selective"]
        case Recompute.FULL:  # every block keeps only its input: uniform method, one layer per unit
            return ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"]
        case _:
            raise ExportError(f"Megatron-LM has no recompute policy for {policy!r}")


def export_megatron(plan: Plan) -> ExportResult:
    """The plan as a shell fragment of Megatron-LM arguments, one flag per line."""
    args = megatron_args(plan)
    lines = [f"# {line}" for line in header_lines(plan, "Megatron-LM")]
    lines.append(f"# launch on {plan.layout.num_gpus} GPUs; Megatron derives dp = world size / (tp*pp)")
    flags: list[str] = []
    for arg in args:
        if arg.startswith("--") or not flags:
            flags.append(arg)
        else:
            flags[-1] += f" {_quote(arg)}"
    lines += [f"{flag} \\" for flag in flags[:-1]] + flags[-1:]
    return ExportResult(target=ExportTarget.MEGATRON, text="\n".join(lines) + "\n", suffix=".sh")


def _quote(value: str) -> str:
    """Single-quote a value for the shell when it has characters the shell would read ('|', '*')."""
    return value if value.replace("-", "").replace("_", "").replace(".", "").isalnum() else f"'{value}'"


__all__ = ["ZERO_FLAGS", "export_megatron", "megatron_args", "pipeline_layout_string"]
