"""Per-op sharding rules, placements and view mapping, on hand-made ATen ops (no capture needed)."""

from __future__ import annotations

import pytest

from autopar.graph.ir import Op, OpClass, TensorMeta
from autopar.layout import Collective
from autopar.solvers.sharding.op_strategies import op_strategies, param_bytes
from autopar.solvers.sharding.placement import (
    PARTIAL,
    REPLICATE,
    Placement,
    grad_placement,
    input_grad_placement,
    reshard_collective,
    shard,
)
from autopar.solvers.sharding.view_rules import map_placement, view_groups


def meta(*shape: int, dtype: str = "float32") -> TensorMeta:
    return TensorMeta(shape=shape, dtype=dtype)


def make_op(target: str, op_class: OpClass, inputs: list[TensorMeta], outputs: list[TensorMeta], *,
            params: list[str | None] | None = None, producers: list[str | None] | None = None,
            scalars: tuple[object, ...] = ()) -> Op:
    n = len(inputs)
    params = params if params is not None else [None] * n
    producers = producers if producers is not None else [None if p else f"x{i}" for i, p in enumerate(params)]
    return Op(name=target.split(".")[1], target=target, op_class=op_class, inputs=tuple(inputs),
              input_ops=tuple(producers), input_params=tuple(params), outputs=tuple(outputs), flops=0,
              nbytes_moved=0, module_path="m", scalars=scalars)  # type: ignore[arg-type]


def names(op: Op, tp: int = 4, **kw: object) -> list[str]:
    return [s.name for s in op_strategies(op, tp=tp, **kw)]  # type: ignore[arg-type]


# ---- placements ------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["R", "P", "S(0)", "S(3)", "S(1,sf=4)"])
def test_placement_text_round_trips(text: str) -> None:
    assert str(Placement.from_str(text)) == text


def test_placement_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="not a placement"):
        Placement.from_str("S(x)")
    with pytest.raises(ValueError, match="dim must be >= 0"):
        shard(-1)


@pytest.mark.parametrize(("src", "dst", "kind"), [
    ("P", "R", Collective.ALL_REDUCE),
    ("P", "S(1)", Collective.REDUCE_SCATTER),
    ("S(1)", "R", Collective.ALL_GATHER),
    ("S(0)", "S(1)", Collective.ALL_TO_ALL),
    ("S(0)", "S(0,sf=2)", Collective.ALL_TO_ALL),
    ("R", "S(2)", None),
    ("R", "P", None),
    ("S(1)", "S(1)", None),
])
def test_reshard_collectives(src: str, dst: str, kind: Collective | None) -> None:
    assert reshard_collective(Placement.from_str(src), Placement.from_str(dst)) is kind


def test_gradient_placements_follow_megatron_f_and_g() -> None:
    # g: a partial output (row-split matmul) needs the whole gradient back
    assert grad_placement(PARTIAL) == REPLICATE
    # f: a replicated input of a split op gets a partial gradient (to be all-reduced)
    assert input_grad_placement(REPLICATE, (shard(1),)) == PARTIAL
    assert input_grad_placement(REPLICATE, (REPLICATE,)) == REPLICATE
    assert input_grad_placement(shard(1), (PARTIAL,)) == shard(1)


# ---- view mapping ----------------------------------------------------------------------------


def test_view_groups_pair_equal_products() -> None:
    assert view_groups((2, 16, 64), (2, 16, 4, 16)) == [([0], [0]), ([1], [1]), ([2], [2, 3])]
    assert view_groups((1, 16, 64), (16, 64)) == [([0], []), ([1], [0]), ([2], [1])]
    assert view_groups((6, 4), (4, 6)) == [([0, 1], [0, 1])]


