"""Routed experts and fused projections in the layer sharding solver: Megatron's split, found from costs.

An MoE layer's experts are one grouped GEMM per projection (``transformers::grouped_mm_fallback``:
tokens sorted by expert (S, K) × stacked weights (E, K, N)). Megatron-LM splits every expert like
its dense MLP: the fused gate/up weight column-wise with each half split alike (a strided shard,
``S(d,sf=2)``), the down weight row-wise, one all-reduce after the experts. The solver must find
that from the costs alone, and must never split the rows or the experts (the group ends couple them).
"""

from __future__ import annotations

import pytest
import torch

import autopar
from autopar.graph.ir import Op, OpClass, TensorMeta
from autopar.plan import TPStyle
from autopar.solvers.sharding.op_strategies import op_strategies
from autopar.solvers.sharding.placement import Placement, shard
from autopar.solvers.sharding.view_rules import fused_cuts, fused_param_placements, map_placement
from tests.solvers.test_layer_sharding import layer, solve


def m(*shape: int, dtype: str = "float32") -> TensorMeta:
    return TensorMeta(shape=shape, dtype=dtype)


def split_op(src: tuple[int, ...], pieces: int, dim: int) -> Op:
    out = tuple(s // pieces if d == dim else s for d, s in enumerate(src))
    return Op(name="split", target="aten.split.Tensor", op_class=OpClass.VIEW, inputs=(m(*src),), input_ops=("g",),
              input_params=(None,), outputs=(m(*out),) * pieces, flops=0, nbytes_moved=0, module_path="",
              scalars=(out[dim], dim))


GROUPED = Op(name="g", target="transformers.grouped_mm_fallback.default", op_class=OpClass.MATMUL,
             inputs=(m(32, 32), m(4, 32, 128), m(4, dtype="int32")), input_ops=("x", "t", "offs"),
             input_params=(None, None, None), outputs=(m(32, 128),), flops=0, nbytes_moved=0, module_path="e")


def names(op: Op, hints: list[set[Placement]]) -> list[str]:
    return [s.name for s in op_strategies(op, tp=2, hints=[frozenset(h) for h in hints])]


def test_grouped_gemm_splits_each_experts_matmul_never_rows_or_experts() -> None:
    got = names(GROUPED, [set(), set(), set()])
    assert got == ["R = R x R x R", "P = S(1) x S(1) x R", "S(1) = R x S(2) x R"]
    # a weight delivered strided (a fused gate/up) gives the strided column split too
    strided = names(GROUPED, [set(), {shard(2, 2)}, set()])
    assert "S(1,sf=2) = R x S(2,sf=2) x R" in strided
    assert not any(s.startswith("S(0)") for s in strided)  # rows (tokens sorted by expert) never split


@pytest.mark.parametrize(("placement", "pieces", "expected"), [
    (shard(1, 2), 2, "S(1)"),  # cut at the seams of a fused pair: each piece plainly sharded
    (shard(1, 3), 3, "S(1)"),  # q/k/v
    (shard(1, 3), 2, None),    # the cut is not at the seams
    (shard(1), 2, None),       # a plain shard: rank 0 holds the whole first piece
    (shard(0, 2), 2, "S(0,sf=2)"),  # another dim: untouched
])
def test_a_split_keeps_a_strided_shard_only_at_its_seams(placement: Placement, pieces: int,
                                                          expected: str | None) -> None:
    got = map_placement(split_op((32, 192), pieces, 1), placement, 2)
    assert (None if got is None else str(got)) == expected


def test_parameters_get_strided_candidates_only_where_a_split_cuts_a_dim_of_their_size() -> None:
    cuts = fused_cuts([split_op((32, 128), 2, 1), split_op((16, 96), 3, 1)])
    assert cuts == {(128, 2), (96, 3)}
    assert fused_param_placements((4, 128, 32), cuts, 2) == {shard(1, 2)}
    assert fused_param_placements((32, 96), cuts, 2) == {shard(1, 3)}
    assert fused_param_placements((32, 96), cuts, 64) == frozenset()  # 96 / 3 = 32 rows: not 64 ways
    assert fused_param_placements((64, 32), cuts, 2) == frozenset()


def _capture(config_cls: str, model_cls: str, **cfg: object) -> autopar.OpGraph:
    import transformers

    config = getattr(transformers, config_cls)(vocab_size=1024, hidden_size=1024, num_hidden_layers=2,
                                               num_attention_heads=8, num_key_value_heads=4,
                                               max_position_embeddings=512, **cfg)
    with torch.device("meta"):
        model = getattr(transformers, model_cls)(config)
    return autopar.capture(model, {"input_ids": torch.zeros(1, 512, dtype=torch.long)})


def test_mixtral_experts_are_split_like_megatrons_mlp() -> None:
    graph = _capture("MixtralConfig", "MixtralForCausalLM", intermediate_size=2048, num_local_experts=8,
                     num_experts_per_tok=2)
    result = solve(layer(graph, "model.layers.0"), 4)
    assert result.params == {"mlp.experts.gate_up_proj": "S(1,sf=2)", "mlp.experts.down_proj": "S(2)"}
    chosen = [v for k, v in result.strategies.items() if "grouped_mm" in k]
    assert chosen == ["S(1,sf=2) = R x S(2,sf=2) x R", "P = S(1) x S(1) x R"]
    assert [k for k, _ in result.forward_collectives] == ["all_reduce", "all_reduce"]  # attention, experts


def test_phi3_fused_gate_up_is_split_at_its_seams() -> None:
    graph = _capture("Phi3Config", "Phi3ForCausalLM", intermediate_size=2816, pad_token_id=0)
    result = solve(layer(graph, "model.layers.0"), 4)
    assert result.module_styles()["mlp.gate_up_proj"] is TPStyle.COLWISE
    assert result.module_styles()["mlp.down_proj"] is TPStyle.ROWWISE
    assert result.params["mlp.gate_up_proj.weight"] == "S(0,sf=2)"
