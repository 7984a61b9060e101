"""Faults and bad input at the command line: interrupts, output paths, dtypes, edited plans, stray prints.

Each case asserts the exit status, that stderr holds one line saying what is wrong,
and that no partial output file is left.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from autopar._io import TEMP_PREFIX, write_atomic
from autopar.plan import Plan
from tests.cli.conftest import REPO, autopar, cli  # noqa: F401 (cli is a fixture)
from tests.report.sample_plans import uneven_plan

PLAN_ARGS = ["plan", "gpt:small", "--cluster", "dgx-h100", "--global-batch", "64"]
"""A planning run that takes a few seconds: long enough to interrupt."""


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


SLOW_MODEL = """
import sys, time
import torch

def build():
    print("factory running", flush=True)  # the CLI sends it to stderr
    time.sleep(120)
    return torch.nn.Linear(8, 8), (torch.zeros(2, 8),)
"""
"""A model file whose factory says it runs, then takes long enough to be interrupted for sure."""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_plan_exits_128_plus_n_and_writes_nothing(tmp_path: Path, sig: signal.Signals) -> None:
    (tmp_path / "slow.py").write_text(SLOW_MODEL)
    out = tmp_path / "out" / "p.json"
    out.parent.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "NO_COLOR": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "autopar", "plan", f"{tmp_path / 'slow.py'}:build", "--cluster",
                             "dgx-h100", "--global-batch", "8", "--out", str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    assert proc.stderr.readline() == "factory running\n"  # inside `autopar plan`, its handlers installed
    sent = time.monotonic()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err
    assert _lines(err) == [f"interrupted by {sig.name}; no output was written"]
    assert time.monotonic() - sent < 10
    assert sorted(os.listdir(out.parent)) == []  # neither the plan nor a temporary file


def test_an_interrupted_plan_search_exits_130(tmp_path: Path) -> None:
    """The same during capture or search of a real model. The run takes a few seconds, less on a fast machine:
    the signal comes 4 s after the start, or sooner until one arrives before the plan is done."""
    out = tmp_path / "p.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "NO_COLOR": "1"}
    for delay_s in (4.0, 2.0, 1.0, 0.5):
        out.unlink(missing_ok=True)
        proc = subprocess.Popen([sys.executable, "-m", "autopar", *PLAN_ARGS, "--out", str(out)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(delay_s)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        if proc.returncode != 0:  # interrupted (0: it finished first; try sooner)
            break
    assert proc.returncode in (130, -signal.SIGINT), err  # -2: still importing, before autopar's handler
    if out.exists():  # the signal came after the plan was written (atomically): whole, and nothing beside it
        from autopar.plan import Plan

        assert Plan.from_json(out.read_text()).layout.num_gpus >= 1
        assert sorted(os.listdir(tmp_path)) == ["p.json"]
    else:
        assert sorted(os.listdir(tmp_path)) == []  # neither the plan nor a temporary file


@pytest.mark.parametrize(("args", "message"), [
    (["--out", "/nonexistent-autopar-dir/p.json"], "--out '/nonexistent-autopar-dir/p.json': directory "
                                                   "'/nonexistent-autopar-dir' does not exist; create it first"),
    (["--out", "/tmp"], "--out '/tmp' is a directory; give a file name, e.g. '/tmp/plan.json'"),
    (["--dtype", "bogus"], "--dtype 'bogus' is not a training precision; use one of bfloat16, float16, float32"),
])
def test_bad_output_paths_and_dtypes_are_refused_before_planning(cli, args: list[str], message: str,  # type: ignore[no-untyped-def]
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import autopar.api

    def never(*a: object, **k: object) -> None:
        raise AssertionError("planned before checking its arguments")

    monkeypatch.setattr(autopar.api, "plan", never)
    r = cli(*PLAN_ARGS, *args)
    assert r.rc == 2 and r.err.startswith(f"error: {message}") and len(_lines(r.err)) == 1


def test_json_stdout_holds_json_alone_when_the_model_prints(tmp_path: Path) -> None:
    model = tmp_path / "noisy.py"
    model.write_text("import torch\nprint('imported')\n"
                     "def build():\n    print('building')\n"
                     "    return torch.nn.Sequential(torch.nn.Linear(8, 8)), (torch.zeros(2, 8),)\n")
    r = autopar("plan", f"{model}:build", "--cluster", "dgx-h100", "--global-batch", "8", "--top", "1", "--json")
    assert r.rc == 0, r.err
    assert len(json.loads(r.out)) == 1
    assert "imported" in r.err and "building" in r.err


def test_llama_without_transformers_names_the_extra() -> None:
    code = ("import sys; sys.modules['transformers'] = None\n"
            "from autopar.cli import run\n"
            "sys.exit(run(['plan', 'llama:tiny', '-c', 'dgx-h100', '-b', '8']))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO), "NO_COLOR": "1"}, check=False)
    assert run.returncode == 2
    assert _lines(run.stderr) == ["error: llama: models are built with Hugging Face transformers, which is not "
                                  "installed; install it with: pip install 'autopar[hf]'"]


def _edited(tmp_path: Path, edit) -> Path:  # type: ignore[no-untyped-def]
    path = tmp_path / "plan.json"
    uneven_plan().save(path)
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    return path


def test_a_hand_edited_plan_is_refused_by_show_and_export(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    def swap_dp_tp(data: dict) -> None:  # same GPU count, another global batch
        layout = data["layout"]
        layout["dp"], layout["tp"] = layout["tp"], layout["dp"]

    path = _edited(tmp_path, swap_dp_tp)
    for command in (["show", str(path)], ["export", str(path), "--to", "megatron"]):
        r = cli(*command)
        assert r.rc == 2 and "does not match its digest" in r.err and "--pin" in r.err and r.out == ""


def test_an_inconsistent_plan_is_refused_even_with_a_matching_digest(tmp_path: Path) -> None:
    from autopar.errors import PlanValidationError
    from autopar.plan import content_digest

    def halve_dp(data: dict) -> None:
        data["layout"]["dp"] //= 2
        data["digest"] = content_digest(data)

    path = _edited(tmp_path, halve_dp)
    with pytest.raises(PlanValidationError, match=r"global batch \d+ but dp \d+ × micro-batch"):
        Plan.load(path)


def test_stages_must_cover_every_layer_exactly_once(tmp_path: Path) -> None:
    from autopar.errors import PlanValidationError
    from autopar.plan import content_digest

    def overlap(data: dict) -> None:
        data["stages"][1]["layer_start"] -= 1
        data["stages"][1]["module_paths"].insert(0, data["stages"][0]["module_paths"][-1])
        data["digest"] = content_digest(data)

    with pytest.raises(PlanValidationError, match="should start at"):
        Plan.load(_edited(tmp_path, overlap))


def test_an_interrupted_write_leaves_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "plan.json"
    path.write_text("old")

    def interrupted(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_atomic(path, "new content")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]
    assert not any(p.name.startswith(TEMP_PREFIX) for p in tmp_path.iterdir())