@pytest.mark.parametrize(("src", "dst", "before", "tp", "after"), [
    ((2, 16, 64), (2, 16, 4, 16), "S(2)", 4, "S(2)"),       # heads split out of the hidden dim: outermost maps
    ((2, 16, 4, 16), (2, 16, 64), "S(2)", 4, "S(2)"),       # and merge back
    ((2, 16, 4, 16), (2, 16, 64), "S(3)", 4, "S(2,sf=4)"),  # head_dim is inside its group: strided
    ((32, 64), (2, 16, 64), "S(0)", 2, "S(0)"),             # batch·seq split back: the batch divides by 2
    ((32, 64), (2, 16, 64), "S(0)", 4, None),               # a quarter of B·T is half a sequence: no dim
    ((1, 16, 64), (16, 64), "S(1)", 4, "S(0)"),             # size-1 dims do not count
    ((2, 4, 16, 16), (8, 16, 16), "S(1)", 4, "S(0,sf=2)"),  # (B, H) → B·H with H split: strided shard
    ((8, 16, 16), (2, 4, 16, 16), "S(0,sf=2)", 4, "S(1)"),  # ... and back to H exactly
    ((2, 16, 64), (32, 64), "S(1)", 4, "S(0,sf=2)"),        # sequence split through a flatten of (B, T)
    ((2, 16, 64), (32, 64), "R", 4, "R"),
])
def test_reshape_maps_shards(src: tuple[int, ...], dst: tuple[int, ...], before: str, tp: int,
                             after: str | None) -> None:
    op = make_op("aten.view.default", OpClass.VIEW, [meta(*src)], [meta(*dst)])
    got = map_placement(op, Placement.from_str(before), tp)
    assert (str(got) if got is not None else None) == after


def test_transpose_permute_expand_slice() -> None:
    tr = make_op("aten.transpose.int", OpClass.VIEW, [meta(2, 16, 4, 16)], [meta(2, 4, 16, 16)], scalars=(1, 2))
    assert map_placement(tr, shard(2), 4) == shard(1)
    t = make_op("aten.t.default", OpClass.VIEW, [meta(256, 64)], [meta(64, 256)])
    assert map_placement(t, shard(0), 4) == shard(1)
    perm = make_op("aten.permute.default", OpClass.VIEW, [meta(2, 3, 8)], [meta(8, 2, 3)], scalars=(2, 0, 1))
    assert map_placement(perm, shard(2), 4) == shard(0)
    expand = make_op("aten.expand.default", OpClass.VIEW, [meta(1, 4, 16)], [meta(2, 4, 16)])
    assert map_placement(expand, shard(1), 4) == shard(1)
    sl = make_op("aten.slice.Tensor", OpClass.VIEW, [meta(2, 4, 16, 16)], [meta(2, 4, 16, 8)], scalars=(3, 0, 8))
    assert map_placement(sl, shard(1), 4) == shard(1)
    assert map_placement(sl, shard(3), 4) is None  # the sliced dim itself
    assert map_placement(sl, PARTIAL, 4) == PARTIAL


# ---- op rules --------------------------------------------------------------------------------


def test_linear_as_addmm_has_column_and_row_splits() -> None:
    # addmm(bias (256,), x (32, 64), weight.t() (64, 256)): Megatron's two ways to split a Linear
    op = make_op("aten.addmm.default", OpClass.MATMUL, [meta(256), meta(32, 64), meta(64, 256)], [meta(32, 256)],
                 params=["fc.bias", None, "fc.weight"], producers=[None, "x", "t"])
    got = names(op)
    assert got[0] == "R = R x R x R"
    assert "S(1) = S(0) x R x S(1)" in got   # column split: bias and weight split on out-features
    assert "P = P x S(1) x S(0)" in got      # row split: contraction → partial output, bias added once
    assert "S(0) = R x S(0) x R" not in got  # batch split over a replicated weight: the dp axis's job
    assert "S(0) = R x S(0) x R" in names(op, allow_batch_split=True)


