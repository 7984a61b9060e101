"""Faults during training: a killed rank and the re-planned resume, a stopped rank, a corrupt shard, a wrong plan.

Each rank is a real process (``ranks.Job``, torchrun's environment without its agent),
so the tests see every rank's exit status, output and time to exit. The collective
timeout is ``TIMEOUT_S`` (``AUTOPAR_COLLECTIVE_TIMEOUT_S``), so the watchdog reports a
silent rank after half of it. The runs on the survivors use the fork-server harness
(cheap starts), all in one process group.

The fault drill, as a user would run it (``examples/train_gpt.py``'s docstring): the planner
plans for 4 one-rank nodes (``examples/gloo-4x1.yaml``); 4 ranks train under that plan,
checkpointing every ``SAVE_EVERY`` steps; one rank is ``kill -9``-ed; ``autopar.replan``
plans for the 3 left (global batch 12 kept); 3 ranks resume from the last checkpoint.
"""

from __future__ import annotations

import json
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from autopar.emit.manifest import latest_checkpoint
from autopar.emit.watchdog import EXIT_HUNG
from autopar.plan import Plan
from tests.emit.harness import run_spmd
from tests.reliability.ranks import REPO, Job, RankResult, wait_for

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]

TIMEOUT_S = 6.0
"""Collective timeout of these jobs; the watchdog's silence limit is half of it."""
CLUSTER = REPO / "examples" / "gloo-4x1.yaml"
"""4 nodes of one CPU rank: losing a node loses a rank."""
GLOBAL_BATCH = 12
"""Samples per step: divisible over 4 ranks and over the 3 left."""
SAVE_EVERY = 4
"""Checkpoint interval of the killed run."""
LOGGED = SAVE_EVERY + 2
"""Steps the killed run has logged when it is killed: two past its first checkpoint, two before its next."""
STEPS = 7
"""Steps of the runs on the survivors (they resume at SAVE_EVERY)."""
SAVE_AT = 5
"""The step at which the resumed run saves (and the run under the same plan resumes)."""
KILLED = 2
"""The rank that is ``kill -9``-ed (neither watcher: rank 0 watches it)."""
DP2 = ["--dp", "2", "--hand-written"]
"""A 2-rank layout (its num_micro_batches comes from the checkpoint's global batch when resuming)."""

KilledRun = tuple[Path, list[RankResult], float]
"""(run directory with ``ckpt/`` and ``loss.jsonl``, every rank's result, seconds from the kill to rank 0's exit)."""


def _losses(log: Path) -> dict[int, float]:
    return {int(r["step"]): float(r["loss"]) for r in map(json.loads, log.read_text().splitlines())}


def _one_line(result: RankResult) -> str:
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert len(lines) == 1, result.err
    return lines[0]


def _reports(result: RankResult) -> list[str]:
    """What a rank said about the failure: its stderr less c10d's own log lines (``[W…]``/``[E…]`` and the
    C++ frames after them), which a loaded machine adds when a rank is slow to reach the store."""
    lines, in_c10d = [], False
    for line in result.err.splitlines():
        in_c10d = line.startswith(("[W", "[E")) or (in_c10d and line.startswith(("Exception raised", "frame #", " ")))
        if line.strip() and not in_c10d:
            lines.append(line)
    return lines


