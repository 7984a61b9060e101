"""Tables and charts for people: ranked plans, one plan's account, pipeline timelines, memory bars.

Text lives in ``text``, the schedule simulation in ``timeline`` (pure, no plotting),
matplotlib charts in ``charts`` and the self-contained HTML page in ``html``.
"""

from __future__ import annotations

from autopar.report.text import format_plan, format_ranked, ranked_rows
from autopar.report.timeline import Event, EventKind, simulate_schedule, timeline_from_plan

__all__ = [
    "Event",
    "EventKind",
    "format_plan",
    "format_ranked",
    "ranked_rows",
    "simulate_schedule",
    "timeline_from_plan",
]
