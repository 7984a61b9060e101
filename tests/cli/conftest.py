"""Helpers for CLI tests: run the command in-process, or as a real subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from autopar.cli import run

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Result:
    """Exit status and output of one command."""

    rc: int
    out: str
    err: str


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]):  # type: ignore[no-untyped-def]
    """``cli("show", "p.json")`` runs ``autopar`` in this process and returns its Result."""

    def call(*args: str) -> Result:
        rc = run(list(args))
        captured = capsys.readouterr()
        return Result(rc, captured.out, captured.err)

    return call


def autopar(*args: str, cwd: Path | None = None, timeout: float = 300) -> Result:
    """Run ``python -m autopar ARGS`` as a subprocess (no terminal: plain output)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "NO_COLOR": "1", "COLUMNS": "200"}
    proc = subprocess.run([sys.executable, "-m", "autopar", *args], capture_output=True, text=True, env=env,
                          cwd=cwd or REPO, timeout=timeout, check=False)
    return Result(proc.returncode, proc.stdout, proc.stderr)
