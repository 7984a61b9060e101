"""The README's training commands, run as written (``autopar`` and ``torchrun`` as modules), on 4 gloo ranks."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from autopar.plan import Plan

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
LAUNCHERS = {"autopar": [sys.executable, "-m", "autopar"], "torchrun": [sys.executable, "-m", "torch.distributed.run"]}
"""How each README program is started here (the same code as the console scripts, from this checkout)."""


def readme_training_commands() -> list[list[str]]:
    """The commands of the README's "Training the example" code block."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Training the example", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.DOTALL)
    assert block is not None
    return [shlex.split(line) for line in block.group(1).splitlines() if line.strip()]


def test_readme_training_commands_work_as_written(tmp_path: Path) -> None:
    commands = readme_training_commands()
    assert [c[0] for c in commands] == ["autopar", "torchrun"] and "--nproc-per-node" in commands[1]
    (tmp_path / "examples").symlink_to(REPO / "examples")  # the commands' relative paths, from a clean directory
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), NO_COLOR="1")
    outputs = []
    for program, *args in commands:
        run = subprocess.run([*LAUNCHERS[program], *args], capture_output=True, text=True, env=env, cwd=tmp_path,
                             timeout=400, check=False)
        assert run.returncode == 0, run.stderr[-3000:]
        outputs.append(run.stdout)
    plan = Plan.load(tmp_path / "plan.json")
    assert plan.layout.num_gpus == int(commands[1][commands[1].index("--nproc-per-node") + 1]) == 4
    losses = [float(m) for m in re.findall(r"^step \d+ loss ([0-9.]+)$", outputs[1], re.MULTILINE)]
    assert len(losses) == 5 and losses[-1] < losses[0] - 0.1  # it trains, and the loss falls


def test_no_plan_file_at_the_repository_root() -> None:
    """A committed plan.json would be picked up by the README's torchrun command instead of the one just made."""
    tracked = subprocess.run(["git", "ls-files", "plan.json"], capture_output=True, text=True, cwd=REPO, check=False)
    assert tracked.stdout.strip() == ""
