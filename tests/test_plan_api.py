"""``autopar.plan`` end to end on captured models: known answers, pins, errors, round trips."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import autopar
from autopar.api import PlanOptions, plan_graph, plan_graph_ranked
from autopar.examples.gpt import GPT, GPTConfig
from autopar.plan import Plan, Recompute, Schedule, TPStyle


def _graph(size: str, seq: int = 1024):
    with torch.device("meta"):
        model = GPT(GPTConfig.from_name(size, block_size=seq))
    return autopar.capture(model, (torch.zeros(1, seq, dtype=torch.long, device="meta"),))


@pytest.fixture(scope="module")
def small():
    return _graph("125m")


@pytest.fixture(scope="module")
def big():
    return _graph("13b", seq=2048)


def test_small_model_on_eight_gpus_is_pure_data_parallel(small):
    plan = plan_graph(small, cluster="dgx-a100-80gb", global_batch_size=256)
    assert (plan.layout.dp, plan.layout.tp, plan.layout.pp) == (8, 1, 1)
    assert plan.predicted.peak_memory_bytes <= plan.predicted.memory[0].capacity
    assert "runner-up" in plan.explain()


def test_model_too_big_for_one_gpu_is_split(big):
    # 13B × 16 bytes of model state = 210 GB: no single 40 GB GPU holds it
    plan = plan_graph(big, cluster="dgx-a100-40gb", global_batch_size=64)
    lay = plan.layout
    assert lay.tp * lay.pp > 1 or (lay.zero_stage == 3 and lay.dp > 1)
    assert all(m.fits for m in plan.predicted.memory)


def test_faster_fabric_is_never_slower(big):
    base = autopar.Cluster.preset("dgx-a100-80gb", nodes=4)
    times = []
    for factor in (0.25, 1.0, 4.0):
        fabric = dataclasses.replace(base.inter_node, bytes_per_s=base.inter_node.bytes_per_s * factor)
        cluster = dataclasses.replace(base, inter_node=fabric)
        times.append(plan_graph(big, cluster=cluster, global_batch_size=128).predicted.step_time_s)
    assert times[0] >= times[1] >= times[2]


def test_megatron_layout_rediscovered_at_tp8(big):
    plan = plan_graph(big, cluster="dgx-a100-80gb", global_batch_size=8,
                      constraints=dict(dp=1, tp=8, pp=1, sequence_parallel=False))
    (block,) = [s for s in plan.stages[0].sharding if "attn.q_proj" in s.modules]
    assert {k: v for k, v in block.modules.items()} == {
        "attn.q_proj": TPStyle.COLWISE, "attn.k_proj": TPStyle.COLWISE, "attn.v_proj": TPStyle.COLWISE,
        "attn.c_proj": TPStyle.ROWWISE, "mlp.c_fc": TPStyle.COLWISE, "mlp.c_proj": TPStyle.ROWWISE}
    assert [kind for kind, _ in block.forward_collectives] == ["all_reduce", "all_reduce"]


def test_pinned_layout_is_priced_as_given(big):
    pins = dict(dp=2, tp=4, pp=2, micro_batch_size=1, zero_stage=1, recompute="full",
                sequence_parallel=True, schedule="interleaved-1f1b", virtual_stages=2)
    plan = plan_graph(big, cluster=autopar.Cluster.preset("dgx-h100", nodes=2), global_batch_size=32,
                      constraints=pins)
    lay = plan.layout
    assert (lay.dp, lay.tp, lay.pp, lay.micro_batch_size, lay.num_micro_batches) == (2, 4, 2, 1, 16)
    assert lay.recompute is Recompute.FULL and lay.schedule is Schedule.INTERLEAVED_1F1B
    assert len(plan.stages) == 4 and [s.pp_rank for s in plan.stages] == [0, 1, 0, 1]
    p = plan.predicted
    assert p.hardware_tflops_per_gpu > p.model_tflops_per_gpu  # full recompute counts a 4th pass
    assert p.hardware_tflops_per_gpu / p.model_tflops_per_gpu == pytest.approx(4 / 3, rel=0.05)
    assert Plan.from_json(plan.to_json()) == plan


def test_top_k_ranked(small):
    plans = plan_graph_ranked(small, cluster="dgx-h100", global_batch_size=64, top_k=3)
    times = [p.predicted.step_time_s for p in plans]
    assert isinstance(plans, tuple) and len(plans) == 3 and times == sorted(times)
    best = plan_graph(small, cluster="dgx-h100", global_batch_size=64)  # one return type each: a Plan
    assert isinstance(best, Plan) and best.predicted.step_time_s == pytest.approx(times[0])


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(top_k=0), r"top_k must be a positive integer, got 0"),
    (dict(global_batch_size="64"), r"global_batch_size must be a positive integer, got '64' \(str\)"),
    (dict(global_batch_size=8.5), r"global_batch_size must be a positive integer, got 8.5 \(float\)"),
    (dict(global_batch_size=True), r"global_batch_size must be a positive integer"),
    (dict(dtype="bogus"), r"dtype 'bogus' is not a training precision"),
    (dict(calibration="calib.json"), r"calibration must be a CalibrationTable"),
    (dict(constraints="tp=2"), r"constraints must be a mapping"),
    (dict(overlap_grad_reduce="yes"), r"overlap_grad_reduce must be True or False"),
])
def test_bad_arguments_raise_user_input_error(kwargs, match):
    args = {"global_batch_size": 64, **kwargs}
    with pytest.raises(autopar.UserInputError, match=match):
        PlanOptions.from_args(**args)
    ranked = "top_k" in kwargs
    call = autopar.api.plan_ranked if ranked else autopar.plan
    with pytest.raises(autopar.UserInputError, match=match):  # checked before capture: no model needed
        call(None, (), cluster="dgx-h100", **args)


def test_pins_are_parsed_once_into_a_value():
    options = PlanOptions.from_args(global_batch_size=64, constraints={"tp": 2, "recompute": "full"})
    assert options.pins == autopar.Pins(tp=2, recompute=Recompute.FULL)
    with pytest.raises(autopar.PlanValidationError, match="sequence_parallel=true needs tp > 1"):
        PlanOptions.from_args(global_batch_size=64, constraints={"tp": 1, "sequence_parallel": True})
    assert PlanOptions.from_args(global_batch_size=64, dtype="bf16").dtype == "bfloat16"


def test_default_dtype_is_the_gpus_best_16_bit_type(small):
    v100 = plan_graph(small, cluster="v100-p3", global_batch_size=64)  # no bf16 units: fp16, not an error
    assert v100.dtype == "float16"
    assert plan_graph(small, cluster="dgx-h100", global_batch_size=64).dtype == "bfloat16"


def test_infeasible_names_what_would_fit(big):
    v100 = autopar.Cluster.preset("v100-p3")
    with pytest.raises(autopar.InfeasiblePlanError, match=r"dominated by optimizer.*would fit on \d+ node"):
        plan_graph(big, cluster=v100, global_batch_size=64, dtype="float16", constraints=dict(tp=1, pp=1))
    # a global batch of 8 caps dp at 8: ZeRO-3 over 8 GPUs never fits, however many nodes
    with pytest.raises(autopar.InfeasiblePlanError, match="no cluster of up to 64× as many nodes fits"):
        plan_graph(big, cluster=v100, global_batch_size=8, dtype="float16", constraints=dict(tp=1, pp=1))


def test_plan_for_another_model_is_refused(small, big):
    plan = plan_graph(small, cluster="dgx-h100", global_batch_size=64)
    with pytest.raises(autopar.PlanValidationError, match="re-plan for this model"):
        plan.validate_for(big.fingerprint())


def test_public_entry_point_captures_then_plans():
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))
    plan = autopar.plan(model, (torch.randn(4, 64),), cluster="l40s-pcie", global_batch_size=64)
    assert isinstance(plan, Plan) and plan.layout.num_gpus >= 1


def test_plan_json_carries_memory_totals_and_checks_them(small):
    import json

    plan = plan_graph(small, cluster="dgx-h100", global_batch_size=64)
    data = json.loads(plan.to_json())
    mem = data["predicted"]["memory"][0]
    assert mem["total"] == sum(mem[k] for k in ("params", "grads", "optimizer", "activations", "buffers"))
    mem["total"] += 1
    with pytest.raises(autopar.PlanValidationError, match="does not match its digest"):
        Plan.from_json(json.dumps(data))
    with pytest.raises(autopar.PlanValidationError, match="not the sum of its terms"):
        Plan.from_dict(data)
