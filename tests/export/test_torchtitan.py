"""torchtitan export: golden overrides, the 0.2.x TOML, and validation by torchtitan's own parser."""

from __future__ import annotations

import dataclasses
import tomllib

import pytest

from autopar.export import ExportError, export_plan
from autopar.export.torchtitan import TOML_FILE, torchtitan_overrides, torchtitan_toml
from autopar.plan import Plan, Recompute
from tests.report.sample_plans import data_parallel_plan, gpt175b_plan, interleaved_plan, uneven_plan

GOLDEN_DP = """\
# torchtitan 0.3 settings for gpt:small (autopar plan 00000000deadbeef, schema 2)
# layout: dp8 tp1 pp1 mb4x4 zero2 rc=none; run on dp*tp*pp = 8*1*1 = 8 GPUs
# predicted step 0.420 s, MFU 67.3%
# append to: torchrun ... -m torchtitan.train --module <model> --config <config>
--parallelism.data_parallel_replicate_degree 1 \\
--parallelism.data_parallel_shard_degree 8 \\
--parallelism.tensor_parallel_degree 1 \\
--parallelism.pipeline_parallel_degree 1 \\
--parallelism.fsdp_reshard_after_forward never \\
--training.local_batch_size 4 \\
--training.global_batch_size 128 \\
--training.seq_len 1024 \\
--training.mixed_precision_param bfloat16 \\
--parallelism.no_enable_sequence_parallel \\
activation-checkpoint:none
"""

GOLDEN_TOML_UNEVEN = """\
# torchtitan 0.2.x settings for gpt:1.3b (autopar plan 1111222233334444, schema 2)
# layout: dp4 tp1 pp4 mb1x16 zero3 rc=none 1f1b; run on dp*tp*pp = 4*1*4 = 16 GPUs
# predicted step 2.000 s, MFU 32.0%

[parallelism]
data_parallel_replicate_degree = 1
data_parallel_shard_degree = 4
tensor_parallel_degree = 1
pipeline_parallel_degree = 4
pipeline_parallel_schedule = "1F1B"
pipeline_parallel_microbatch_size = 1
module_fqns_per_model_part = [["tok_embeddings", "layers.0", "layers.1", "layers.2", "layers.3", "layers.4"], \
["layers.5", "layers.6", "layers.7", "layers.8", "layers.9", "layers.10", "layers.11"], \
["layers.12", "layers.13", "layers.14", "layers.15", "layers.16", "layers.17", "layers.18"], \
["layers.19", "layers.20", "layers.21", "layers.22", "layers.23", "norm", "output"]]

[training]
local_batch_size = 16
global_batch_size = 64
seq_len = 1024
mixed_precision_param = "bfloat16"

[activation_checkpoint]
mode = "none"
"""

# torchtitan v0.2.2 torchtitan/config/job_config.py: the keys of the sections we write
TOML_022_KEYS = {
    "parallelism": {"data_parallel_replicate_degree", "data_parallel_shard_degree", "fsdp_reshard_after_forward",
                    "tensor_parallel_degree", "pipeline_parallel_degree", "module_fqns_per_model_part",
                    "pipeline_parallel_schedule", "pipeline_parallel_microbatch_size",
                    "pipeline_parallel_layers_per_stage"},
    "training": {"local_batch_size", "global_batch_size", "seq_len", "mixed_precision_param"},
    "activation_checkpoint": {"mode", "selective_ac_option"},
}

EXPORTABLE = (data_parallel_plan, gpt175b_plan, interleaved_plan, uneven_plan)


def test_golden_overrides() -> None:
    result = export_plan(data_parallel_plan(), "torchtitan")
    assert result.text == GOLDEN_DP
    assert set(result.extras) == {TOML_FILE}


def test_golden_toml() -> None:
    assert torchtitan_toml(uneven_plan()) == GOLDEN_TOML_UNEVEN


