"""Plans as plain text for people: the ranked list and the full account of one plan.

Everything here returns strings (no terminal codes), so the output is the same
in a terminal, a pipe and a golden test.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from autopar.plan import Plan, ShardingPlan

GIB = 2**30
"""Bytes per GiB."""
MIB = 2**20
"""Bytes per MiB."""
MAX_STRATEGIES = 6
"""Op strategies listed per layer kind (most common first)."""


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]], *, right: Sequence[bool] = (),
                 indent: str = "  ") -> str:
    """Align columns with two spaces between them; numbers are right-aligned where ``right`` says.

    Example:
        >>> print(format_table(["a", "bb"], [["x", "1"], ["yyy", "22"]], right=[False, True]))
          a    bb
          x     1
          yyy  22
    """
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows)]
    flags = list(right) + [False] * (len(headers) - len(right))

    def line(cells: Sequence[str]) -> str:
        parts = [c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, flags)]
        return (indent + "  ".join(parts)).rstrip()

    return "\n".join([line(headers), *(line(r) for r in rows)])


@dataclass(frozen=True, slots=True, kw_only=True)
class RankedRow:
    """One line of the ranked table, formatted."""

    rank: str
    """Position, 1 = best."""
    layout: str
    """``Layout.describe()``."""
    gpus: str
    """GPUs used of GPUs available."""
    step: str
    """Predicted step time."""
    tflops: str
    """Model TFLOP/s per GPU."""
    mfu: str
    """Model FLOPs utilization."""
    memory: str
    """Peak memory per GPU vs capacity."""
    bubble: str
    """Pipeline bubble share."""


RANKED_HEADERS = ("#", "layout", "GPUs", "step", "TFLOP/s/GPU", "MFU", "peak mem / GPU", "bubble")
"""Column titles of the ranked table, in ``RankedRow`` field order."""


def ranked_rows(plans: Sequence[Plan]) -> list[RankedRow]:
    """Rows of the ranked table, best plan first (the order given)."""
    rows = []
    for i, plan in enumerate(plans, start=1):
        p = plan.predicted
        capacity = min(m.capacity for m in p.memory)
        rows.append(RankedRow(
            rank=str(i),
            layout=plan.layout.describe(),
            gpus=f"{plan.layout.num_gpus}/{plan.num_gpus_available}",
            step=f"{p.step_time_s:.3f} s",
            tflops=f"{p.model_tflops_per_gpu:.1f}",
            mfu=f"{p.mfu:.1%}",
            memory=f"{p.peak_memory_bytes / GIB:.1f} / {capacity / GIB:.1f} GiB",
            bubble=f"{p.bubble_fraction:.1%}",
        ))
    return rows


def format_ranked(plans: Sequence[Plan]) -> str:
    """The ranked table as plain text, with a title line naming the model and cluster."""
    if not plans:
        return "no plans"
    first = plans[0]
    rows = [[r.rank, r.layout, r.gpus, r.step, r.tflops, r.mfu, r.memory, r.bubble] for r in ranked_rows(plans)]
    title = f"{first.model_name} on {first.cluster_name}, global batch {first.layout.global_batch_size}, " \
            f"seq {first.seq_len}"
    table = format_table(RANKED_HEADERS, rows, right=[True, False, True, True, True, True, True, True])
    return f"{title}\n{table}"


def format_goodput(plans: Sequence[Plan]) -> str:
    """Throughput, goodput and checkpoint interval of each ranked plan ('' when none was estimated)."""
    rows = [[str(i), f"{p.predicted.tokens_per_s:,.0f}", f"{r.goodput_tokens_per_s:,.0f}", f"{r.goodput_fraction:.1%}",
             f"{r.interval_steps} steps = {r.interval_s / 60:.1f} min", r.mode.value, f"{r.mtbf_s / 3600:.2f} h"]
            for i, p in enumerate(plans, start=1) if (r := p.reliability) is not None]
    if not rows:
        return ""
    headers = ("#", "tokens/s", "goodput tokens/s", "kept", "checkpoint every", "save", "job MTBF")
    return "Goodput (failures, restarts and checkpoints paid for)\n" + format_table(
        headers, rows, right=[True, True, True, True, False, False, True])


def format_plan(plan: Plan) -> str:
    """The full account of one plan: headline, stages, sharding, memory, communication, and why it won."""
    headline = plan.explain().splitlines()
    if plan.explanation:
        headline = headline[: len(headline) - len(plan.explanation)]
    sections = [
        "\n".join(headline),
        "Stages\n" + _stages_table(plan),
        _sharding_section(plan),
        "Memory per GPU (GiB)\n" + _memory_table(plan),
        "Communication per step (on the critical path)\n" + _comm_table(plan),
        *([_reliability_section(plan)] if plan.reliability is not None else []),
        "Why this plan\n" + ("\n".join(f"  {line.rstrip()}" for line in plan.explanation)
                             if plan.explanation else "  (no runner-up was recorded)"),
    ]
    if plan.predicted.sources:
        sources = ", ".join(f"{k}={v}" for k, v in sorted(plan.predicted.sources.items()))
        sections.append(f"Numbers from: {sources}")
    return "\n\n".join(sections)


def _reliability_section(plan: Plan) -> str:
    r = plan.reliability
    assert r is not None
    lines = [f"  job MTBF {r.mtbf_s / 3600:.2f} h; checkpoint {r.checkpoint_total_bytes / 1e9:,.1f} GB "
             f"({r.checkpoint_bytes_per_gpu / GIB:.2f} GiB on the fullest GPU)",
             f"  save: sync {r.save_sync_s:.1f} s, async stall {r.save_async_stall_s:.1f} s (durable after "
             f"{r.save_async_s:.1f} s); load {r.load_s:.1f} s",
             f"  {r.mode.value} checkpoint every {r.interval_steps} steps ({r.interval_s / 60:.1f} min; Young/Daly "
             f"{r.young_daly_interval_s / 60:.1f} min); {r.loss_per_failure_s / 60:.1f} min lost per failure",
             f"  throughput {r.throughput_tokens_per_s:,.0f} tokens/s, goodput {r.goodput_tokens_per_s:,.0f} "
             f"({r.goodput_fraction:.1%})"]
    if plan.contingencies:
        lines.append("  precomputed for lost nodes: " + ", ".join(
            f"{(plan.num_gpus_available - c.num_gpus_available) // plan.gpus_per_node} → {c.layout.describe()}"
            for c in plan.contingencies))
    if plan.replanned_from is not None:
        rec = plan.replanned_from
        lines.append(f"  re-planned ({rec.method}, {rec.solve_time_s:.3f} s) from {rec.previous_layout} after losing "
                     f"{rec.lost_nodes} node(s): " + "; ".join(rec.changes or ("no layout change",)))
        lines.extend(f"    {why}" for why in rec.reasons)
    return "Failures and checkpoints\n" + "\n".join(lines)


def compress_paths(paths: Sequence[str]) -> str:
    """A short form of a stage's module paths; the root module shows as ``(root)``.

    Example:
        >>> compress_paths(["", "blocks.0", "blocks.1", "blocks.2"])
        '(root), blocks.0 … blocks.2'
    """
    names = [p or "(root)" for p in paths]
    if len(names) <= 3:
        return ", ".join(names)
    return f"{names[0]}, {names[1]} … {names[-1]}"


def _stages_table(plan: Plan) -> str:
    rows = [[str(s.index), str(s.pp_rank), f"{s.layer_start}-{s.layer_end - 1}", str(s.num_layers),
             compress_paths(s.module_paths), s.recompute.value, f"{s.forward_time_s * 1e3:.2f}",
             f"{s.backward_time_s * 1e3:.2f}"] for s in plan.stages]
    headers = ["stage", "rank", "layers", "n", "modules", "recompute", "fwd ms", "bwd ms"]
    return format_table(headers, rows, right=[True, True, True, True, False, False, True, True])


def _sharding_section(plan: Plan) -> str:
    tp = plan.layout.tp
    if tp == 1:
        return "Sharding\n  none (tp=1): every GPU of a stage holds whole layers"
    kinds: dict[str, tuple[ShardingPlan, list[int]]] = {}
    for stage in plan.stages:
        for sp in stage.sharding:
            kinds.setdefault(sp.layer_kind, (sp, []))[1].append(stage.index)
    if not kinds:
        return f"Sharding (tp={tp})\n  not recorded in this plan"
    parts = [f"Sharding (tp={tp}{', sequence parallel' if plan.layout.sequence_parallel else ''})"]
    for kind, (sp, stages) in kinds.items():
        parts.append(f"  layer kind {kind} (stages {_ranges(stages)})")
        module_rows = [[path, style.value] for path, style in sp.modules.items()]
        if module_rows:
            parts.append(format_table(["module", "style"], module_rows, indent="    "))
        if sp.ops:
            counts = Counter(sp.ops.values()).most_common()
            shown = ", ".join(f"{n} × {strategy}" for strategy, n in counts[:MAX_STRATEGIES])
            rest = sum(n for _, n in counts[MAX_STRATEGIES:])
            parts.append(f"    ops: {shown}" + (f", and {rest} more op(s)" if rest else ""))
        if sp.forward_collectives:
            parts.append("    forward collectives per micro-batch: " + _collectives(sp.forward_collectives))
    return "\n".join(parts)


def _collectives(items: Sequence[tuple[str, int]]) -> str:
    count: Counter[str] = Counter()
    nbytes: Counter[str] = Counter()
    for kind, size in items:
        count[kind] += 1
        nbytes[kind] += size
    return ", ".join(f"{kind} ×{count[kind]} ({nbytes[kind] / MIB:.1f} MiB)" for kind in count)


def _ranges(indices: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` → ``"0-2, 5"``."""
    out: list[str] = []
    start = prev = indices[0]
    for i in [*indices[1:], None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        out.append(f"{start}-{prev}" if prev > start else str(start))
        if i is not None:
            start = prev = i
    return ", ".join(out)


def _memory_table(plan: Plan) -> str:
    rows = []
    for rank, m in enumerate(plan.predicted.memory):
        cells = [m.params, m.grads, m.optimizer, m.activations, m.buffers, m.total, m.capacity]
        status = "ok" if m.fits else "OVER"
        rows.append([str(rank), *(f"{c / GIB:.2f}" for c in cells), f"{(m.capacity - m.total) / GIB:.2f}", status])
    headers = ["rank", "params", "grads", "optimizer", "activations", "buffers", "total", "capacity", "free", ""]
    return format_table(headers, rows, right=[True] * 9 + [False])


def _comm_table(plan: Plan) -> str:
    comm = plan.predicted.communication.terms()
    if not comm:
        return "  none"
    step = plan.predicted.step_time_s
    rows = [[kind, f"{t:.3f} s", f"{t / step:.1%}"] for kind, t in comm.items()]
    return format_table(["kind", "time", "of step"], rows, right=[False, True, True])


__all__ = [
    "RANKED_HEADERS",
    "RankedRow",
    "compress_paths",
    "format_plan",
    "format_ranked",
    "format_table",
    "ranked_rows",
]
