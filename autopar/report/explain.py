"""Why a plan won: the prose that compares it with the runner-up, like with like.

The step time is ``pipeline + exposed data-parallel communication + optimizer update``; the
explanation names how much each of those three terms moved (they add up to the difference in
step time), and inside the pipeline term the TP collectives and pipeline sends, so that tensor-
parallel traffic is never called data-parallel.
"""

from __future__ import annotations

from typing import Protocol

from autopar.layout import CommBreakdown, Layout


class PricedLayout(Protocol):
    """What the explanation reads of a priced layout (``solvers.evaluate.Evaluation`` has these)."""

    @property
    def layout(self) -> Layout: ...
    @property
    def step_time_s(self) -> float: ...
    @property
    def pipeline_time_s(self) -> float: ...
    @property
    def optimizer_time_s(self) -> float: ...
    @property
    def communication(self) -> CommBreakdown: ...
    @property
    def bubble_fraction(self) -> float: ...
    @property
    def peak_memory_bytes(self) -> int: ...


def explain_choice(winner: PricedLayout, runner_up: PricedLayout | None) -> tuple[str, ...]:
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


__all__ = ["PricedLayout", "explain_choice"]