def test_tp_one_and_indivisible_dims_leave_only_replicate() -> None:
    op = make_op("aten.mm.default", OpClass.MATMUL, [meta(30, 12), meta(12, 6)], [meta(30, 6)],
                 params=[None, "w"], producers=["x", "t"])
    assert names(op, tp=1) == ["R = R x R"]
    assert names(op, tp=8) == ["R = R x R"]  # 12, 6 and 30 are not multiples of 8
    assert names(op, tp=2) == ["R = R x R", "P = S(1) x S(0)", "S(1) = R x S(1)"]


def test_bmm_splits_batch_rows_cols_and_contraction() -> None:
    op = make_op("aten.bmm.default", OpClass.MATMUL, [meta(8, 16, 4), meta(8, 4, 16)], [meta(8, 16, 16)])
    assert names(op) == ["R = R x R", "S(0) = S(0) x S(0)", "S(1) = S(1) x R", "P = S(2) x S(1)",
                         "S(2) = R x S(2)"]
    strided = names(op, hints=[{shard(0, 2)}, {shard(0, 2)}])
    assert "S(0,sf=2) = S(0,sf=2) x S(0,sf=2)" in strided


def test_attention_shards_heads_and_keeps_broadcast_masks_whole() -> None:
    q = meta(2, 8, 16, 32)
    op = make_op("aten._scaled_dot_product_efficient_attention.default", OpClass.ATTENTION,
                 [q, q, q, meta(2, 1, 16, 16)], [q, meta(2, 8, 32), meta(dtype="int64"), meta(dtype="int64")])
    got = names(op)
    assert got == ["R, R, R, R = R x R x R x R", "S(1), S(1), R, R = S(1) x S(1) x S(1) x R"]
    assert "S(0), S(0), R, R = S(0) x S(0) x S(0) x S(0)" in names(op, tp=2, allow_batch_split=True)


def test_layer_norm_shards_only_dims_it_does_not_normalise() -> None:
    op = make_op("aten.native_layer_norm.default", OpClass.NORM, [meta(2, 16, 64), meta(64), meta(64)],
                 [meta(2, 16, 64), meta(2, 16, 1), meta(2, 16, 1)], params=[None, "ln.weight", "ln.bias"],
                 scalars=((64,), 1e-5))
    got = names(op)
    assert "S(1), S(1), S(1) = S(1) x R x R" in got  # sequence parallelism
    assert not any(n.startswith("S(2)") for n in got)


def test_softmax_never_splits_its_own_dim() -> None:
    op = make_op("aten._softmax.default", OpClass.SOFTMAX, [meta(4, 8, 16, 16)], [meta(4, 8, 16, 16)],
                 scalars=(-1, False))
    assert names(op) == ["R = R", "S(0) = S(0)", "S(1) = S(1)", "S(2) = S(2)"]


def test_reduction_keeps_dims_or_goes_partial() -> None:
    mean = make_op("aten.mean.dim", OpClass.REDUCTION, [meta(2, 16, 64)], [meta(2, 16, 1)], scalars=((-1,), True))
    assert names(mean) == ["R = R", "S(1) = S(1)", "P = S(2)", "P = P"]
    amax = make_op("aten.amax.default", OpClass.REDUCTION, [meta(2, 16, 64)], [meta(2, 16)], scalars=((-1,), False))
    assert names(amax) == ["R = R", "S(1) = S(1)"]  # a max of shards is not a sum


