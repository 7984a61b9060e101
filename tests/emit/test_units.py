"""Single-process tests of the emitter's pieces: stage cuts, style resolution, TP plans, imports."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from autopar.emit.adapters import GPTAdapter, HFCausalLMAdapter, StageCut, adapter_for
from autopar.emit.pipeline import cut_stages, validate_schedule
from autopar.emit.tp import build_tp_plan, resolve_styles, validate_divisible
from autopar.errors import PlanValidationError, UserInputError
from autopar.plan import Recompute, ShardingPlan, TPStyle
from tests.emit.plans import make_plan
from tests.emit.workers import build_model, layer_paths


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_hand_written_layer_paths_are_captures(family: str) -> None:
    import autopar

    graph = autopar.capture(build_model(family, meta=True), (torch.zeros(2, 16, dtype=torch.long),))
    assert tuple(layer.module_path for layer in graph.layers) == layer_paths(family)


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_stages_chain_to_the_original_forward(family: str) -> None:
    """Cut at the plan's boundaries, stage after stage computes the original logits; names are kept."""
    model = build_model(family)
    plan = make_plan(layer_paths(family), family=family, pp=3)
    adapter = adapter_for(model)
    cuts = cut_stages(plan, model, adapter)
    x = torch.randint(0, 128, (2, 16))
    h = x
    keys: list[str] = []
    for cut in cuts:
        stage = adapter.build_stage(model, cut, seq_shards=1)
        h = stage(h)
        keys += list(stage.state_dict())
    expected = model(x) if family == "gpt" else model(input_ids=x).logits
    torch.testing.assert_close(h, expected, rtol=0, atol=1e-6)
    assert sorted(keys) == sorted(model.state_dict())  # every parameter in exactly one stage, same name
    assert len(list(model.parameters())) == len(dict(model.named_parameters()))  # the original is untouched


def test_cut_keeps_original_block_names_and_drops_the_rest() -> None:
    model = build_model("gpt", meta=True)
    stage = GPTAdapter().build_stage(model, StageCut(blocks=("blocks.2", "blocks.3"), has_pre=False, has_post=True),
                                     seq_shards=1)
    assert stage.tok_emb is None and stage.pos_emb is None and stage.lm_head is not None
    assert [name for name, _ in stage.blocks.named_children()] == ["2", "3"]
    assert len(model.blocks) == 4 and model.tok_emb is not None


def test_cut_stages_maps_embeddings_and_head_to_the_ends() -> None:
    model = build_model("gpt", meta=True)
    plan = make_plan(layer_paths("gpt"), pp=2, schedule="interleaved-1f1b", virtual_stages=2)
    cuts = cut_stages(plan, model, GPTAdapter())
    assert [c.blocks for c in cuts] == [("blocks.0",), ("blocks.1", "blocks.2"), ("blocks.3",), ()]
    assert [(c.has_pre, c.has_post) for c in cuts] == [(True, False), (False, False), (False, False), (False, True)]


def test_cut_stages_refuses_plans_for_other_models() -> None:
    model = build_model("gpt", meta=True)
    swapped = ["tok_emb+pos_emb", "blocks.1", "blocks.0", "blocks.2", "blocks.3", "ln_f+lm_head"]
    with pytest.raises(PlanValidationError, match="in order"):
        cut_stages(make_plan(swapped, pp=2), model, GPTAdapter())
    head_in_middle = ["tok_emb+pos_emb", "blocks.0", "blocks.1", "ln_f+lm_head", "blocks.2", "blocks.3"]
    with pytest.raises(PlanValidationError, match="'ln_f\\+lm_head'"):
        cut_stages(make_plan(head_in_middle, pp=2), model, GPTAdapter())


def test_interleaved_schedule_needs_whole_rounds_of_micro_batches() -> None:
    def layout(nmb: int) -> object:
        return make_plan(layer_paths("gpt"), pp=2, schedule="interleaved-1f1b", virtual_stages=2,
                         num_micro_batches=nmb).layout

    with pytest.raises(PlanValidationError, match=r"num_micro_batches \(5\) to be a multiple of 2 rounds"):
        validate_schedule(layout(5))
    validate_schedule(layout(6))
    validate_schedule(make_plan(layer_paths("gpt"), pp=3, num_micro_batches=1).layout)  # 1F1B runs as GPipe


def test_styles_apply_to_every_block_and_the_root_level_layers() -> None:
    model = build_model("gpt", meta=True)
    plan = make_plan(layer_paths("gpt"), tp=2, pp=2)
    adapter = GPTAdapter()
    first, last = (adapter.build_stage(model, c, seq_shards=1) for c in cut_stages(plan, model, adapter))
    styles = resolve_styles(first, plan.stages[0])
    assert styles["tok_emb"] is TPStyle.ROWWISE and "lm_head" not in styles
    assert {p for p, s in styles.items() if s is TPStyle.COLWISE} == {
        f"blocks.{i}.{m}" for i in (0, 1) for m in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "mlp.c_fc")}
    last_styles = resolve_styles(last, plan.stages[1])
    assert last_styles["lm_head"] is TPStyle.COLWISE and last_styles["blocks.3.attn.c_proj"] is TPStyle.ROWWISE


