"""Single-process tests of the emitter's pieces: the split program, styles → placements, refusals, imports."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from autopar.emit.build import prepare
from autopar.emit.pipeline import validate_schedule
from autopar.emit.program import build_program, unflatten_output
from autopar.emit.tp import param_placements, resolve_styles
from autopar.errors import PlanValidationError
from autopar.plan import Recompute, ShardingPlan, TPStyle
from tests.emit.plans import make_plan
from tests.emit.workers import build_model, layer_paths
from tests.emit.zoo import ARCHS, batch


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_hand_written_layer_paths_are_captures(family: str) -> None:
    import autopar

    graph = autopar.capture(build_model(family, meta=True), (torch.zeros(2, 16, dtype=torch.long),))
    assert tuple(layer.module_path for layer in graph.layers) == layer_paths(family)


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_stages_chain_to_the_original_forward(family: str) -> None:
    """Split at the plan's boundaries, the stages together compute the original output; names are kept."""
    model = build_model(family)
    plan = make_plan(layer_paths(family), family=family, pp=3, micro_batch_size=2)
    x = torch.randint(0, 128, (2, 16))
    name = "idx" if family == "gpt" else "input_ids"
    program = build_program(model, {name: x}, plan)
    got = unflatten_output(program.pipe(**{name: x}), program.out_spec)
    expected = model(x) if family == "gpt" else model(input_ids=x)
    if family != "gpt":
        got, expected = got.logits, expected.logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    keys = [k for i in range(3) for k in program.stage_module(i).state_dict()]
    assert sorted(keys) == sorted(model.state_dict())  # every parameter in exactly one stage, same name
    assert program.block_paths[0] and not set(program.block_paths[0]) & set(program.block_paths[1])
    # the stages run their graphs' generated code, not fx.Interpreter (a Python call per node)
    flags = [m._run_with_interpreter for m in program.pipe.split_gm.modules() if hasattr(m, "_run_with_interpreter")]
    assert flags and not any(flags)


def test_mistral_sliding_window_survives_the_split() -> None:
    """The program that runs is the model's own: the sliding window (3 < 8 tokens) changes the loss."""
    arch = ARCHS["mistral"]
    torch.manual_seed(0)
    model = arch.build(False)
    x, y = batch(arch, 2)
    plan = make_plan([f"model.{p}" if p.startswith("layers") else p for p in
                      ("model.embed_tokens+model.rotary_emb", "layers.0", "layers.1", "model.norm+lm_head")],
                     pp=2, micro_batch_size=2)
    program = build_program(model, x, plan)
    got = arch.loss(unflatten_output(program.pipe(**x), program.out_spec), y)
    assert got.item() == pytest.approx(arch.loss(model(**x), y).item(), abs=1e-6)
    model.config.sliding_window = 64  # a plain causal mask: the loss moves, so the window was in effect
    assert abs(arch.loss(model(**x), y).item() - got.item()) > 1e-4


def test_boundary_refusals_name_the_layer() -> None:
    model = build_model("gpt", meta=True)
    x = {"idx": torch.zeros(2, 16, dtype=torch.long)}
    swapped = ["tok_emb+pos_emb", "blocks.1", "blocks.0", "blocks.2", "blocks.3", "ln_f+lm_head"]
    with pytest.raises(PlanValidationError, match="block .blocks.1. runs in stage 1"):
        build_program(model, x, make_plan(swapped, pp=2, bounds=[0, 2, 6]))
    other = ["tok_emb+pos_emb", "layers.0", "layers.1", "layers.2", "layers.3", "ln_f+lm_head"]
    with pytest.raises(PlanValidationError, match="not modules this program calls"):
        build_program(model, x, make_plan(other, pp=2))


def test_interleaved_schedule_needs_whole_rounds_of_micro_batches() -> None:
    def layout(nmb: int) -> object:
        return make_plan(layer_paths("gpt"), pp=2, schedule="interleaved-1f1b", virtual_stages=2,
                         num_micro_batches=nmb).layout

    with pytest.raises(PlanValidationError, match=r"num_micro_batches \(5\) to be a multiple of 2 rounds"):
        validate_schedule(layout(5))
    validate_schedule(layout(6))
    validate_schedule(make_plan(layer_paths("gpt"), pp=3, num_micro_batches=1).layout)  # 1F1B runs as GPipe


def test_styles_become_weight_dims_by_how_the_module_stores_its_weight() -> None:
    model = build_model("gpt", meta=True)
    plan = make_plan(layer_paths("gpt"), tp=2, pp=2)
    styles = resolve_styles(model, plan.stages[0])
    assert styles["tok_emb"] is TPStyle.ROWWISE
    names = ["tok_emb.weight", "blocks.0.attn.q_proj.weight", "blocks.0.attn.c_proj.weight",
             "blocks.0.attn.c_proj.bias", "blocks.0.ln_1.weight", "blocks.0.mlp.c_fc.bias"]
    dims = param_placements(model, styles, names)
    assert dims == {"tok_emb.weight": 0, "blocks.0.attn.q_proj.weight": 0, "blocks.0.attn.c_proj.weight": 1,
                    "blocks.0.attn.c_proj.bias": None, "blocks.0.ln_1.weight": None, "blocks.0.mlp.c_fc.bias": 0}
    gpt2 = ARCHS["gpt2"].build(False)  # Conv1D keeps (in, out): colwise splits dim 1
    conv = {"transformer.h.0.mlp.c_fc": TPStyle.COLWISE, "transformer.h.0.mlp.c_proj": TPStyle.ROWWISE}
    assert param_placements(gpt2, conv, ["transformer.h.0.mlp.c_fc.weight", "transformer.h.0.mlp.c_proj.weight"]) \
        == {"transformer.h.0.mlp.c_fc.weight": 1, "transformer.h.0.mlp.c_proj.weight": 0}


