"""Rank functions for the reliability tests (run through ``tests.emit.harness.run_spmd``)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.distributed as dist

MANIFEST = "autopar_manifest.json"


def _flip(path: Path, count: int = 1) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    for i in range(middle, middle + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _zero_fill(path: Path) -> None:
    path.write_bytes(bytes(path.stat().st_size))


def _flip_exp_avg_sq(path: Path) -> None:
    """Flip 64 bytes inside the first Adam ``exp_avg_sq`` tensor stored in ``path`` (located through DCP's metadata)."""
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(path.parent)).read_metadata()
    offset = min(info.offset for index, info in metadata.storage_data.items()
                 if index.fqn.endswith(".exp_avg_sq") and info.relative_path == path.name)
    data = bytearray(path.read_bytes())
    for i in range(offset + 16, offset + 80):  # past the record's start, inside the tensor's bytes
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


CORRUPTIONS: dict[str, tuple[str, Callable[[Path], None]]] = {
    "64 flipped bytes in an exp_avg_sq": ("__0_0.distcp", _flip_exp_avg_sq),
    "flipped byte in rank 1's shard": ("__1_0.distcp", _flip),
    "64 flipped bytes in rank 0's shard": ("__0_0.distcp", lambda p: _flip(p, 64)),
    "truncated shard": ("__0_0.distcp", _truncate),
    "zero-filled shard": ("__1_0.distcp", _zero_fill),
    "truncated .metadata": (".metadata", _truncate),
    "missing shard": ("__1_0.distcp", Path.unlink),
    "flipped byte in the run state": ("autopar_run_state.pt", _flip),
    "missing manifest": (MANIFEST, Path.unlink),
    "garbled manifest": (MANIFEST, lambda p: p.write_text("{\"format\": ")),
}
"""Fault name → (file of the checkpoint it damages, how)."""


def check_corrupt_checkpoints(root: str) -> dict[str, str]:
    """Save one train_gpt checkpoint on 2 ranks, then resume from damaged copies; the error of each."""
    from autopar.errors import CheckpointError
    from autopar.examples import train_gpt

    base = ["--dp", "2", "--hand-written", "--steps", "2"]
    train_gpt.main([*base, "--save", f"{root}/good"])
    good = Path(root, "good", "step_00000002")
    messages: dict[str, str] = {}
    for i, (name, (file, damage)) in enumerate(CORRUPTIONS.items()):
        copy = Path(root, f"bad{i}", "step_00000002")
        if dist.get_rank() == 0:
            shutil.copytree(good, copy)
            damage(copy / file)
        dist.barrier()
        try:
            train_gpt.main([*base, "--steps", "3", "--resume", str(copy)])
            messages[name] = "accepted"
        except CheckpointError as e:
            messages[name] = str(e)
    return messages


def train_on_survivors(plan: str, killed: str, root: str, steps: int, save_at: int) -> dict[str, list[float]]:
    """Two ``train_gpt.py`` runs under the re-planned ``plan``, in one process group (the survivors).

    ``after_kill``: resumed from ``killed`` (the killed run's checkpoints: the newest is used), saving
    at step ``save_at``; ``same_plan``: resumed from that checkpoint, under the same plan.
    """
    from autopar.examples import train_gpt

    base = ["--plan", plan, "--steps", str(steps)]
    after_kill = train_gpt.main([*base, "--resume", killed, "--save", root, "--save-every", str(save_at)])
    same_plan = train_gpt.main([*base, "--resume", f"{root}/step_{save_at:08d}"])
    return {"after_kill": after_kill, "same_plan": same_plan}


__all__ = ["CORRUPTIONS", "check_corrupt_checkpoints", "train_on_survivors"]