def test_conflicting_styles_are_refused() -> None:
    model = build_model("gpt", meta=True)
    clash = (ShardingPlan(layer_kind="a", modules={"attn.q_proj": TPStyle.COLWISE}, ops={}),
             ShardingPlan(layer_kind="b", modules={"attn.q_proj": TPStyle.ROWWISE}, ops={}))
    plan = make_plan(layer_paths("gpt"), tp=2, sharding=clash)
    with pytest.raises(PlanValidationError, match="blocks.0.attn.q_proj"):
        resolve_styles(model, plan.stages[0])


def test_split_dimensions_must_divide() -> None:
    model = build_model("gpt", meta=True)
    styles = resolve_styles(model, make_plan(layer_paths("gpt"), tp=2).stages[0])
    validate_divisible(model, styles, 2)
    with pytest.raises(PlanValidationError, match="not divisible by tp=3"):
        validate_divisible(model, styles, 3)


def test_sequence_parallel_plan_for_gpt() -> None:
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
    )

    model = build_model("gpt", meta=True)
    stage = make_plan(layer_paths("gpt"), tp=2, sequence_parallel=True).stages[0]
    plan = build_tp_plan(model, resolve_styles(model, stage), GPTAdapter(), sequence_parallel=True)
    assert isinstance(plan["blocks.1.ln_2"], SequenceParallel) and isinstance(plan["ln_f"], SequenceParallel)
    gather = plan["blocks.1.attn"]
    assert isinstance(gather, PrepareModuleInput)
    assert gather.input_layouts == (Shard(1),) and gather.desired_input_layouts == (Replicate(),)
    assert isinstance(plan["blocks.1.mlp.c_proj"], RowwiseParallel)
    assert plan["blocks.1.mlp.c_proj"].output_layouts == (Shard(1),)
    assert plan["pos_emb"].output_layouts == (Shard(0),)  # (T, C): the sequence is dim 0
    assert plan["tok_emb"].output_layouts == (Shard(1),)
    assert plan["lm_head"].input_layouts == (Shard(1),) and plan["lm_head"].output_layouts == (Replicate(),)


def test_sequence_parallel_plan_for_llama_gathers_keyword_hidden_states() -> None:
    from torch.distributed.tensor import Replicate, Shard

    model = build_model("llama", meta=True)
    stage = make_plan(layer_paths("llama"), family="llama", tp=2, sequence_parallel=True).stages[0]
    plan = build_tp_plan(model, resolve_styles(model, stage), HFCausalLMAdapter(), sequence_parallel=True)
    attn = plan["model.layers.0.self_attn"]
    assert attn.input_kwarg_layouts == {"hidden_states": Shard(1)}
    assert attn.desired_input_kwarg_layouts == {"hidden_states": Replicate()}
    assert plan["model.layers.0.mlp"].input_layouts == (Shard(1),)
    assert type(plan["model.layers.0.post_attention_layernorm"]).__name__ == "SequenceParallel"


def test_activation_checkpointing_keeps_parameter_names() -> None:
    from autopar.emit.ac import apply_ac

    model = build_model("gpt")
    names = list(model.state_dict())
    x = torch.randint(0, 128, (2, 16))
    expected = model(x)
    assert apply_ac(model, ["blocks.0", "blocks.2"], Recompute.SELECTIVE) == 2
    assert type(model.blocks[0]).__name__ == "CheckpointWrapper" and type(model.blocks[1]).__name__ == "Block"
    assert list(model.state_dict()) == names
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def test_unknown_models_are_refused() -> None:
    with pytest.raises(UserInputError, match="Sequential"):
        adapter_for(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_importing_autopar_loads_no_distributed_machinery() -> None:
    code = ("import sys, autopar, autopar.api, autopar.emit, autopar.emit.parallelize; "
            "print(sorted(m for m in sys.modules if m.startswith(('torch.distributed.fsdp', "
            "'torch.distributed.pipelining', 'torch.distributed.tensor.parallel', 'torch.distributed.checkpoint'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_tied_weights_are_not_split_across_stages() -> None:
    from autopar.emit.build import check_tied_parameters
    from autopar.examples.gpt import GPT, GPTConfig

    with torch.device("meta"):
        tied = GPT(GPTConfig(n_layer=4, n_embd=32, n_head=4, vocab_size=128, block_size=16, tie_weights=True))
    check_tied_parameters(tied, make_plan(layer_paths("gpt"), dp=2))  # one FSDP unit keeps them tied
    with pytest.raises(UserInputError, match=r"\['tok_emb.weight', 'lm_head.weight'\]"):
        check_tied_parameters(tied, make_plan(layer_paths("gpt"), pp=2))
