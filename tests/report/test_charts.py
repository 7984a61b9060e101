"""Charts: what is drawn (bars per event, stacked memory terms, capacity lines), PNG and HTML files."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from autopar.errors import PlanValidationError, UserInputError  # noqa: E402
from autopar.report.charts import MEMORY_TERMS, build_figure, save_chart  # noqa: E402
from autopar.report.html import is_self_contained  # noqa: E402
from autopar.report.timeline import timeline_from_plan  # noqa: E402
from tests.report.sample_plans import gpt175b_plan, interleaved_plan  # noqa: E402


def test_figure_draws_every_event_and_every_memory_term() -> None:
    plan = interleaved_plan()
    timeline = timeline_from_plan(plan)
    fig = build_figure(plan, timeline)
    ax_time, ax_mem = fig.axes
    drawn = [e for e in timeline.events if e.end_s > e.start_s]
    assert len(ax_time.patches) == len(drawn)
    assert ax_time.get_xlim()[1] == pytest.approx(timeline.makespan_s)
    # one stacked bar per term per pipeline rank, heights = the plan's bytes in GiB
    assert len(ax_mem.patches) == len(MEMORY_TERMS) * plan.layout.pp
    heights = [p.get_height() for p in ax_mem.patches]
    expected = [getattr(m, term) / 2**30 for term, _ in MEMORY_TERMS for m in plan.predicted.memory]
    assert heights == pytest.approx(expected)
    capacity = [c for c in ax_mem.collections if c.get_segments()]
    assert len(capacity) == plan.layout.pp
    assert capacity[0].get_segments()[0][0][1] == pytest.approx(40.0)


def test_capped_timeline_says_so() -> None:
    fig = build_figure(gpt175b_plan())
    assert "showing the first 32 of 64 micro-batches" in fig.axes[0].get_title()


def test_png_file(tmp_path: Path) -> None:
    out = save_chart(gpt175b_plan(), tmp_path / "plan.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert width == 1440 and height > 600  # 12 in × 120 dpi


def test_html_is_self_contained(tmp_path: Path) -> None:
    page = save_chart(interleaved_plan(), tmp_path / "plan.html").read_text()
    assert is_self_contained(page)
    assert page.count("<svg") == 1 and "<h2>Stages</h2>" in page
    assert page.count("<tr>") == 1 + 8 + 1 + 4 + 1 + 2  # stages, memory and comm tables with their headers
    assert not is_self_contained(page.replace("<h2>Stages</h2>", "<script src='https://x/y.js'></script>"))


def test_bad_chart_requests(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="must end in"):
        save_chart(gpt175b_plan(), tmp_path / "plan.jpg")
    with pytest.raises(UserInputError, match="cannot write chart"):
        save_chart(gpt175b_plan(), tmp_path / "missing-dir" / "plan.png")
    plan = interleaved_plan()
    import dataclasses

    odd = dataclasses.replace(plan, layout=dataclasses.replace(plan.layout, num_micro_batches=9, dp=2))
    with pytest.raises(PlanValidationError, match="cannot draw the pipeline"):
        build_figure(dataclasses.replace(odd, num_gpus_available=16))
