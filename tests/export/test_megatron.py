"""Megatron-LM export: golden arguments, refusals, and validation by megatron-core itself."""

from __future__ import annotations

import dataclasses

import pytest

from autopar.export import ExportError, export_plan
from autopar.export.megatron import megatron_args
from autopar.plan import Recompute, Schedule
from tests.report.sample_plans import data_parallel_plan, gpt175b_plan, interleaved_plan, uneven_plan

GOLDEN_175B = """\
# Megatron-LM settings for gpt:175b (autopar plan 0123456789abcdef, schema 2)
# layout: dp1 tp8 pp8 mb1x64 zero1 rc=selective sp 1f1b; run on dp*tp*pp = 1*8*8 = 64 GPUs
# predicted step 13.100 s, MFU 51.4%
# launch on 64 GPUs; Megatron derives dp = world size / (tp*pp)
--num-layers 96 \\
--seq-length 2048 \\
--tensor-model-parallel-size 8 \\
--pipeline-model-parallel-size 8 \\
--micro-batch-size 1 \\
--global-batch-size 64 \\
--sequence-parallel \\
--recompute-granularity selective \\
--use-distributed-optimizer \\
--bf16
"""

# Megatron-LM's documented flag names (export-targets.md; megatron/training/arguments.py)
DOCUMENTED_FLAGS = {
    "--num-layers", "--seq-length", "--tensor-model-parallel-size", "--pipeline-model-parallel-size",
    "--num-layers-per-virtual-pipeline-stage", "--pipeline-model-parallel-layout", "--micro-batch-size",
    "--global-batch-size", "--sequence-parallel", "--recompute-granularity", "--recompute-method",
    "--recompute-num-layers", "--use-distributed-optimizer", "--use-megatron-fsdp",
    "--data-parallel-sharding-strategy", "--ckpt-format", "--bf16", "--fp16",
}
ALL_PLANS = (gpt175b_plan, interleaved_plan, uneven_plan, data_parallel_plan)


def parse(args: list[str]) -> dict[str, str | bool]:
    """argv → {flag: value, or True for a switch}."""
    out: dict[str, str | bool] = {}
    for i, arg in enumerate(args):
        if arg.startswith("--"):
            nxt = args[i + 1] if i + 1 < len(args) else "--"
            out[arg] = True if nxt.startswith("--") else nxt
    return out


def test_golden_175b() -> None:
    assert export_plan(gpt175b_plan(), "megatron").text == GOLDEN_175B


def test_interleaved_and_uneven_stages() -> None:
    flags = parse(megatron_args(interleaved_plan()))
    assert flags["--num-layers-per-virtual-pipeline-stage"] == "3"  # 24 blocks / (4 ranks × 2 chunks)
    assert (flags["--recompute-granularity"], flags["--recompute-method"], flags["--recompute-num-layers"]) == \
        ("full", "uniform", "1")
    flags = parse(megatron_args(uneven_plan()))
    assert flags["--pipeline-model-parallel-layout"] == "Et*5|t*7|t*7|t*5L"
    assert "--num-layers-per-virtual-pipeline-stage" not in flags
    assert flags["--data-parallel-sharding-strategy"] == "optim_grads_params"
    assert "--pipeline-model-parallel-layout 'Et*5|t*7|t*7|t*5L' \\" in export_plan(uneven_plan(), "megatron").text


def test_only_documented_flags() -> None:
    for make in ALL_PLANS:
        assert set(parse(megatron_args(make()))) <= DOCUMENTED_FLAGS


def test_refusals() -> None:
    plan = data_parallel_plan()
    gpipe = dataclasses.replace(uneven_plan(), layout=dataclasses.replace(uneven_plan().layout,
                                                                          schedule=Schedule.GPIPE))
    with pytest.raises(ExportError, match="not GPipe"):
        megatron_args(gpipe)
    odd = dataclasses.replace(interleaved_plan(), layout=dataclasses.replace(interleaved_plan().layout,
                                                                             num_micro_batches=6))
    with pytest.raises(ExportError, match=r"micro-batches \(6\) to be a multiple of pp=4"):
        megatron_args(odd)
    mixed = dataclasses.replace(gpt175b_plan(), stages=tuple(
        dataclasses.replace(s, recompute=Recompute.FULL if s.index == 0 else s.recompute)
        for s in gpt175b_plan().stages))
    with pytest.raises(ExportError, match="mixes them .*0:full, 1:selective"):
        megatron_args(mixed)
    mlp = dataclasses.replace(plan, stages=(dataclasses.replace(
        plan.stages[0], module_paths=tuple(str(i) for i in range(14))),))
    with pytest.raises(ExportError, match="embedding, contiguous blocks"):
        megatron_args(mlp)