@pytest.mark.parametrize("make", EXPORTABLE)
def test_toml_uses_022_names(make) -> None:  # type: ignore[no-untyped-def]
    plan = make()
    if plan.layout.tp > 1 and not plan.layout.sequence_parallel:
        with pytest.raises(ExportError, match="0.2.x always uses sequence parallelism"):
            torchtitan_toml(plan)
        assert any(TOML_FILE in n for n in export_plan(plan, "torchtitan").notes)
        return
    doc = tomllib.loads(torchtitan_toml(plan))
    for section, keys in doc.items():
        assert set(keys) <= TOML_022_KEYS[section], section


def test_zero1_is_written_as_zero2_with_a_note() -> None:
    result = export_plan(interleaved_plan(), "torchtitan")
    assert "--parallelism.fsdp_reshard_after_forward never \\" in result.text
    assert any(note.startswith("ZeRO-1 has no torchtitan form") for note in result.notes)


def test_mixed_recompute_is_refused() -> None:
    plan = gpt175b_plan()
    mixed = dataclasses.replace(plan, stages=tuple(
        dataclasses.replace(s, recompute=Recompute.NONE if s.index else s.recompute) for s in plan.stages))
    with pytest.raises(ExportError, match="one recompute policy"):
        torchtitan_overrides(mixed)


# ---- validation by torchtitan's parser --------------------------------------------------------------


def _parse(plan: Plan):  # type: ignore[no-untyped-def]
    pytest.importorskip("torchtitan.config")
    pytest.importorskip("torchtitan.distributed.activation_checkpoint")
    from torchtitan.config import ConfigManager

    return ConfigManager().parse_args(["--module", "tests.export.titan_registry", "--config", "autopar_check",
                                       *torchtitan_overrides(plan)])


@pytest.mark.parametrize("make", EXPORTABLE)
def test_torchtitan_parses_the_overrides(make) -> None:  # type: ignore[no-untyped-def]
    plan = make()
    config = _parse(plan)
    from torch.distributed.pipelining.schedules import get_schedule_class
    from torchtitan.distributed.parallel_dims import ParallelDims

    lay, par, train = plan.layout, config.parallelism, config.training
    dims = ParallelDims.from_config(par, world_size=lay.num_gpus)  # asserts the degrees multiply to the world
    assert (dims.dp_replicate * dims.dp_shard, dims.tp, dims.pp) == (lay.dp, lay.tp, lay.pp)
    assert par.enable_sequence_parallel == lay.sequence_parallel
    assert train.global_batch_size == lay.global_batch_size and train.seq_len == plan.seq_len
    ac = type(config.activation_checkpoint).__qualname__ if config.activation_checkpoint else "None"
    assert ac == {Recompute.NONE: "None", Recompute.SELECTIVE: "SelectiveAC.Config",
                  Recompute.FULL: "FullAC.Config"}[lay.recompute]
    if lay.pp > 1:
        get_schedule_class(par.pipeline_parallel_schedule)
        parts = par.module_fqns_per_model_part
        assert len(parts) == lay.pp * lay.virtual_stages
        assert [len(p) for p in parts] == [s.num_layers + (1 if s.index == len(parts) - 1 else 0)
                                           for s in plan.stages]  # the head is norm + lm_head
        assert train.local_batch_size % par.pipeline_parallel_microbatch_size == 0
        assert train.local_batch_size // par.pipeline_parallel_microbatch_size == lay.num_micro_batches
    else:
        # grad accumulation steps = global / (local × dp)
        assert train.global_batch_size // (train.local_batch_size * lay.dp) == lay.num_micro_batches


def test_torchtitan_rejects_a_misspelt_override() -> None:
    pytest.importorskip("torchtitan.config")
    from torchtitan.config import ConfigManager

    with pytest.raises(SystemExit):
        ConfigManager().parse_args(["--module", "tests.export.titan_registry", "--config", "autopar_check",
                                    "--parallelism.tensor_parallel_degre", "2"])
