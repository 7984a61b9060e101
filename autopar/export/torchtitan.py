"""A plan as torchtitan settings: 0.3 command-line overrides, and a TOML for 0.2.x.

torchtitan 0.3 has no TOML; a run is ``--module M --config C`` plus overrides such as
``--parallelism.tensor_parallel_degree 8`` and the activation-checkpoint subcommand
(``activation-checkpoint:full``). 0.2.x reads the same settings from a TOML job file
(``[parallelism]``, ``[training]``, ``[activation_checkpoint]``).

Mapping (``export-targets.md``):
- ZeRO 3 → FSDP over dp (``data_parallel_shard_degree = dp``); ZeRO 0 → replicate over dp;
  ZeRO 2 → FSDP that keeps parameters gathered between forward and backward
  (``fsdp_reshard_after_forward = "never"``); ZeRO 1 has no torchtitan form and is written as
  ZeRO 2 (same communication, less memory) with a note.
- Stages → ``module_fqns_per_model_part`` in torchtitan's decoder names (``tok_embeddings``,
  ``layers.i``, ``norm`` + ``lm_head`` in 0.3, ``norm`` + ``output`` in 0.2.x).
- Selective recompute → torchtitan's per-op selective AC (it saves matmul outputs and recomputes
  the rest, the closest policy to recomputing the attention core).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

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

SCHEDULES: Mapping[Schedule, str] = {
    Schedule.GPIPE: "GPipe",
    Schedule.ONE_F_ONE_B: "1F1B",
    Schedule.INTERLEAVED_1F1B: "Interleaved1F1B",
}
"""Our schedules → names ``torch.distributed.pipelining.schedules.get_schedule_class`` accepts."""

AC_MODES: Mapping[Recompute, str] = {Recompute.NONE: "none", Recompute.SELECTIVE: "selective",
                                     Recompute.FULL: "full"}
"""Recompute policy → torchtitan activation-checkpoint mode (0.3 subcommand, 0.2.x ``mode``)."""

TOML_FILE = "torchtitan-0.2.toml"
"""Name of the 0.2.x job file written next to the overrides."""

HEAD_MODULES = {"0.3": ("norm", "lm_head"), "0.2": ("norm", "output")}
"""Final norm and output projection in torchtitan's decoder, per version."""


def _settings(plan: Plan) -> tuple[dict[str, dict[str, object]], list[str]]:
    """{section: {key: value}} shared by both versions, and notes on substitutions made."""
    lay = plan.layout
    if plan.dtype not in ("bfloat16", "float32"):
        raise ExportError(f"torchtitan trains in bfloat16 or float32 mixed precision, not {plan.dtype!r}")
    notes: list[str] = []
    replicate, shard = (lay.dp, 1) if lay.zero_stage == 0 else (1, lay.dp)
    parallelism: dict[str, object] = {
        "data_parallel_replicate_degree": replicate,
        "data_parallel_shard_degree": shard,
        "tensor_parallel_degree": lay.tp,
        "pipeline_parallel_degree": lay.pp,
    }
    if lay.zero_stage in (1, 2):
        parallelism["fsdp_reshard_after_forward"] = "never"
    if lay.zero_stage == 1 and lay.dp > 1:
        notes.append("ZeRO-1 has no torchtitan form: written as FSDP with reshard_after_forward=never "
                     "(ZeRO-2: same communication, gradients sharded too)")
    per_rank = lay.micro_batch_size * lay.num_micro_batches if lay.pp > 1 else lay.micro_batch_size
    training: dict[str, object] = {
        "local_batch_size": per_rank,
        "global_batch_size": lay.global_batch_size,
        "seq_len": plan.seq_len,
        "mixed_precision_param": plan.dtype,
    }
    if lay.pp > 1:
        parallelism["pipeline_parallel_schedule"] = SCHEDULES[lay.schedule]
        parallelism["pipeline_parallel_microbatch_size"] = lay.micro_batch_size
    return {"parallelism": parallelism, "training": training}, notes


