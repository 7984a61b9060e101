"""The commands in-process: output, exit statuses and files, with hand-built plans and a stand-in planner.

The planner is replaced (``autopar.api.plan_ranked``) so these tests pin down what the CLI does with
its answers; ``test_subprocess.py`` runs the real planner end to end.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from autopar.errors import InfeasiblePlanError
from autopar.layout import Pins
from autopar.plan import SCHEMA_VERSION, Plan, Recompute
from autopar.report.text import format_plan, format_ranked
from tests.report.sample_plans import data_parallel_plan, gpt175b_plan, interleaved_plan, uneven_plan


@pytest.fixture
def planner(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Replace ``autopar.api.plan_ranked`` with one that returns the sample plans; records each call."""
    import autopar.api

    calls: list[dict[str, Any]] = []

    def fake(model: Any, example_inputs: Any, **kwargs: Any) -> tuple[Plan, ...]:
        calls.append({"model": model, "inputs": example_inputs, **kwargs})
        kwargs["progress"]("search", 0.5)
        return (data_parallel_plan(), uneven_plan())[: kwargs["top_k"]]

    monkeypatch.setattr(autopar.api, "plan_ranked", fake)
    return calls


@pytest.fixture
def plan_file(tmp_path: Path) -> Path:
    path = tmp_path / "plan.json"
    interleaved_plan().save(path)
    return path


