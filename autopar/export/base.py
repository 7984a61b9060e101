"""What every exporter shares: the result value, the refusal error, and the decoder layout of a plan.

Training libraries split a decoder-only transformer into an embedding (``E``), a
run of identical blocks (``t``) and a head with the final norm and loss (``L``),
the letters of Megatron-LM's ``--pipeline-model-parallel-layout``. A plan whose
layers do not read that way (an MLP, an encoder-decoder) cannot be written as
their pipeline settings, and the exporters refuse it.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

from autopar._compat import StrEnum
from autopar.errors import ExportError
from autopar.plan import Plan, Recompute


class ExportTarget(StrEnum):
    """Libraries a plan can be written for."""

    MEGATRON = "megatron"
    DEEPSPEED = "deepspeed"
    TORCHTITAN = "torchtitan"
    JSON = "json"


@dataclass(frozen=True, slots=True, kw_only=True)
class ExportResult:
    """A plan written for one target."""

    target: ExportTarget
    """The library."""
    text: str
    """The main output: command-line arguments, a JSON config, or overrides."""
    suffix: str
    """File suffix of the main output (``.sh``, ``.json``, ``.txt``)."""
    extras: Mapping[str, str] = field(default_factory=dict)
    """Further files (name → text) the target reads, e.g. a code snippet or a TOML for an older version."""
    notes: tuple[str, ...] = ()
    """Things the user must know: how a plan feature was written where the target reads it."""


@dataclass(frozen=True, slots=True, kw_only=True)
class DecoderLayout:
    """A plan's layers read as embedding, blocks and head."""

    roles: tuple[str, ...]
    """Per layer: ``"E"``, ``"t"`` or ``"L"``."""
    stage_roles: tuple[str, ...]
    """Per stage (model order): its layers' roles joined, e.g. ``"Ettt"``."""
    block_paths: tuple[str, ...]
    """Module paths of the blocks, in order."""

    @property
    def num_blocks(self) -> int:
        """Transformer blocks."""
        return len(self.block_paths)

    def blocks_per_stage(self) -> tuple[int, ...]:
        """Blocks in each stage."""
        return tuple(s.count("t") for s in self.stage_roles)

    def uniform_blocks(self) -> int | None:
        """Blocks per stage when every stage has the same number, embedding first and head last; else None."""
        counts = set(self.blocks_per_stage())
        if len(counts) != 1:
            return None
        k = counts.pop()
        return k if k > 0 else None


_BLOCK = re.compile(r"^(?P<prefix>(?:.*\.)?)(?P<index>\d+)$")


def decoder_layout(plan: Plan, target: str) -> DecoderLayout:
    """Read the plan's layers as ``E t…t L``.

    Blocks are layers whose module path is ``<prefix>.<i>`` with the most common prefix
    (``blocks.3``, ``model.layers.3``); what comes before them is the embedding and what
    comes after is the head, each within one stage.

    Raises:
        ExportError: no blocks, nothing before or after them, blocks not contiguous, or an
            embedding/head spread over stages.
    """
    paths = [p for s in plan.stages for p in s.module_paths]
    matches = [_BLOCK.match(p) for p in paths]
    prefixes = Counter(m.group("prefix") for m in matches if m)
    if not prefixes:
        raise ExportError(f"{target} trains transformer decoders (embedding, blocks, head); this plan's layers "
                          f"{_sample(paths)} have no repeated blocks")
    prefix = prefixes.most_common(1)[0][0]
    is_block = [bool(m and m.group("prefix") == prefix) for m in matches]
    first, last = is_block.index(True), len(is_block) - 1 - is_block[::-1].index(True)
    if not all(is_block[first:last + 1]) or first == 0 or last == len(paths) - 1:
        raise ExportError(
            f"{target} needs the layers as embedding, contiguous blocks '{prefix}N', head; this plan has "
            f"{_sample(paths)}"
        )
    roles = tuple("E" if i < first else "t" if i <= last else "L" for i in range(len(paths)))
    # several layers before the blocks (token + rotary embeddings) are one "E" to the targets
    stage_roles = tuple(_collapse("".join(roles[s.layer_start:s.layer_end])) for s in plan.stages)
    head_stage = plan.stages[-1].layer_start
    if plan.stages[0].layer_end < first or head_stage > last + 1:
        raise ExportError(f"{target} keeps the embedding on the first stage and the head on the last; this plan "
                          f"splits them: stages {list(stage_roles)}")
    return DecoderLayout(roles=roles, stage_roles=stage_roles,
                         block_paths=tuple(p for p, b in zip(paths, is_block) if b))


def uniform_recompute(plan: Plan, target: str) -> Recompute:
    """The one recompute policy of all stages.

    Raises:
        ExportError: stages differ (the targets set one policy for the whole model).
    """
    policies = {s.recompute for s in plan.stages}
    if len(policies) > 1:
        per_stage = ", ".join(f"{s.index}:{s.recompute.value}" for s in plan.stages)
        raise ExportError(
            f"{target} applies one recompute policy to every stage, but this plan mixes them ({per_stage}); "
            f"re-plan with --pin recompute={plan.layout.recompute.value} to export it"
        )
    return policies.pop()


def header_lines(plan: Plan, target: str) -> list[str]:
    """Comment lines that say what the output is for."""
    lay = plan.layout
    return [
        f"{target} settings for {plan.model_name} (autopar plan {plan.graph_fingerprint}, schema "
        f"{plan.schema_version})",
        f"layout: {lay.describe()}; run on dp*tp*pp = {lay.dp}*{lay.tp}*{lay.pp} = {lay.num_gpus} GPUs",
        f"predicted step {plan.predicted.step_time_s:.3f} s, MFU {plan.predicted.mfu:.1%}",
    ]


def _collapse(roles: str) -> str:
    """``"EEttL"`` → ``"EttL"``: one embedding and one head per model.

    Example:
        >>> _collapse("EEttLL")
        'EttL'
    """
    return ("E" if "E" in roles else "") + "t" * roles.count("t") + ("L" if "L" in roles else "")


def _sample(paths: list[str]) -> str:
    shown = paths if len(paths) <= 6 else [*paths[:3], "…", *paths[-2:]]
    return "[" + ", ".join(repr(p) if p != "…" else p for p in shown) + "]"


__all__ = [
    "DecoderLayout",
    "ExportError",
    "ExportResult",
    "ExportTarget",
    "decoder_layout",
    "header_lines",
    "uniform_recompute",
]