# ---- validation by megatron-core ----------------------------------------------------------------


def _configs(plan, flags):  # type: ignore[no-untyped-def]
    torch = pytest.importorskip("torch")
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.transformer import TransformerConfig

    lay = plan.layout
    num_layers = int(flags["--num-layers"])
    per_virtual = flags.get("--num-layers-per-virtual-pipeline-stage")
    vpp = num_layers // lay.pp // int(per_virtual) if per_virtual else None  # as arguments.py derives it
    config = TransformerConfig(
        num_layers=num_layers, hidden_size=1024, num_attention_heads=16,
        tensor_model_parallel_size=int(flags["--tensor-model-parallel-size"]),
        pipeline_model_parallel_size=int(flags["--pipeline-model-parallel-size"]),
        virtual_pipeline_model_parallel_size=vpp,
        pipeline_model_parallel_layout=flags.get("--pipeline-model-parallel-layout"),
        sequence_parallel=bool(flags.get("--sequence-parallel", False)),
        recompute_granularity=flags.get("--recompute-granularity"),
        recompute_method=flags.get("--recompute-method"),
        recompute_num_layers=int(flags["--recompute-num-layers"]) if "--recompute-num-layers" in flags else None,
        bf16=bool(flags.get("--bf16", False)),
        pipeline_dtype=torch.bfloat16 if lay.pp > 1 else None,
    )
    ddp = DistributedDataParallelConfig(
        use_distributed_optimizer=bool(flags.get("--use-distributed-optimizer", False)),
        use_megatron_fsdp=bool(flags.get("--use-megatron-fsdp", False)),
        data_parallel_sharding_strategy=str(flags.get("--data-parallel-sharding-strategy", "no_shard")),
    )
    return config, ddp


@pytest.mark.parametrize("make", ALL_PLANS)
def test_megatron_core_accepts_the_export(make) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("megatron.core")
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.num_microbatches_calculator import ConstantNumMicroBatchesCalculator
    from megatron.core.transformer import TransformerConfig

    plan = make()
    flags = parse(megatron_args(plan))
    config, ddp = _configs(plan, flags)
    lay = plan.layout
    assert config.tensor_model_parallel_size == lay.tp and config.pipeline_model_parallel_size == lay.pp
    assert (config.virtual_pipeline_model_parallel_size or 1) == lay.virtual_stages
    assert config.sequence_parallel == lay.sequence_parallel
    assert ddp.use_distributed_optimizer == (lay.zero_stage >= 1)
    calc = ConstantNumMicroBatchesCalculator(int(flags["--global-batch-size"]), int(flags["--micro-batch-size"]),
                                             lay.dp, decrease_batch_size_if_needed=False, rank=0)
    assert calc.get() == lay.num_micro_batches
    # every flag named after a megatron-core field is a real field there
    fields = {f.name for f in dataclasses.fields(TransformerConfig)} | {
        f.name for f in dataclasses.fields(DistributedDataParallelConfig)}
    script_only = {"num_layers_per_virtual_pipeline_stage", "micro_batch_size", "global_batch_size", "seq_length",
                   "ckpt_format", "use_distributed_optimizer"}
    for flag in flags:
        name = flag.lstrip("-").replace("-", "_")
        assert name in fields or name in script_only, flag


def test_megatron_core_rejects_a_wrong_layout() -> None:
    pytest.importorskip("megatron.core")
    plan = uneven_plan()
    flags = parse(megatron_args(plan))
    flags["--num-layers"] = "25"  # the layout places 24 blocks
    with pytest.raises((AssertionError, ValueError)):
        _configs(plan, flags)
