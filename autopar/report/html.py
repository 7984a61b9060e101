"""A plan as one self-contained HTML page: inline SVG charts and tables, no scripts, no links out."""

from __future__ import annotations

import html
import re
from collections.abc import Sequence

from autopar.plan import Plan
from autopar.report.text import GIB, compress_paths

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1200px; }
h1 { font-size: 1.4em; } h2 { font-size: 1.1em; margin-top: 1.6em; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.over { color: #b00; font-weight: bold; }
svg { max-width: 100%; height: auto; }
"""


def render_html(plan: Plan, svg: str) -> str:
    """The page: headline, the charts (``svg``, inline), then stages, memory, communication, why.

    Args:
        plan: the plan.
        svg: the chart as SVG text (from ``charts.figure_bytes(fig, "svg")``).

    Returns:
        HTML text with no external resources.
    """
    p = plan.predicted
    headline = [html.escape(line.strip()) for line in plan.explain().splitlines()]
    body = [
        f"<h1>{html.escape(plan.model_name)} on {html.escape(plan.cluster_name)}</h1>",
        "<p>" + "<br>".join(headline) + "</p>",
        "<h2>Pipeline timeline and memory</h2>",
        _inline_svg(svg),
        "<h2>Stages</h2>",
        _table(["stage", "rank", "layers", "modules", "recompute", "fwd ms", "bwd ms"],
               [[str(s.index), str(s.pp_rank), f"{s.layer_start}-{s.layer_end - 1}", compress_paths(s.module_paths),
                 s.recompute.value, f"{s.forward_time_s * 1e3:.2f}", f"{s.backward_time_s * 1e3:.2f}"]
                for s in plan.stages], numeric=(0, 1, 5, 6)),
        "<h2>Memory per GPU (GiB)</h2>",
        _memory_table(plan),
        "<h2>Communication per step (on the critical path)</h2>",
        _table(["kind", "seconds"], [[k, f"{v:.3f}"] for k, v in p.communication.terms().items()], numeric=(1,)),
    ]
    if plan.explanation:
        body += ["<h2>Why this plan</h2>", "<ul>" + "".join(f"<li>{html.escape(x.strip())}</li>"
                                                            for x in plan.explanation) + "</ul>"]
    title = html.escape(f"autopar plan: {plan.model_name}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{title}</title>"
            f"<style>{_STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def _inline_svg(svg: str) -> str:
    """Drop the XML prolog and doctype so the SVG can sit inside HTML."""
    start = svg.find("<svg")
    return svg[start:] if start >= 0 else ""


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], *, numeric: Sequence[int] = (),
           row_classes: Sequence[str] = ()) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    lines = [f"<table><tr>{head}</tr>"]
    for i, row in enumerate(rows):
        cls = f" class='{row_classes[i]}'" if i < len(row_classes) and row_classes[i] else ""
        cells = "".join(f"<td class='num'>{html.escape(c)}</td>" if j in numeric else f"<td>{html.escape(c)}</td>"
                        for j, c in enumerate(row))
        lines.append(f"<tr{cls}>{cells}</tr>")
    lines.append("</table>")
    return "".join(lines)


def _memory_table(plan: Plan) -> str:
    headers = ["rank", "params", "grads", "optimizer", "activations", "buffers", "total", "capacity"]
    rows, classes = [], []
    for r, m in enumerate(plan.predicted.memory):
        values = [m.params, m.grads, m.optimizer, m.activations, m.buffers, m.total, m.capacity]
        rows.append([str(r), *(f"{v / GIB:.2f}" for v in values)])
        classes.append("" if m.fits else "over")
    return _table(headers, rows, numeric=tuple(range(8)), row_classes=classes)


def is_self_contained(page: str) -> bool:
    """True when the page loads nothing from elsewhere: no scripts, no external src/href.

    Example:
        >>> is_self_contained("<p>ok</p>"), is_self_contained("<script src='x.js'></script>")
        (True, False)
    """
    if re.search(r"<script\b", page, re.IGNORECASE):
        return False
    return not re.search(r"""\b(?:src|href)\s*=\s*["'](?!#|data:)""", page, re.IGNORECASE)


__all__ = ["is_self_contained", "render_html"]