def test_elementwise_broadcasts_and_linear_ops_keep_partials() -> None:
    add = make_op("aten.add.Tensor", OpClass.ELEMENTWISE, [meta(2, 16, 64), meta(64)], [meta(2, 16, 64)])
    got = names(add)
    assert got == ["R = R x R", "S(1) = S(1) x R", "S(2) = S(2) x S(0)", "P = P x P"]
    gelu = make_op("aten.gelu.default", OpClass.ELEMENTWISE, [meta(2, 16, 64)], [meta(2, 16, 64)])
    assert "P = P" not in names(gelu)
    mul = make_op("aten.mul.Tensor", OpClass.ELEMENTWISE, [meta(4, 8), meta(4, 8)], [meta(4, 8)])
    assert {"P = P x R", "P = R x P"} <= set(names(mul))
    drop = make_op("aten.native_dropout.default", OpClass.DROPOUT, [meta(4, 8)], [meta(4, 8), meta(4, 8, dtype="bool")],
                   scalars=(0.1, True))
    assert names(drop) == ["R, R = R", "S(0), S(0) = S(0)", "S(1), S(1) = S(1)"]


def test_embedding_vocab_or_hidden_split() -> None:
    op = make_op("aten.embedding.default", OpClass.EMBEDDING, [meta(1024, 64), meta(2, 16, dtype="int64")],
                 [meta(2, 16, 64)], params=["emb.weight", None])
    assert names(op) == ["R = R x R", "P = S(0) x R", "S(2) = S(1) x R"]


def test_cat_and_unknown_ops() -> None:
    cat = make_op("aten.cat.default", OpClass.COPY, [meta(4, 4, 16, 8), meta(4, 4, 16, 8)], [meta(4, 4, 16, 16)],
                  scalars=(None, -1))
    assert names(cat) == ["R = R x R", "S(0) = S(0) x S(0)", "S(1) = S(1) x S(1)", "S(2) = S(2) x S(2)"]
    weird = make_op("aten.fft_fft.default", OpClass.UNKNOWN, [meta(8, 8)], [meta(8, 8)])
    assert names(weird) == ["R = R"]


def test_views_offer_what_their_producer_delivers() -> None:
    view = make_op("aten.view.default", OpClass.VIEW, [meta(2, 16, 64)], [meta(32, 64)])
    got = names(view, hints=[{REPLICATE, shard(2), shard(1), PARTIAL}])
    assert got == ["R = R", "R = R (grad P)", "S(0,sf=2) = S(1)", "S(1) = S(2)", "P = P"]
    weight_t = make_op("aten.t.default", OpClass.VIEW, [meta(256, 64)], [meta(64, 256)], params=["fc.weight"])
    assert names(weight_t) == ["R = R", "S(1) = S(0)", "S(0) = S(1)"]


def test_parameter_bytes_are_split_where_sharded() -> None:
    weight_t = make_op("aten.t.default", OpClass.VIEW, [meta(256, 64, dtype="bfloat16")],
                       [meta(64, 256, dtype="bfloat16")], params=["fc.weight"])
    col, rep = op_strategies(weight_t, tp=4)[1], op_strategies(weight_t, tp=4)[0]
    assert param_bytes(weight_t, col, 4) == 256 * 64 * 2 / 4
    assert param_bytes(weight_t, rep, 4) == 256 * 64 * 2
    assert param_bytes(weight_t, col, 4, per_element=True) == 256 * 64 / 4
    assert param_bytes(weight_t, col, 4, trainable=frozenset()) == 0.0


def test_boundary_pins_shard_only_a_real_sequence_dim() -> None:
    from autopar.solvers.sharding.layer_graph import boundary_pin

    hidden = meta(2, 16, 64)
    assert boundary_pin(hidden, hidden=True, tp=4, sequence_parallel=True) == shard(1)
    assert boundary_pin(hidden, hidden=True, tp=4, sequence_parallel=False) == REPLICATE
    assert boundary_pin(hidden, hidden=False, tp=4, sequence_parallel=True) == REPLICATE  # masks, rotary tables
    assert boundary_pin(hidden, hidden=True, tp=1, sequence_parallel=True) == REPLICATE
    assert boundary_pin(meta(2, 15, 64), hidden=True, tp=4, sequence_parallel=True) == REPLICATE  # 15 % 4
    assert boundary_pin(meta(16, 64), hidden=True, tp=4, sequence_parallel=True) == REPLICATE  # no sequence dim
