"""Launch a script on N local ranks as torchrun would (RANK, WORLD_SIZE, MASTER_ADDR/PORT), one process each.

Without torchrun's agent in between, each rank's exit status, output and time to exit
can be checked, and a single rank can be killed or stopped by its pid.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TRAIN = REPO / "examples" / "train_gpt.py"


@dataclass(frozen=True)
class RankResult:
    """How one rank ended."""

    rank: int
    rc: int
    out: str
    err: str
    exit_s: float
    """Seconds from launch to this rank's exit."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Job:
    """``world`` processes running ``python SCRIPT ARGS`` with torchrun's environment."""

    def __init__(self, args: list[str], world: int, *, timeout_s: float = 6.0, script: Path = TRAIN,
                 cwd: Path | None = None) -> None:
        port = free_port()
        self.started = time.monotonic()
        self.procs: list[subprocess.Popen[str]] = []
        self._exit_s: dict[int, float] = {}
        for rank in range(world):
            env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                   "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                   "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "AUTOPAR_COLLECTIVE_TIMEOUT_S": str(timeout_s)}
            self.procs.append(subprocess.Popen([sys.executable, str(script), *args], env=env, cwd=cwd or REPO,
                                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))

    def signal(self, rank: int, sig: signal.Signals) -> None:
        os.kill(self.procs[rank].pid, sig)

    def wait(self, timeout_s: float = 240.0, *, ranks: list[int] | None = None) -> list[RankResult]:
        """Wait for ``ranks`` (default all) to exit; kill every rank left when the time is up."""
        wanted = range(len(self.procs)) if ranks is None else ranks
        deadline = self.started + timeout_s
        while any(self.procs[r].poll() is None for r in wanted) and time.monotonic() < deadline:
            for r, p in enumerate(self.procs):
                if p.poll() is not None and r not in self._exit_s:
                    self._exit_s[r] = time.monotonic() - self.started
            time.sleep(0.05)
        for r, p in enumerate(self.procs):
            if p.poll() is not None and r not in self._exit_s:
                self._exit_s[r] = time.monotonic() - self.started
        self.kill()
        results = []
        for r, p in enumerate(self.procs):
            out, err = p.communicate()
            results.append(RankResult(r, p.returncode, out, err, self._exit_s.get(r, float("inf"))))
        return results

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.kill()


def wait_for(predicate, timeout_s: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout_s} s for {what}")
        time.sleep(0.05)
