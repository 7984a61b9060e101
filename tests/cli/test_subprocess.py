"""End to end: ``python -m autopar`` as a user runs it, success and error paths, real planner.

Each start costs ~0.5 s (show, export, clusters: no torch) or ~2–7 s (plan: torch, capture, search).
"""

from __future__ import annotations

import json
from pathlib import Path

from autopar.plan import Plan
from tests.cli.conftest import autopar
from tests.report.sample_plans import uneven_plan


def test_help_lists_every_command() -> None:
    r = autopar("--help")
    assert r.rc == 0
    for command in ("plan", "show", "export", "profile", "clusters", "--install-completion"):
        assert command in r.out
    assert autopar("plan", "--help").rc == 0 and "--pin" in autopar("plan", "--help").out


def test_clusters_and_bad_cluster_specs(tmp_path: Path) -> None:
    r = autopar("clusters")
    assert r.rc == 0 and "dgx-h100" in r.out and "H100-SXM5-80GB" in r.out
    r = autopar("plan", "gpt:tiny", "--cluster", "dgx-h900", "--global-batch", "8")
    assert r.rc == 2 and "unknown cluster preset 'dgx-h900'; choose one of" in r.err
    bad = tmp_path / "bad.yaml"
    bad.write_text("preset: dgx-h100\nnodes: [1, 2\n")
    r = autopar("plan", "gpt:tiny", "--cluster", str(bad), "--global-batch", "8")
    assert r.rc == 2 and "not valid YAML" in r.err and "Traceback" not in r.err


def test_model_files_that_fail(tmp_path: Path) -> None:
    broken = tmp_path / "broken.py"
    broken.write_text("import torch\ndef build(:\n")
    r = autopar("plan", f"{broken}:build", "--cluster", "dgx-h100", "--global-batch", "8")
    assert r.rc == 2 and "cannot import" in r.err and "SyntaxError" in r.err
    raising = tmp_path / "raising.py"
    raising.write_text("def build():\n    raise RuntimeError('no weights here')\n")
    r = autopar("plan", f"{raising}:build", "--cluster", "dgx-h100", "--global-batch", "8")
    assert r.rc == 2 and "factory" in r.err and "RuntimeError: no weights here" in r.err
    r = autopar("plan", f"{raising}:missing", "--cluster", "dgx-h100", "--global-batch", "8")
    assert r.rc == 2 and "has no callable 'missing'" in r.err and "build" in r.err


def test_plan_show_export_round_trip(tmp_path: Path) -> None:
    out = tmp_path / "plan.json"
    r = autopar("plan", "gpt:small", "--cluster", "dgx-h100", "--global-batch", "64", "--top", "3", "--json",
                "--out", str(out))
    assert r.rc == 0, r.err
    ranked = json.loads(r.out)
    assert 1 <= len(ranked) <= 3
    steps = [p["predicted"]["step_time_s"] for p in ranked]
    assert steps == sorted(steps)  # best first
    best = Plan.load(out)
    assert best.to_dict() == ranked[0] and best.model_name == "gpt:small"
    r = autopar("show", str(out), "--model", "gpt:small", "--chart", str(tmp_path / "plan.png"))
    assert r.rc == 0 and r.out.startswith("gpt:small on dgx-h100") and (tmp_path / "plan.png").exists()
    r = autopar("export", str(out), "--to", "megatron")
    assert r.rc == 0 and f"--tensor-model-parallel-size {best.layout.tp}" in r.out
    r = autopar("show", str(out), "--model", "gpt:125m", "--seq", "512")  # another sequence length
    assert r.rc == 2 and "re-plan for this model" in r.err


def test_infeasible_request_names_what_would_fit() -> None:
    r = autopar("plan", "gpt:22b", "--cluster", "dgx-a100-40gb", "--global-batch", "64")
    assert r.rc == 1
    assert "no plan fits on 8 GPUs" in r.err and "it would fit on" in r.err and "Traceback" not in r.err


def test_bad_plan_files(tmp_path: Path) -> None:
    good = tmp_path / "good.json"
    uneven_plan().save(good)
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text(good.read_text()[: len(good.read_text()) // 2])
    r = autopar("show", str(corrupt))
    assert r.rc == 2 and "not valid JSON" in r.err and "corrupt" in r.err
    future = tmp_path / "future.json"
    future.write_text(json.dumps({**json.loads(good.read_text()), "schema_version": 99}))
    r = autopar("export", str(future), "--to", "megatron")
    assert r.rc == 2 and "schema version 99 is not supported" in r.err
    r = autopar("export", str(good), "--to", "deepspeed")
    assert r.rc == 2 and "ZeRO stage 0 or 1, not 3" in r.err
    r = autopar("export", str(good), "--to", "megatron", "--out", str(tmp_path / "args.sh"))
    assert r.rc == 0 and "--pipeline-model-parallel-layout 'Et*5|t*7|t*7|t*5L'" in (tmp_path / "args.sh").read_text()


def test_profile_writes_a_calibration_table(tmp_path: Path) -> None:
    from autopar.cost_models.profiling.calibration import CalibrationTable

    out = tmp_path / "calib.json"
    r = autopar("profile", "mlp:tiny", "--device", "cpu", "--repeats", "1", "--out", str(out), "--batch", "2",
                "--also-batch", "1", "--also-batch", "8")
    assert r.rc == 0, r.err
    table = CalibrationTable.load(out)
    assert r.out.startswith(f"{len(table.entries)} ops timed on {table.device_name}")
    assert len(table.entries) >= 3  # mlp:tiny has 3 distinct matmuls, GELU, ...
    # the ops whose shapes follow the batch are also measured at batch 1 and 8 (scales 0.5 and 4 of batch 2)
    assert table.batch_entries and all(set(p) == {0.5, 4.0} for p in table.batch_entries.values())
    # a table measured on this CPU never prices an H100 (it once gave 729 s/step, labelled "profiled")
    r = autopar("plan", "mlp:tiny", "-c", "dgx-h100", "-b", "8", "--calibration", str(out), "--json")
    assert r.rc == 2 and table.device_name in r.err and "H100-SXM5-80GB" in r.err, (r.rc, r.err)


def test_profile_local_cluster_writes_a_cluster_the_planner_reads(tmp_path: Path) -> None:
    from autopar.cost_models.cluster import Cluster
    from autopar.cost_models.profiling.calibration import CalibrationTable

    out, yaml_file = tmp_path / "calib.json", tmp_path / "here.yaml"
    r = autopar("profile", "mlp:tiny", "--ranks", "2", "--out", str(out), "--cluster-out", str(yaml_file))
    assert r.rc == 0, r.err
    table, cluster = CalibrationTable.load(out), Cluster.from_yaml(yaml_file)
    assert cluster.num_gpus == 2 and cluster.gpu.name == table.device_name and table.device_name.endswith(":1threads")
    assert "all_reduce" in yaml_file.read_text() and "p2p" in yaml_file.read_text()  # per-kind fits recorded
    r = autopar("plan", "mlp:tiny", "-c", str(yaml_file), "-b", "8", "--calibration", str(out), "--json",
                "--dtype", "float32")
    assert r.rc == 0, r.err
    sources = json.loads(r.out)[0]["predicted"]["sources"]
    assert sources["calibration"] == table.device_name and "profiled" in sources["compute"]
