"""``--runtime``: the program a plan is priced for, from the command line through the plan file and back."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

import autopar
from autopar.errors import PlanValidationError, UserInputError
from autopar.layout import Runtime, Schedule
from autopar.plan import Plan
from tests.report.sample_plans import interleaved_plan

REPO = Path(__file__).resolve().parents[2]


def _megatron_plan() -> Plan:
    plan = interleaved_plan()
    sources = {**plan.predicted.sources, "runtime": "megatron-lm (...)"}
    return dataclasses.replace(plan, runtime=Runtime.MEGATRON,
                               predicted=dataclasses.replace(plan.predicted, sources=sources))


def test_cli_passes_the_runtime_and_refuses_unknown_ones(cli, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    import autopar.api

    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(autopar.api, "plan_ranked", lambda *a, **k: (calls.append(k), (_megatron_plan(),))[1])
    r = cli("plan", "gpt:tiny", "-c", "dgx-h100", "-b", "64", "--runtime", "megatron", "--top", "1")
    assert r.rc == 0, r.err
    assert calls[0]["runtime"] is Runtime.MEGATRON
    assert "priced for: megatron-lm" in r.out
    r = cli("plan", "gpt:tiny", "-c", "dgx-h100", "-b", "64")
    assert r.rc == 0 and calls[1]["runtime"] is Runtime.AUTOPAR
    r = cli("plan", "gpt:tiny", "-c", "dgx-h100", "-b", "64", "--runtime", "deepspeedx")
    assert r.rc == 2 and len(calls) == 2


def test_plan_json_round_trips_the_runtime_and_export_warns_on_a_mismatch(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "meg.json"
    _megatron_plan().save(path)
    data = json.loads(path.read_text())
    assert data["runtime"] == "megatron"
    assert Plan.load(path) == _megatron_plan()
    r = cli("export", str(path), "--to", "megatron")
    assert r.rc == 0 and "priced for runtime" not in r.err
    own = tmp_path / "own.json"
    interleaved_plan().save(own)
    assert json.loads(own.read_text())["runtime"] == "autopar"
    r = cli("export", str(own), "--to", "megatron")
    assert r.rc == 0 and "--runtime megatron" in r.err
    old = {k: v for k, v in interleaved_plan().to_dict().items() if k not in ("runtime", "digest")}
    assert Plan.from_dict(old).runtime is Runtime.AUTOPAR  # files written before the field: autopar's


def test_megatron_pins_outside_its_program_are_refused() -> None:
    for pins, said in ((dict(zero_stage=3), "pin zero_stage=1"), (dict(schedule="gpipe"), "1f1b")):
        with pytest.raises(PlanValidationError, match=said):
            autopar.PlanOptions.from_args(global_batch_size=8, constraints=pins, runtime="megatron")
    autopar.PlanOptions.from_args(global_batch_size=8, constraints=dict(zero_stage=3))  # autopar runs it
    with pytest.raises(UserInputError, match="autopar, megatron"):
        autopar.PlanOptions.from_args(global_batch_size=8, runtime="nemo")


def test_megatron_plans_record_their_program_and_hold_less() -> None:
    """A tiny GPT on 8 GPUs priced both ways: the search offers Megatron only ZeRO 0/1 and 1F1B schedules, the
    plan says what it was priced for, and parallelize refuses to run it."""
    from autopar.api import plan_graph_ranked
    from autopar.examples.gpt import GPT, GPTConfig

    with torch.device("meta"):
        model = GPT(GPTConfig(n_layer=4, n_embd=256, n_head=4, vocab_size=4096, block_size=128))
    graph = autopar.capture(model, (torch.zeros(1, 128, dtype=torch.long, device="meta"),))
    pins = dict(pp=2, tp=1, dp=4, micro_batch_size=1, recompute="none", sequence_parallel=False)
    meg = plan_graph_ranked(graph, cluster="dgx-h100", global_batch_size=32, constraints=pins, top_k=8,
                            runtime="megatron")
    own = plan_graph_ranked(graph, cluster="dgx-h100", global_batch_size=32, constraints={**pins, "zero_stage": 1,
                            "schedule": "1f1b"}, runtime="autopar")
    assert {p.layout.zero_stage for p in meg} <= {0, 1}
    assert all(p.layout.schedule is not Schedule.GPIPE for p in meg)
    assert all(p.runtime is Runtime.MEGATRON and p.predicted.sources["runtime"].startswith("megatron-lm")
               for p in meg)
    assert own[0].runtime is Runtime.AUTOPAR
    same = next(p for p in meg if p.layout == own[0].layout)
    # 8 micro-batches through pp 2: torch pipelining's receive buffers and FSDP2's buffers are not Megatron's
    assert same.predicted.peak_memory_bytes < own[0].predicted.peak_memory_bytes
    with pytest.raises(UserInputError, match="priced for runtime megatron"):
        autopar.parallelize(model, (torch.zeros(1, 128, dtype=torch.long),), plan=same)


@pytest.mark.slow
def test_autopar_default_plans_are_unchanged_readme_command_1(cli) -> None:  # type: ignore[no-untyped-def]
    """README command 1 prints exactly the README's block (the default runtime is autopar's program)."""
    readme = (REPO / "README.md").read_text()
    command = re.search(r"pip install -e \. && autopar (plan [^\n]+)", readme)
    block = readme.split("It prints (a few seconds on a 2-core laptop):\n\n```\n", 1)[1].split("```", 1)[0]
    assert command is not None
    r = cli(*command.group(1).split())
    assert r.rc == 0, r.err
    assert r.out.strip() == block.strip()