def test_a_module_with_two_styles_gets_one_split_style() -> None:
    """A tied weight read by two layers: the split style wins over replicate, the first split over a later one."""
    model = build_model("gpt", meta=True)
    clash = (ShardingPlan(layer_kind="a", modules={"attn.q_proj": TPStyle.REPLICATE, "attn.k_proj": TPStyle.ROWWISE},
                          ops={}),
             ShardingPlan(layer_kind="b", modules={"attn.q_proj": TPStyle.COLWISE, "attn.k_proj": TPStyle.COLWISE},
                          ops={}))
    styles = resolve_styles(model, make_plan(layer_paths("gpt"), tp=2, sharding=clash).stages[0])
    assert styles["blocks.0.attn.q_proj"] is TPStyle.COLWISE and styles["blocks.0.attn.k_proj"] is TPStyle.ROWWISE


def test_a_style_on_a_module_without_a_known_weight_layout_is_refused_before_any_process_group() -> None:
    model = build_model("gpt", meta=True)
    odd = (ShardingPlan(layer_kind="a", modules={"ln_1": TPStyle.COLWISE}, ops={}),)
    with pytest.raises(PlanValidationError, match=r"'blocks.0.ln_1' \(LayerNorm\).*no 2-D weight.*pin tp=1"):
        prepare(model, {"idx": torch.zeros(2, 16, dtype=torch.long)}, make_plan(layer_paths("gpt"), tp=2,
                                                                                 sharding=odd))


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_every_value_crosses_one_stage_boundary_at_a_time(family: str) -> None:
    """Interleaved schedules send only to the adjacent stage, and torch has no backward for a value sent to
    several stages: what stage k reads comes from stage k − 1 alone (masks, rotary tables, inputs relayed)."""
    import operator

    from autopar.emit.program import build_program

    model = build_model(family)
    plan = make_plan(layer_paths(family), pp=2, schedule="interleaved-1f1b", virtual_stages=2, num_micro_batches=4)
    name = "idx" if family == "gpt" else "input_ids"
    program = build_program(model, {name: torch.zeros(2, 16, dtype=torch.long)}, plan)
    assert program.pipe.num_stages == 4
    calls = [n for n in program.pipe.split_gm.graph.nodes if n.op == "call_module"]
    for k, call in enumerate(calls):
        sources = {a.args[0] if a.op == "call_function" and a.target is operator.getitem else a
                   for a in call.all_input_nodes}
        expected = {calls[k - 1]} if k else {n for n in sources if n.op == "placeholder"}
        assert sources == expected, (k, sources)
    for k in range(1, 4):  # masks and rotary tables are recomputed in each stage, not sent: only the hidden
        received = [n.meta["val"] for n in program.stage_module(k).graph.nodes if n.op == "placeholder"]
        floats = [tuple(v.shape) for v in received if v.is_floating_point()]
        assert floats and all(len(shape) == 3 and shape[-1] == 32 for shape in floats), (k, floats)


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


def test_importing_autopar_loads_no_distributed_machinery() -> None:
    code = ("import sys, autopar, autopar.api, autopar.emit, autopar.emit.parallelize; "
            "print(sorted(m for m in sys.modules if m.startswith(('torch.distributed.fsdp', "
            "'torch.distributed.pipelining', 'torch.distributed.tensor.parallel', 'torch.distributed.checkpoint'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_emit_never_imports_the_api() -> None:
    from pathlib import Path

    import autopar.emit

    for path in Path(autopar.emit.__file__).parent.glob("*.py"):
        text = path.read_text()
        assert "import autopar.api" not in text and "from autopar.api" not in text, path.name
        assert "from autopar import api" not in text, path.name


@pytest.mark.parametrize(("name", "tokens"), [("vit", 17), ("whisper", 8), ("llama", 8)])
def test_token_count_comes_from_the_graph(name: str, tokens: int) -> None:
    """ViT's blocks see 16 patches + a class token (not its 3 colour channels); Whisper's see 8 frames."""
    import autopar

    arch = ARCHS[name]
    x, _ = batch(arch, 2)
    assert autopar.capture(arch.build(False), x).info["seq_len"] == tokens


@pytest.mark.parametrize("arch", ["llama", "bert", "t5", "whisper"])
def test_the_split_program_computes_the_model(arch: str) -> None:
    """Stages run one after another on one process give the model's output: inputs reach stage 0 in the
    model's order (a padding mask read before the token ids once swapped them), masks recomputed in a
    later stage equal the ones the model makes."""
    import autopar
    from autopar.api import plan_graph
    from tests.emit.matrix_workers import CLUSTER, build
    from tests.emit.zoo import ARCHS, batch

    spec = ARCHS[arch]
    model = build(spec)
    example, _ = batch(spec, 2)
    plan = plan_graph(autopar.capture(model, example), cluster=CLUSTER, global_batch_size=4, dtype="float32",
                      constraints={"pp": 2, "dp": 1, "tp": 1, "micro_batch_size": 1, "schedule": "1f1b"})
    program = build_program(model, example, plan)
    x, _ = batch(spec, 1, seed=10)
    assert any(v.dim() > 1 and not bool((v == v.flatten()[0]).all()) for v in x.values())  # real, varied inputs
    out = program.stage_module(0)(**x)
    out = program.stage_module(1)(*(out if isinstance(out, tuple) else (out,)))
    got = out[program.output_order[0]] if isinstance(out, tuple) else out
    want = model(**x)
    want = want.logits if hasattr(want, "logits") else want[0]
    assert torch.allclose(got, want, atol=1e-5), float((got - want).abs().max())
