"""DeepSpeed export: golden JSON, snippets for what the JSON cannot hold, refusals, DeepSpeedConfig validation."""

from __future__ import annotations

import dataclasses
import json

import pytest

from autopar.export import ExportError, export_plan
from autopar.export.deepspeed import ACTIVATION_CHECKPOINTING, PIPELINE_SNIPPET, deepspeed_config
from autopar.plan import Plan, Recompute
from tests.report.sample_plans import data_parallel_plan, gpt175b_plan, interleaved_plan, uneven_plan

GOLDEN_DP = """\
{
  "train_batch_size": 128,
  "train_micro_batch_size_per_gpu": 4,
  "gradient_accumulation_steps": 4,
  "zero_optimization": {
    "stage": 2
  },
  "bf16": {
    "enabled": true
  }
}
"""


def _with(plan: Plan, *, recompute: Recompute | None = None, **layout: object) -> Plan:
    lay = dataclasses.replace(plan.layout, **layout, **({"recompute": recompute} if recompute else {}))
    stages = tuple(dataclasses.replace(s, recompute=recompute) for s in plan.stages) if recompute else plan.stages
    return dataclasses.replace(plan, layout=lay, stages=stages)


def pipeline_plan() -> Plan:
    """uneven_plan with what DeepSpeed's pipeline engine supports: ZeRO-1, full recompute."""
    return _with(uneven_plan(), zero_stage=1, recompute=Recompute.FULL)


def test_golden_data_parallel() -> None:
    result = export_plan(data_parallel_plan(), "deepspeed")
    assert result.text == GOLDEN_DP and result.suffix == ".json" and not result.extras and not result.notes


def test_pipeline_goes_to_a_snippet_with_exact_boundaries() -> None:
    result = export_plan(pipeline_plan(), "deepspeed")
    assert json.loads(result.text)["gradient_accumulation_steps"] == 16
    snippet = result.extras[PIPELINE_SNIPPET]
    assert "STAGE_BOUNDS = [0, 6, 13, 20, 26]" in snippet
    assert "num_stages=4" in snippet and "activation_checkpoint_interval=1" in snippet
    assert "#      0: tok_emb+pos_emb" in snippet and "#     25: ln_f+lm_head" in snippet
    compile(snippet, PIPELINE_SNIPPET, "exec")  # valid Python
    assert any("PipelineModule" in note for note in result.notes)


def test_recompute_without_pipeline_is_a_snippet_and_a_config_section() -> None:
    plan = _with(data_parallel_plan(), recompute=Recompute.SELECTIVE)
    result = export_plan(plan, "deepspeed")
    assert json.loads(result.text)["activation_checkpointing"] == ACTIVATION_CHECKPOINTING
    (name, snippet), = result.extras.items()
    assert "attention core" in snippet and "selective" in snippet
    compile(snippet, name, "exec")


@pytest.mark.parametrize(("plan", "match"), [
    (gpt175b_plan(), "sequence parallelism"),
    (interleaved_plan(), "own 1F1B schedule, not 'interleaved-1f1b'"),
    (uneven_plan(), "ZeRO stage 0 or 1, not 3"),
    (_with(pipeline_plan(), tp=2, dp=2), "AutoTP does not combine"),
])
def test_refusals(plan: Plan, match: str) -> None:
    with pytest.raises(ExportError, match=match):
        deepspeed_config(plan)


# ---- validation by DeepSpeed ---------------------------------------------------------------------


class _MPU:
    """The two questions DeepSpeedConfig asks a model-parallel unit."""

    def __init__(self, dp: int) -> None:
        self.dp = dp

    def get_data_parallel_world_size(self) -> int:
        return self.dp

    def get_data_parallel_rank(self) -> int:
        return 0


@pytest.fixture
def ds_config(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    pytest.importorskip("deepspeed")
    import deepspeed.runtime.config as dsc

    monkeypatch.setattr(dsc.dist, "get_rank", lambda *a, **k: 0)  # no process group: rank 0, world from mpu
    return dsc.DeepSpeedConfig


@pytest.mark.parametrize("make", [data_parallel_plan, pipeline_plan,
                                  lambda: _with(data_parallel_plan(), tp=2, dp=4, num_micro_batches=8,
                                                recompute=Recompute.FULL)])
def test_deepspeed_accepts_the_export(ds_config, make) -> None:  # type: ignore[no-untyped-def]
    from deepspeed.runtime.activation_checkpointing.config import ACT_CHKPT_DEFAULT

    plan = make()
    config = deepspeed_config(plan)
    parsed = ds_config(config, mpu=_MPU(plan.layout.dp))
    lay = plan.layout
    assert (parsed.train_batch_size, parsed.train_micro_batch_size_per_gpu, parsed.gradient_accumulation_steps) == \
        (lay.global_batch_size, lay.micro_batch_size, lay.num_micro_batches)
    assert parsed.zero_optimization_stage == lay.zero_stage
    assert parsed.bfloat16_config.enabled
    assert parsed.tensor_parallel_config.autotp_size == (lay.tp if lay.tp > 1 else 0)
    # DeepSpeed ignores unknown activation_checkpointing keys: check the names ourselves
    assert set(config.get("activation_checkpointing", {})) <= set(ACT_CHKPT_DEFAULT)
    with pytest.raises(AssertionError, match="train_batch_size is not equal"):
        ds_config(config, mpu=_MPU(lay.dp * 2))  # the batch triple is tied to dp