@pytest.fixture(scope="module")
def planned(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """The planner's plan for 4 one-rank nodes (data parallelism pinned to 4), saved; and the model's graph."""
    import autopar
    from autopar.examples import train_gpt

    model, example = train_gpt.build()
    plan = autopar.plan(model, example, cluster=CLUSTER, global_batch_size=GLOBAL_BATCH, dtype="float32",
                        constraints={"dp": 4, "tp": 1, "pp": 1, "micro_batch_size": 1})
    path = tmp_path_factory.mktemp("plans") / "plan4.json"
    plan.save(path)
    return path, autopar.capture(model, example)


@pytest.fixture(scope="module")
def killed_run(planned: tuple[Path, Any], tmp_path_factory: pytest.TempPathFactory) -> KilledRun:
    """4 ranks under the plan, checkpointing every SAVE_EVERY steps; rank KILLED ``kill -9``-ed after LOGGED steps."""
    root = tmp_path_factory.mktemp("killed")
    log = root / "loss.jsonl"
    job = Job(["--plan", str(planned[0]), "--steps", "1000", "--save", str(root / "ckpt"), "--save-every",
               str(SAVE_EVERY), "--loss-log", str(log)], 4, timeout_s=TIMEOUT_S)
    def past_first_checkpoint() -> bool:  # the next checkpoint is SAVE_EVERY - 2 steps away
        if any(proc.poll() is not None for proc in job.procs):
            raise AssertionError("a rank ended before the kill:\n" + "\n".join(r.err for r in job.wait(1)))
        return log.exists() and len(log.read_text().splitlines()) >= LOGGED

    wait_for(past_first_checkpoint, 480, f"{LOGGED} steps")
    killed_at = time.monotonic()
    job.signal(KILLED, signal.SIGKILL)
    results = job.wait(killed_at - job.started + 4 * TIMEOUT_S, ranks=[0])
    return root, results, results[0].exit_s - (killed_at - job.started)


def test_kill9_of_a_rank_ends_the_job_naming_it(killed_run: KilledRun) -> None:
    _, results, exit_s = killed_run
    assert results[0].rc == EXIT_HUNG == 124  # the status the README documents
    assert results[KILLED].rc == -signal.SIGKILL
    assert exit_s < TIMEOUT_S
    line = _one_line(results[0])
    assert line.startswith(f"error: rank {KILLED} (") and "sent no heartbeat" in line
    assert "Traceback" not in results[0].err


def test_after_losing_a_rank_the_replan_resumes_the_loss_curve(planned: tuple[Path, Any], killed_run: KilledRun,
                                                               tmp_path: Path) -> None:
    """Re-plan for the 3 ranks left, resume there: the losses are those the 4 ranks had before they lost one.

    (Not a 3-rank run from step 0: initial weights depend on the plan's sharding, see ``autopar.emit.init``.)
    """
    import autopar

    root = killed_run[0]
    last = latest_checkpoint(root / "ckpt")
    assert last.name == f"step_{SAVE_EVERY:08d}"
    new = autopar.replan(Plan.load(planned[0]), lost_nodes=1, cluster=CLUSTER, graph=planned[1])
    assert (new.num_gpus_available, new.layout.num_gpus, new.layout.global_batch_size) == (3, 3, GLOBAL_BATCH)
    assert new.replanned_from is not None and new.replanned_from.lost_nodes == 1
    new.save(tmp_path / "plan3.json")
    runs = run_spmd("tests.reliability.workers:train_on_survivors", 3, str(tmp_path / "plan3.json"),
                    str(root / "ckpt"), str(tmp_path / "ckpt"), STEPS, SAVE_AT)
    assert runs[0] == runs[1] == runs[2]
    after_kill, same_plan = runs[0]["after_kill"], runs[0]["same_plan"]
    assert len(after_kill) == STEPS - SAVE_EVERY
    logged = _losses(root / "loss.jsonl")  # the 4-rank run, uninterrupted until it lost a rank
    before = [logged[s] for s in range(SAVE_EVERY, min(STEPS, max(logged) + 1))]
    assert len(before) >= LOGGED - SAVE_EVERY
    # dp4 → dp3: the same samples and the same mean gradient, reduced in another order
    assert after_kill[: len(before)] == pytest.approx(before, rel=1e-5, abs=0)
    assert after_kill[0] != pytest.approx(logged[SAVE_EVERY - 1], rel=1e-3)  # the curve moves on: not a replay
    assert same_plan == after_kill[SAVE_AT - SAVE_EVERY:]  # bit for bit: same plan, data, RNG and LR


def test_the_data_is_indexed_by_sample_not_by_process_state() -> None:
    """A resumed run (any batch split, any rank) gets the very samples the uninterrupted run would have."""
    from autopar.examples.train_gpt import SyntheticCorpus

    stream = SyntheticCorpus(seed=3, seq_len=8, vocab=64)
    whole = [stream.next_batch(GLOBAL_BATCH) for _ in range(3)]
    resumed = SyntheticCorpus(seed=3, seq_len=8, vocab=64)
    resumed.samples_drawn = 2 * GLOBAL_BATCH
    assert torch.equal(resumed.next_batch(GLOBAL_BATCH)[0], whole[2][0])
    quarters = SyntheticCorpus(seed=3, seq_len=8, vocab=64)
    assert torch.equal(torch.cat([quarters.next_batch(GLOBAL_BATCH // 4)[1] for _ in range(4)]), whole[0][1])
    assert not torch.equal(SyntheticCorpus(seed=4, seq_len=8, vocab=64).next_batch(GLOBAL_BATCH)[0], whole[0][0])
    assert not torch.equal(whole[0][0], whole[1][0])


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


def test_a_flipped_byte_in_a_shard_is_reported_once(killed_run: KilledRun, tmp_path: Path) -> None:
    copy = tmp_path / "checkpoint"  # saved by 4 ranks, resumed by 2
    shutil.copytree(latest_checkpoint(killed_run[0] / "ckpt"), copy)
    shard = copy / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    results = Job([*DP2, "--steps", "4", "--resume", str(copy)], 2, timeout_s=TIMEOUT_S).wait(180)
    assert [r.rc for r in results] == [2, 2]
    assert _one_line(results[0]) == (f"error: checkpoint file {str(shard)!r} is corrupt " +
                                     _one_line(results[0]).split(" is corrupt ", 1)[1])
    assert "restore it or resume from another checkpoint" in results[0].err
    assert _reports(results[1]) == [] and "weights_only" not in results[0].err


def test_a_plan_for_another_world_size_is_reported_once(tmp_path: Path) -> None:
    from autopar.examples import train_gpt

    plan = train_gpt.hand_written_plan(train_gpt.parse_args(["--dp", "2", "--tp", "2"]), *train_gpt.build())
    plan.save(tmp_path / "plan4.json")
    results = Job(["--plan", str(tmp_path / "plan4.json")], 2, timeout_s=TIMEOUT_S).wait(180)
    assert [r.rc for r in results] == [2, 2]
    assert _one_line(results[0]) == ("error: the plan uses dp·tp·pp = 4 ranks but the job has 2; launch with "
                                     "--nproc-per-node 4 (per node) or re-plan for 2 GPUs")
    assert _reports(results[1]) == []