def _model_parts(layout: DecoderLayout, version: str) -> list[list[str]]:
    """Module names per stage in torchtitan's decoder naming."""
    parts: list[list[str]] = []
    block = 0
    for roles in layout.stage_roles:
        names = ["tok_embeddings"] if "E" in roles else []
        for _ in range(roles.count("t")):
            names.append(f"layers.{block}")
            block += 1
        if "L" in roles:
            names += HEAD_MODULES[version]
        parts.append(names)
    return parts


def torchtitan_overrides(plan: Plan) -> list[str]:
    """torchtitan 0.3 command-line overrides (after ``--module M --config C``).

    Raises:
        ExportError: a dtype torchtitan does not train in, mixed recompute policies, or, with a
            pipeline, layers that are not a decoder.
    """
    settings, _ = _settings(plan)
    if plan.layout.pp > 1:
        layout = decoder_layout(plan, "torchtitan")
        settings["parallelism"]["module_fqns_per_model_part"] = _model_parts(layout, "0.3")
    args: list[str] = []
    for section, values in settings.items():
        for key, value in values.items():
            args += _override(f"{section}.{key}", value)
    args += _override("parallelism.enable_sequence_parallel", plan.layout.sequence_parallel)
    args.append(f"activation-checkpoint:{AC_MODES[uniform_recompute(plan, 'torchtitan')]}")
    return args


def _override(name: str, value: object) -> list[str]:
    if isinstance(value, bool):  # tyro flags: --x / --no_x
        section, _, key = name.rpartition(".")
        return [f"--{name}" if value else f"--{section}.no_{key}"]
    if isinstance(value, list):  # list[list[str]]: one comma-separated argument per part
        return [f"--{name}", *(",".join(part) for part in value)]
    return [f"--{name}", str(value)]


def torchtitan_toml(plan: Plan) -> str:
    """The equivalent torchtitan 0.2.x job file sections.

    Raises:
        ExportError: tp > 1 without sequence parallelism (0.2.x always shards norms along the
            sequence under TP), or what ``torchtitan_overrides`` refuses.
    """
    lay = plan.layout
    if lay.tp > 1 and not lay.sequence_parallel:
        raise ExportError("torchtitan 0.2.x always uses sequence parallelism with TP; this plan has it off")
    settings, _ = _settings(plan)
    if lay.pp > 1:
        settings["parallelism"]["module_fqns_per_model_part"] = _model_parts(decoder_layout(plan, "torchtitan"),
                                                                             "0.2")
    policy = uniform_recompute(plan, "torchtitan")
    ac: dict[str, object] = {"mode": AC_MODES[policy]}
    if policy is Recompute.SELECTIVE:
        ac["selective_ac_option"] = "op"
    settings["activation_checkpoint"] = ac
    lines = [f"# {line}" for line in header_lines(plan, "torchtitan 0.2.x")]
    for section, values in settings.items():
        lines += ["", f"[{section}]", *(f"{key} = {_toml_value(v)}" for key, v in values.items())]
    return "\n".join(lines) + "\n"


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, Sequence):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


def export_torchtitan(plan: Plan) -> ExportResult:
    """0.3 overrides as the main output and the 0.2.x TOML as an extra (or a note saying why not)."""
    args = torchtitan_overrides(plan)
    _, notes = _settings(plan)
    extras: dict[str, str] = {}
    try:
        extras[TOML_FILE] = torchtitan_toml(plan)
    except ExportError as e:
        notes.append(f"no {TOML_FILE}: {e}")
    lines = [f"# {line}" for line in header_lines(plan, "torchtitan 0.3")]
    lines.append("# append to: torchrun ... -m torchtitan.train --module <model> --config <config>")
    flags: list[str] = []
    for arg in args:
        if arg.startswith("--") or arg.startswith("activation-checkpoint:") or not flags:
            flags.append(arg)
        else:
            flags[-1] += f" '{arg}'" if "," in arg or " " in arg else f" {arg}"
    lines += [f"{flag} \\" for flag in flags[:-1]] + flags[-1:]
    return ExportResult(target=ExportTarget.TORCHTITAN, text="\n".join(lines) + "\n", suffix=".txt",
                        extras=extras, notes=tuple(notes))


__all__ = ["AC_MODES", "SCHEDULES", "TOML_FILE", "export_torchtitan", "torchtitan_overrides", "torchtitan_toml"]
