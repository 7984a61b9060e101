"""Charts of a plan: the pipeline timeline and the per-stage memory against capacity.

``save_chart(plan, "out.png")`` draws both into one PNG (matplotlib, Agg backend);
``"out.svg"`` gives the same as SVG; ``"out.html"`` a self-contained page (see
``autopar/report/html.py``). matplotlib is imported only when a chart is drawn.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING

from autopar._io import write_atomic
from autopar.errors import PlanValidationError, UserInputError
from autopar.plan import Plan
from autopar.report.timeline import EventKind, Timeline, timeline_from_plan

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

GIB = 2**30
"""Bytes per GiB."""

KIND_COLORS: dict[EventKind, str] = {
    EventKind.FORWARD: "#4C78A8",
    EventKind.BACKWARD: "#F58518",
    EventKind.COMM: "#B279A2",
    EventKind.BUBBLE: "#E8E8E8",
}
"""Timeline colours per event kind."""

MEMORY_TERMS: tuple[tuple[str, str], ...] = (
    ("params", "#4C78A8"),
    ("grads", "#72B7B2"),
    ("optimizer", "#54A24B"),
    ("activations", "#F58518"),
    ("buffers", "#BAB0AC"),
)
"""Memory terms in stacking order, with their colours."""

CHART_SUFFIXES = (".png", ".svg", ".html")
"""File types ``save_chart`` writes."""

LABEL_PX_PER_CHAR = 4.5
"""Width of one 6-pt digit at the chart's 120 dpi, in pixels."""
MAX_LABELLED_PASSES = 24
"""Micro-batch numbers are drawn only when a rank runs at most this many forward passes."""
AXIS_WIDTH_PX = 1150.0
"""Width of the timeline's axis in the 12-inch, 120-dpi figure, in pixels."""


def build_figure(plan: Plan, timeline: Timeline | None = None) -> Figure:
    """A figure with the pipeline timeline on top and the memory bars below.

    Args:
        plan: the plan to draw.
        timeline: a simulated timeline; by default ``timeline_from_plan(plan)``.

    Returns:
        A matplotlib figure (not attached to any GUI backend).

    Raises:
        PlanValidationError: the plan's schedule cannot be simulated (e.g. micro-batches that
            interleaved 1F1B cannot group).
    """
    from matplotlib.figure import Figure

    if timeline is None:
        try:
            timeline = timeline_from_plan(plan)
        except ValueError as e:
            raise PlanValidationError(f"cannot draw the pipeline of this plan: {e}") from e
    rows = timeline.num_ranks
    fig = Figure(figsize=(12, 3.2 + min(rows, 32) * 0.32 + 3.2), layout="constrained")
    ax_time, ax_mem = fig.subplots(2, 1, height_ratios=[1.0 + min(rows, 32) * 0.12, 1.0])
    draw_timeline(ax_time, plan, timeline)
    draw_memory(ax_mem, plan)
    fig.suptitle(f"{plan.model_name} on {plan.cluster_name}: {plan.layout.describe()}", fontsize=12)
    return fig


def draw_timeline(ax: Axes, plan: Plan, timeline: Timeline) -> None:
    """Pipeline ranks × time, one bar per event, coloured by kind, micro-batch numbers where they fit.

    With interleaved schedules, later model chunks are drawn in lighter shades of their kind's colour.
    """
    from matplotlib.patches import Patch

    span = timeline.makespan_s or 1.0
    v = plan.layout.virtual_stages
    labels = timeline.num_micro_batches * v <= MAX_LABELLED_PASSES  # past that, numbers are noise
    for ev in timeline.events:
        width = ev.end_s - ev.start_s
        if width <= 0:
            continue
        ax.barh(ev.stage, width, left=ev.start_s, height=0.8, color=_shade(KIND_COLORS[ev.kind], ev.chunk, v),
                edgecolor="white" if ev.kind is not EventKind.BUBBLE else "none", linewidth=0.4)
        text = str(ev.micro_batch)
        if labels and ev.kind in (EventKind.FORWARD, EventKind.BACKWARD) and width / span > _label_share(text):
            ax.text(ev.start_s + width / 2, ev.stage, text, ha="center", va="center", fontsize=6, color="white")
    ax.set_ylim(timeline.num_ranks - 0.5, -0.5)
    ax.set_yticks(range(timeline.num_ranks), [f"rank {r}" for r in range(timeline.num_ranks)],
                  fontsize=7 if timeline.num_ranks > 16 else 9)
    ax.set_xlim(0, span)
    ax.set_xlabel("time (s)")
    ax.set_title(_timeline_title(plan, timeline), fontsize=10)
    handles = []
    for kind, color in KIND_COLORS.items():
        chunked = v > 1 and kind in (EventKind.FORWARD, EventKind.BACKWARD)
        handles += ([Patch(color=_shade(color, c, v), label=f"{kind.value} (chunk {c})") for c in range(v)]
                    if chunked else [Patch(color=color, label=kind.value)])
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=8, frameon=False)


