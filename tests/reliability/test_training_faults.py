"""Faults during training: a killed rank, a stopped rank, a corrupt shard, a plan for another world size.

Each rank is a real process (``ranks.Job``, torchrun's environment without its agent),
so the tests see every rank's exit status, output and time to exit. The collective
timeout is ``TIMEOUT_S`` (``AUTOPAR_COLLECTIVE_TIMEOUT_S``), so the watchdog reports a
silent rank after half of it. Resumed runs and the uninterrupted reference run in the
fork-server harness (cheap starts).
"""

from __future__ import annotations

import json
import shutil
import signal
import time
from pathlib import Path

import pytest

from tests.emit.harness import run_spmd
from tests.reliability.ranks import Job, RankResult, wait_for

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]

TIMEOUT_S = 6.0
"""Collective timeout of these jobs; the watchdog's silence limit is half of it."""
STEPS = 8
"""Steps of the reference run and of the resumed runs."""
DP2 = ["--dp", "2", "--hand-written"]
"""The layout the interrupted run trains under."""
TP2 = ["--tp", "2", "--hand-written"]
"""Another layout on as many ranks (its num_micro_batches comes from the checkpoint's global batch)."""


def _losses(log: Path) -> dict[int, float]:
    return {int(r["step"]): float(r["loss"]) for r in map(json.loads, log.read_text().splitlines())}


def _one_line(result: RankResult) -> str:
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert len(lines) == 1, result.err
    return lines[0]


@pytest.fixture(scope="module")
def reference() -> list[float]:
    """Losses of an uninterrupted dp2 run of STEPS steps."""
    losses = run_spmd("tests.reliability.workers:run_train_gpt", 2, [*DP2, "--steps", str(STEPS)])
    assert losses[0] == losses[1] and len(losses[0]) == STEPS
    return losses[0]


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[RankResult], float]:
    """A dp2 run saving every 2 steps, rank 1 ``kill -9``-ed once its first checkpoint is published."""
    root = tmp_path_factory.mktemp("killed")
    job = Job([*DP2, "--steps", "1000", "--save", str(root), "--save-every", "2"], 2, timeout_s=TIMEOUT_S)
    wait_for(lambda: (root / "step_00000002").is_dir(), 180, "the first checkpoint")
    killed_at = time.monotonic()
    job.signal(1, signal.SIGKILL)
    results = job.wait(killed_at - job.started + 4 * TIMEOUT_S, ranks=[0])
    return root, results, results[0].exit_s - (killed_at - job.started)


def test_kill9_of_a_rank_ends_the_job_naming_it(killed_run: tuple[Path, list[RankResult], float]) -> None:
    _, results, exit_s = killed_run
    assert results[0].rc == 124 and results[1].rc == -signal.SIGKILL
    assert exit_s < TIMEOUT_S
    line = _one_line(results[0])
    assert line.startswith("error: rank 1 (") and "sent no heartbeat" in line and "Traceback" not in results[0].err


@pytest.mark.parametrize("layout", [DP2, TP2], ids=["same-layout", "other-layout"])
def test_resume_after_kill9_continues_the_loss_curve(killed_run: tuple[Path, list[RankResult], float],
                                                     reference: list[float], layout: list[str]) -> None:
    root = killed_run[0]
    assert not (root / "step_00000002.partial").exists()
    resumed = run_spmd("tests.reliability.workers:run_train_gpt", 2,
                       [*layout, "--steps", str(STEPS), "--resume", str(root / "step_00000002")])
    assert resumed[0] == resumed[1] and len(resumed[0]) == STEPS - 2
    if layout is DP2:
        assert resumed[0] == reference[2:]  # bit for bit: same layout, same data, same RNG, same LR
    else:
        assert resumed[0] == pytest.approx(reference[2:], rel=1e-5, abs=0)  # TP reduces in another order


def test_a_stopped_rank_ends_the_job_within_the_timeout(tmp_path: Path) -> None:
    log = tmp_path / "loss.jsonl"
    job = Job([*DP2, "--steps", "100000", "--loss-log", str(log)], 2, timeout_s=TIMEOUT_S)
    wait_for(lambda: log.exists() and len(log.read_text().splitlines()) >= 2, 180, "two steps")
    stopped_at = time.monotonic()
    job.signal(1, signal.SIGSTOP)
    results = job.wait(stopped_at - job.started + 4 * TIMEOUT_S, ranks=[0])
    assert results[0].rc == 124, results[0].err
    assert results[0].exit_s - (stopped_at - job.started) < TIMEOUT_S
    line = _one_line(results[0])
    assert line.startswith("error: rank 1 (") and "stopped, hung or dead" in line


def test_a_flipped_byte_in_a_shard_is_reported_once(killed_run: tuple[Path, list[RankResult], float],
                                                     tmp_path: Path) -> None:
    copy = tmp_path / "step_00000002"
    shutil.copytree(killed_run[0] / "step_00000002", copy)
    shard = copy / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    results = Job([*DP2, "--steps", "4", "--resume", str(copy)], 2, timeout_s=TIMEOUT_S).wait(180)
    assert [r.rc for r in results] == [2, 2]
    assert _one_line(results[0]) == (f"error: checkpoint file {str(shard)!r} is corrupt " +
                                     _one_line(results[0]).split(" is corrupt ", 1)[1])
    assert "restore it or resume from another checkpoint" in results[0].err
    assert results[1].err == "" and "weights_only" not in results[0].err


def test_a_plan_for_another_world_size_is_reported_once(tmp_path: Path) -> None:
    from autopar.examples import train_gpt

    plan = train_gpt.hand_written_plan(train_gpt.parse_args(["--dp", "2", "--tp", "2"]), *train_gpt.build())
    plan.save(tmp_path / "plan4.json")
    results = Job(["--plan", str(tmp_path / "plan4.json")], 2, timeout_s=TIMEOUT_S).wait(180)
    assert [r.rc for r in results] == [2, 2]
    assert _one_line(results[0]) == ("error: the plan uses dp·tp·pp = 4 ranks but the job has 2; launch with "
                                     "--nproc-per-node 4 (per node) or re-plan for 2 GPUs")
    assert results[1].err == ""
