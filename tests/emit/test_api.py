"""``autopar.parallelize`` end to end: planning on rank 0, mixed precision, the training example."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.emit.harness import run_spmd

pytestmark = pytest.mark.multiproc

REPO = Path(__file__).resolve().parents[2]


def test_without_a_plan_rank_0_plans_and_every_rank_applies_it() -> None:
    results = run_spmd("tests.emit.workers:check_plan_on_rank0", 2)
    assert [r["calls"] for r in results] == [[0], []]  # only rank 0 ran the planner
    assert results[0]["plan"] == results[1]["plan"]
    assert json.loads(results[0]["plan"])["layout"]["zero_stage"] == 3  # the caller's constraints reached it
    assert results[0]["loss"] == results[1]["loss"]
    for r in results:  # rank 0's planning error reaches every rank instead of hanging them
        assert "nothing fits in 80 GiB; 3 nodes would" in r["error"]


def test_a_plan_from_the_planner_runs_and_matches_the_original() -> None:
    """``parallelize(model, inputs, cluster=..., global_batch_size=...)``: planned on rank 0, then emitted."""
    pins = {"dp": 2, "tp": 2, "pp": 1}  # sized to this 4-rank job
    # with SP pinned, dgx-h100's ILP replicates every tiny GPT weight: SP with no column-parallel module
    results = run_spmd("tests.emit.workers:check_planned_equivalence", 4, pins, 8, 3, ("gpt",))
    assert results[0]["gpt_sp"]["plan"].endswith(" sp")
    for family in ("gpt", "llama", "gpt_sp"):
        for got in (r[family] for r in results):
            assert got["plan"].startswith("dp2 tp2 pp1")
            assert got["sharded_kinds"] >= 2  # the solver's own ShardingPlans (blocks and more) were applied
            assert "DTensor" in got["param_types"]
            assert got["losses"] == pytest.approx(got["ref_losses"], abs=1e-5)
            assert got["max_diff"] < 1e-5


BF16_LAYOUTS = {"zero3_dp2": {"dp": 2, "zero_stage": 3},
                "pp2_interleaved": {"pp": 2, "schedule": "interleaved-1f1b", "virtual_stages": 2,
                                    "num_micro_batches": 4}}
"""bf16 plans run in one process group: data parallel, and pipelined (bf16 activations cross the stages)."""


def test_bfloat16_plans_compute_in_bf16_with_fp32_master_weights() -> None:
    for r in run_spmd("tests.emit.workers:check_bf16", 2, list(BF16_LAYOUTS.values())):
        for name, got in zip(BF16_LAYOUTS, r, strict=True):
            assert got["compute_dtypes"] == ["torch.bfloat16"], name
            assert got["param_dtypes"] == ["torch.float32"], name
            assert got["losses"] == pytest.approx(got["ref_losses"], abs=1e-2), name
            assert got["losses"] != pytest.approx(got["ref_losses"], abs=1e-6), name  # really computed in bf16


def test_train_gpt_example_learns_with_the_planner_and_with_a_plan_file(tmp_path: Path) -> None:
    from autopar.examples import train_gpt

    pinned = run_spmd("tests.emit.workers:run_train_gpt", 2, ["--dp", "2", "--zero-stage", "2", "--steps", "4"])
    assert pinned[0] == pinned[1]
    assert pinned[0][-1] < pinned[0][0] - 0.1
    cfg = train_gpt.parse_args(["--pp", "2", "--schedule", "gpipe", "--num-micro-batches", "4"])
    model = train_gpt.build_model(cfg)
    plan = train_gpt.hand_written_plan(cfg, model, (torch.zeros(2, cfg.seq_len, dtype=torch.long),))
    plan.save(tmp_path / "plan.json")
    from_file = run_spmd("tests.emit.workers:run_train_gpt", 2, ["--plan", str(tmp_path / "plan.json"), "--steps", "4"])
    assert from_file[0] == from_file[1]
    assert from_file[0][-1] < from_file[0][0] - 0.1


@pytest.mark.slow
def test_train_gpt_under_torchrun(tmp_path: Path) -> None:
    """The documented launch: torchrun sets the environment, parallelize creates the process group."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.pop("TORCH_DISTRIBUTED_DEBUG", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(REPO / "examples" / "train_gpt.py"), "--dp", "2", "--hand-written", "--steps", "2",
           "--save", str(tmp_path / "ckpt")]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "step 0 loss" in out.stdout and "step 1 loss" in out.stdout
    assert (tmp_path / "ckpt" / "step_00000002" / ".metadata").is_file()  # a published checkpoint per save