def _shade(color: str, chunk: int, num_chunks: int) -> str:
    """``color`` blended towards white by up to 55% for the last of ``num_chunks`` chunks."""
    if num_chunks <= 1 or chunk == 0:
        return color
    t = 0.55 * chunk / (num_chunks - 1)
    rgb = [int(color[i:i + 2], 16) for i in (1, 3, 5)]
    return "#" + "".join(f"{round(c + (255 - c) * t):02x}" for c in rgb)


def _label_share(text: str) -> float:
    """Share of the time axis a label of this many characters needs (6-pt text on a ~1200-pixel axis)."""
    return (len(text) * LABEL_PX_PER_CHAR + 4) / AXIS_WIDTH_PX


def _timeline_title(plan: Plan, timeline: Timeline) -> str:
    lay = plan.layout
    kind = lay.schedule.value if lay.pp > 1 else "no pipeline, gradient accumulation"
    title = (f"pipeline: {kind}, pp={lay.pp}"
             f"{f', v={lay.virtual_stages}' if lay.virtual_stages > 1 else ''}; simulated "
             f"{timeline.makespan_s:.3f} s for {timeline.num_micro_batches} micro-batches")
    if timeline.capped:
        title += (f"\nshowing the first {timeline.num_micro_batches} of {timeline.total_micro_batches} "
                  f"micro-batches (the steady state repeats); predicted step {plan.predicted.step_time_s:.3f} s")
    else:
        title += f"; predicted step {plan.predicted.step_time_s:.3f} s"
    return title


def draw_memory(ax: Axes, plan: Plan) -> None:
    """Stacked bars of each pipeline rank's peak memory by term, with its capacity as a red line."""
    memory = plan.predicted.memory
    ranks = range(len(memory))
    bottom = [0.0] * len(memory)
    for term, color in MEMORY_TERMS:
        values = [getattr(m, term) / GIB for m in memory]
        ax.bar(ranks, values, bottom=bottom, color=color, label=term, width=0.7)
        bottom = [b + v for b, v in zip(bottom, values)]
    for r, m in enumerate(memory):
        ax.hlines(m.capacity / GIB, r - 0.45, r + 0.45, colors="#D62728", linewidth=2)
    ax.plot([], [], color="#D62728", linewidth=2, label="capacity")
    top = max(max(m.total, m.capacity) for m in memory) / GIB
    ax.set_ylim(0, top * 1.12)
    ax.set_xticks(list(ranks), [f"rank {r}" for r in ranks], fontsize=7 if len(memory) > 16 else 9)
    ax.set_ylabel("GiB per GPU")
    over = [r for r, m in enumerate(memory) if not m.fits]
    status = f"over capacity on ranks {over}" if over else "fits on every rank"
    ax.set_title(f"peak memory per GPU by pipeline rank ({status})", fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=8, frameon=False)


def figure_bytes(fig: Figure, fmt: str) -> bytes:
    """Render a figure as ``png`` or ``svg`` bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=120)
    return buf.getvalue()


def save_chart(plan: Plan, path: str | Path) -> Path:
    """Draw the plan's charts to ``path``: ``.png``, ``.svg`` or a self-contained ``.html``.

    Args:
        plan: the plan.
        path: where to write; the suffix picks the format.

    Returns:
        The path written.

    Raises:
        UserInputError: unknown suffix, matplotlib missing, or the file cannot be written.
        PlanValidationError: the plan's schedule cannot be simulated.
    """
    out = Path(path)
    suffix = out.suffix.lower()
    if suffix not in CHART_SUFFIXES:
        raise UserInputError(f"chart file {str(out)!r} must end in {', '.join(CHART_SUFFIXES)}")
    try:
        import matplotlib  # noqa: F401  (checked here so the error names the missing extra)
    except ImportError as e:
        raise UserInputError("charts need matplotlib: pip install 'autopar[charts]'") from e
    fig = build_figure(plan)
    if suffix == ".html":
        from autopar.report.html import render_html

        data = render_html(plan, figure_bytes(fig, "svg").decode()).encode()
    else:
        data = figure_bytes(fig, suffix[1:])
    return write_atomic(out, data, what="cannot write chart")  # temporary file and rename: never half a chart


__all__ = ["CHART_SUFFIXES", "build_figure", "draw_memory", "draw_timeline", "figure_bytes", "save_chart"]