def test_plan_prints_ranked_table_and_saves_the_best(cli, planner, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "best.json"
    r = cli("plan", "gpt:tiny", "--cluster", "dgx-h100", "--nodes", "2", "--global-batch", "128", "--top", "2",
            "--pin", "tp=1", "--pin", "recompute=none", "--out", str(out))
    assert r.rc == 0, r.err
    (call,) = planner
    assert call["cluster"].num_gpus == 16 and call["global_batch_size"] == 128 and call["top_k"] == 2
    assert call["constraints"] == Pins(tp=1, recompute=Recompute.NONE)
    expected = [p.__class__.from_dict({**p.to_dict(), "model_name": "gpt:tiny"})
                for p in (data_parallel_plan(), uneven_plan())]
    assert r.out.startswith(format_ranked(expected) + "\n\n" + expected[0].explain())
    assert Plan.load(out) == expected[0]


def test_plan_json_is_the_ranked_plans(cli, planner) -> None:  # type: ignore[no-untyped-def]
    r = cli("plan", "gpt:tiny", "-c", "dgx-h100", "-b", "64", "--top", "2", "--json")
    assert r.rc == 0, r.err
    data = json.loads(r.out)
    assert [d["layout"]["dp"] for d in data] == [8, 4]
    assert all(d["schema_version"] == SCHEMA_VERSION and d["model_name"] == "gpt:tiny" for d in data)
    assert Plan.from_dict(data[1]).layout == uneven_plan().layout


def test_plan_maps_errors_to_exit_statuses(cli, planner, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    import autopar.api

    r = cli("plan", "gpt:tiny", "-c", "dgx-h100", "-b", "64", "--pin", "tpp=2")
    assert r.rc == 2 and "allowed keys: dp, tp, pp" in r.err and not planner
    r = cli("plan", "gpt:tiny", "-c", "no-such-preset", "-b", "64")
    assert r.rc == 2 and "unknown cluster preset 'no-such-preset'" in r.err
    r = cli("plan", "gpt:nope", "-c", "dgx-h100", "-b", "64")
    assert r.rc == 2 and "unknown GPT size 'nope'" in r.err

    def infeasible(*a: Any, **k: Any) -> Plan:
        raise InfeasiblePlanError("no plan fits on 8 GPUs: ...; it would fit on 4 node(s) of 8 × H100 (32 GPUs)")

    monkeypatch.setattr(autopar.api, "plan_ranked", infeasible)
    r = cli("plan", "gpt:tiny", "-c", "dgx-h100", "-b", "64")
    assert r.rc == 1 and "it would fit on 4 node(s)" in r.err and "Traceback" not in r.err

    def broken(*a: Any, **k: Any) -> Plan:
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(autopar.api, "plan_ranked", broken)
    r = cli("plan", "gpt:tiny", "-c", "dgx-h100", "-b", "64")
    assert r.rc == 3 and "internal error: ZeroDivisionError" in r.err and "Traceback" not in r.err
    assert "--debug" in r.err
    r = cli("--debug", "plan", "gpt:tiny", "-c", "dgx-h100", "-b", "64")
    assert r.rc == 3 and "Traceback" in r.err


def test_usage_errors_exit_2(cli) -> None:  # type: ignore[no-untyped-def]
    assert cli("plan", "gpt:tiny").rc == 2  # missing --cluster / --global-batch
    assert cli("frobnicate").rc == 2
    assert cli("plan", "gpt:tiny", "-c", "dgx-h100", "-b", "0").rc == 2
    assert cli("--help").rc == 0


def test_show_text_json_and_chart(cli, plan_file: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    r = cli("show", str(plan_file))
    assert r.rc == 0 and r.out == format_plan(interleaved_plan()) + "\n"
    r = cli("show", str(plan_file), "--json")
    assert json.loads(r.out) == interleaved_plan().to_dict()
    chart = tmp_path / "t.png"
    r = cli("show", str(plan_file), "--chart", str(chart))
    assert r.rc == 0 and chart.read_bytes()[:4] == b"\x89PNG" and "chart written" in r.err
    assert cli("show", str(plan_file), "--chart", str(tmp_path / "t.bmp")).rc == 2


def test_show_refuses_bad_plan_files(cli, plan_file: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text(plan_file.read_text()[:200])
    r = cli("show", str(corrupt))
    assert r.rc == 2 and "not valid JSON" in r.err
    old = tmp_path / "old.json"
    old.write_text(json.dumps({**json.loads(plan_file.read_text()), "schema_version": 0}))
    r = cli("show", str(old))
    assert r.rc == 2 and "schema version 0 is not supported" in r.err
    r = cli("show", str(tmp_path / "missing.json"))
    assert r.rc == 2 and "cannot read plan file" in r.err


def test_show_checks_the_model(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from autopar.capture import capture
    from autopar.models import resolve_model

    tiny = resolve_model("gpt:tiny", seq_len=64)
    fingerprint = capture(tiny.module, tiny.example_inputs).fingerprint()
    plan = data_parallel_plan()
    path = tmp_path / "p.json"
    Plan.from_dict({**plan.to_dict(), "graph_fingerprint": fingerprint, "seq_len": 64}).save(path)
    assert cli("show", str(path), "--model", "gpt:tiny").rc == 0
    r = cli("show", str(path), "--model", "mlp:tiny")
    assert r.rc == 2 and "re-plan for this model" in r.err
    r = cli("export", str(path), "--to", "json", "--model", "gpt:tiny", "--seq", "32")
    assert r.rc == 2 and f"graph fingerprint {fingerprint}" in r.err


def test_export_targets(cli, plan_file: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from autopar.export import export_plan

    for target in ("megatron", "torchtitan", "json"):
        r = cli("export", str(plan_file), "--to", target)
        assert r.rc == 0 and r.out == export_plan(interleaved_plan(), target).text
    r = cli("export", str(plan_file), "--to", "deepspeed")
    assert r.rc == 2 and "own 1F1B schedule" in r.err and r.out == ""


def test_export_writes_extras_next_to_out(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "plan.json"
    data_parallel_plan().save(path)
    out = tmp_path / "cfg" / "titan.txt"
    out.parent.mkdir()
    r = cli("export", str(path), "--to", "torchtitan", "--out", str(out))
    assert r.rc == 0 and r.out == ""
    assert out.read_text().startswith("# torchtitan 0.3 settings")
    assert (out.parent / "torchtitan-0.2.toml").read_text().startswith("# torchtitan 0.2.x settings")
    r = cli("export", str(path), "--to", "torchtitan")  # no --out: main text on stdout, the TOML on stderr
    assert r.out.startswith("# torchtitan 0.3") and "--- torchtitan-0.2.toml" in r.err


def test_clusters(cli) -> None:  # type: ignore[no-untyped-def]
    from autopar.cost_models.cluster import list_presets

    r = cli("clusters")
    assert r.rc == 0
    assert [line.split()[0] for line in r.out.splitlines()[1:len(list_presets()) + 1]] == list(list_presets())
    data = json.loads(cli("clusters", "--json").out)
    h100 = next(d for d in data if d["name"] == "dgx-h100")
    assert h100["peak_bf16_tflops"] == pytest.approx(989, rel=0.01) and h100["gpus_per_node"] == 8
    assert h100["intra_node"]["kind"] == "nvlink"


def test_json_schema_doc_names_every_key() -> None:
    """docs/cli-json.md documents every key that `plan --json` and `clusters --json` print."""
    import re

    from autopar.cost_models.cluster import Cluster
    from autopar.report.tables import cluster_dict

    doc = (Path(__file__).resolve().parents[2] / "docs" / "cli-json.md").read_text()
    table_keys = set(re.findall(r"^\| ([^|]+) \|", doc, re.MULTILINE))
    documented = {name.strip("`[] ") for cell in table_keys for part in cell.split(",")
                  for name in part.strip().split(".")}
    data = gpt175b_plan().to_dict()
    keys = set(data) | set(data["layout"]) | set(data["predicted"]) | set(data["stages"][0])
    missing = keys - documented
    assert not missing, missing
    for key in cluster_dict(Cluster.preset("dgx-h100")):
        assert f'"{key}"' in doc
