"""Memory model: ZeRO model states, activations against Korthikanti et al., pipelines, buffers."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from autopar.cost_models.memory import (
    ALLOCATOR_HEADROOM,
    RUNTIME_RESERVED_BYTES,
    estimate_layer_activation_bytes,
    estimate_model_state_bytes,
    estimate_rank_memory,
    inflight_micro_batches,
    tensor_budget_bytes,
    with_headroom,
)
from autopar.graph.ir import Layer, OpGraph, SavedTensor, TensorMeta
from autopar.plan import Recompute, Schedule
from tests.cost_models.conftest import BATCH, HEADS, HIDDEN, SEQ, block, megatron_region_ops

K = 12  # Adam: fp32 master weights, momentum, variance
PSI = 7_500_000_000


# ---- ZeRO (Rajbhandari et al. 2020, Fig. 1) ---------------------------------------------------

@pytest.mark.parametrize(("stage", "published_gb"), [(0, 120.0), (1, 31.4), (2, 16.6), (3, 1.9)])
def test_zero_stages_reproduce_the_papers_7_5b_numbers(stage: int, published_gb: float) -> None:
    state = estimate_model_state_bytes(PSI, zero_stage=stage, dp=64)
    assert round(state.total / 1e9, 1) == published_gb


@given(psi=st.integers(min_value=1, max_value=10**12), nd=st.integers(min_value=1, max_value=4096))
def test_zero_formulas(psi: int, nd: int) -> None:
    shard = math.ceil(psi / nd)
    s0, s1, s2, s3 = (estimate_model_state_bytes(psi, zero_stage=z, dp=nd) for z in range(4))
    assert s0.total == (2 + 2 + K) * psi
    assert (s1.params, s1.grads, s1.optimizer) == (2 * psi, 2 * psi, K * shard)
    assert (s2.params, s2.grads, s2.optimizer) == (2 * psi, 2 * shard, K * shard)
    assert s3.total == (2 + 2 + K) * shard
    fp32 = estimate_model_state_bytes(psi, zero_stage=0, dp=nd, dtype="float32")
    assert (fp32.params, fp32.grads, fp32.optimizer) == (4 * psi, 4 * psi, 8 * psi)


def test_model_state_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match="zero_stage"):
        estimate_model_state_bytes(10, zero_stage=4, dp=2)
    with pytest.raises(ValueError, match="dtype"):
        estimate_model_state_bytes(10, zero_stage=0, dp=2, dtype="int8")


# ---- activations (Korthikanti et al. 2022, Table 2) -----------------------------------------

def korthikanti_bytes(*, s: int, b: int, h: int, a: int, t: int, sp: bool, recompute: Recompute,
                      attention_core: bool = True) -> float:
    """Table 2 of the paper: bytes per layer in 16-bit activations (``attention_core=False``: no 5as/h term)."""
    core = 5 * a * s / h if attention_core else 0.0
    match recompute:
        case Recompute.FULL:
            return 2 * s * b * h / (t if sp else 1)
        case Recompute.SELECTIVE:
            return s * b * h * (34 / t if sp else 10 + 24 / t)
        case _:
            return s * b * h * ((34 + core) / t if sp else 10 + 24 / t + core / t)


SETTINGS = [(1, False)] + [(t, sp) for t in (2, 4, 8) for sp in (False, True)]


@pytest.mark.parametrize(("tp", "sp"), SETTINGS)
@pytest.mark.parametrize("recompute", [Recompute.NONE, Recompute.SELECTIVE])
def test_activations_match_korthikanti_for_explicit_attention(gpt_unfused: OpGraph, tp: int, sp: bool,
                                                              recompute: Recompute) -> None:
    layer = block(gpt_unfused)
    mb = 4  # captured at batch 2, priced at micro-batch 4: activations scale linearly
    got = estimate_layer_activation_bytes(layer, micro_batch_size=mb, graph_batch_size=gpt_unfused.batch_size,
                                          recompute=recompute, dtype="bfloat16", tp=tp,
                                          sharded=megatron_region_ops(layer), sequence_parallel=sp)
    want = korthikanti_bytes(s=SEQ, b=mb, h=HIDDEN, a=HEADS, t=tp, sp=sp, recompute=recompute)
    assert got == pytest.approx(want, rel=0.05)


@pytest.mark.parametrize(("tp", "sp"), SETTINGS)
@pytest.mark.parametrize("recompute", list(Recompute))
def test_fused_attention_keeps_no_s_squared_term(gpt_fused: OpGraph, tp: int, sp: bool, recompute: Recompute) -> None:
    layer = block(gpt_fused)
    got = estimate_layer_activation_bytes(layer, micro_batch_size=BATCH, graph_batch_size=gpt_fused.batch_size,
                                          recompute=recompute, dtype="bfloat16", tp=tp,
                                          sharded=megatron_region_ops(layer), sequence_parallel=sp)
    want = korthikanti_bytes(s=SEQ, b=BATCH, h=HIDDEN, a=HEADS, t=tp, sp=sp, recompute=recompute,
                             attention_core=False)
    assert got == pytest.approx(want, rel=0.05)
    assert not any(s.meta.shape[-2:] == (SEQ, SEQ) for s in layer.saved)


def test_s_squared_term_grows_quadratically_only_with_explicit_attention(gpt_unfused: OpGraph,
                                                                         gpt_fused: OpGraph) -> None:
    def kept(graph: OpGraph, recompute: Recompute) -> int:
        return estimate_layer_activation_bytes(block(graph), micro_batch_size=BATCH, graph_batch_size=BATCH,
                                               recompute=recompute, dtype="bfloat16")

    core = kept(gpt_unfused, Recompute.NONE) - kept(gpt_unfused, Recompute.SELECTIVE)
    assert core == 5 * HEADS * SEQ * SEQ * BATCH  # softmax out (2) + dropout mask (1) + dropout out (2) bytes
    assert kept(gpt_fused, Recompute.NONE) == kept(gpt_fused, Recompute.SELECTIVE)


def test_full_recompute_keeps_only_the_layer_input(gpt_fused: OpGraph) -> None:
    layer = block(gpt_fused)
    assert [m.shape for m in layer.input_meta] == [(BATCH, SEQ, HIDDEN)]
    got = estimate_layer_activation_bytes(layer, micro_batch_size=8, graph_batch_size=BATCH,
                                          recompute=Recompute.FULL, dtype="bfloat16")
    assert got == 2 * SEQ * 8 * HIDDEN


def test_full_recompute_with_explicit_attention_keeps_only_the_hidden_state(gpt_unfused: OpGraph) -> None:
    got = estimate_layer_activation_bytes(block(gpt_unfused), micro_batch_size=BATCH, graph_batch_size=BATCH,
                                          recompute=Recompute.FULL, dtype="bfloat16")
    assert got == 2 * SEQ * BATCH * HIDDEN


def test_dtype_scaling_keeps_masks_and_ids_at_their_width() -> None:
    x32 = TensorMeta(shape=(2, 16, 8), dtype="float32")
    mask = TensorMeta(shape=(2, 16, 8), dtype="bool")
    ids = TensorMeta(shape=(2, 16), dtype="int64")
    layer = Layer(index=0, module_path="b", kind="k", ops=(), params=(), input_meta=(x32,), saved=(
        SavedTensor(producer="a", saver="b", meta=x32), SavedTensor(producer="d", saver="d", meta=mask),
        SavedTensor(producer=None, saver="e", meta=ids)))
    got = estimate_layer_activation_bytes(layer, micro_batch_size=6, graph_batch_size=2, recompute=Recompute.NONE,
                                          dtype="bfloat16")
    assert got == 3 * (x32.numel * 2 + mask.numel * 1 + ids.numel * 8)
    sharded = estimate_layer_activation_bytes(layer, micro_batch_size=2, graph_batch_size=2,
                                              recompute=Recompute.NONE, dtype="bfloat16", tp=4,
                                              sharded=lambda s: s.producer == "a")
    assert sharded == x32.numel * 2 // 4 + mask.numel + ids.numel * 8


# ---- pipelines ------------------------------------------------------------------------------

def test_in_flight_micro_batches_per_schedule() -> None:
    assert inflight_micro_batches(Schedule.GPIPE, pp=4, stage=0, num_micro_batches=16) == 16
    assert [inflight_micro_batches(Schedule.ONE_F_ONE_B, pp=4, stage=i, num_micro_batches=16)
            for i in range(4)] == [4, 3, 2, 1]
    assert inflight_micro_batches(Schedule.ONE_F_ONE_B, pp=8, stage=0, num_micro_batches=3) == 3
    for pp, v in ((4, 2), (8, 3), (16, 4)):
        first = inflight_micro_batches(Schedule.INTERLEAVED_1F1B, pp=pp, stage=0, num_micro_batches=64,
                                       virtual_stages=v)
        assert first == pytest.approx(pp * (1 + (pp - 1) / (pp * v)))  # Korthikanti et al. §4.2.3
        last = inflight_micro_batches(Schedule.INTERLEAVED_1F1B, pp=pp, stage=pp - 1, num_micro_batches=64,
                                      virtual_stages=v)
        assert last < first
    with pytest.raises(ValueError, match="stage=4"):
        inflight_micro_batches(Schedule.ONE_F_ONE_B, pp=4, stage=4, num_micro_batches=8)


# ---- buffers and the stage total ------------------------------------------------------------

def test_stage_breakdown() -> None:
    state = estimate_model_state_bytes(10**9, zero_stage=1, dp=8)
    fixed = float(RUNTIME_RESERVED_BYTES)
    mem = estimate_rank_memory(params_bytes=state.params, grads_bytes=state.grads, optimizer_bytes=state.optimizer,
                               activation_bytes=3 * 10**8, fixed_bytes=fixed, capacity_bytes=80 * 2**30)
    assert (mem.params, mem.grads, mem.optimizer) == (state.params, state.grads, state.optimizer)
    assert mem.activations == 3 * 10**8
    tensors = state.total + 3 * 10**8 + fixed  # headroom covers the fixed bytes too
    assert mem.buffers == int(fixed + ALLOCATOR_HEADROOM * tensors)
    assert mem.total == pytest.approx(tensors * (1 + ALLOCATOR_HEADROOM), abs=4)
    assert mem.fits and mem.total < mem.capacity


def test_rank_peak_is_the_largest_of_three_moments() -> None:
    """params + optimizer + max(live grads + activations + working, grads + reduce, grads + optimizer temps)."""
    base = dict(params_bytes=10.0, optimizer_bytes=30.0, fixed_bytes=0.0, capacity_bytes=10**6)

    def tensors(**kw: float) -> float:
        return estimate_rank_memory(**base, **kw).total / (1 + ALLOCATOR_HEADROOM)

    # one micro-batch: no gradient alive at the loss backward, whose working bytes set the peak
    assert tensors(grads_bytes=20, accumulated_grads_bytes=0, activation_bytes=50, working_bytes=30) == \
        pytest.approx(10 + 30 + 50 + 30, abs=1)
    # working bytes smaller than the gradients: the breakdown keeps both terms (an over-estimate, never under)
    assert tensors(grads_bytes=20, accumulated_grads_bytes=0, activation_bytes=50, working_bytes=5) == \
        pytest.approx(10 + 30 + 20 + 50, abs=1)
    # accumulation: FSDP's unsharded gradients (80) outweigh the sharded ones (20) at the activations' peak
    m = estimate_rank_memory(**base, grads_bytes=20, accumulated_grads_bytes=80, activation_bytes=50, working_bytes=30)
    assert m.grads == 80 and m.total / (1 + ALLOCATOR_HEADROOM) == pytest.approx(10 + 30 + 80 + 50 + 30, abs=1)
    # a reduction's buffers or the optimizer's temporaries set the peak when the activations are small
    assert tensors(grads_bytes=20, activation_bytes=1, reduce_bytes=100) == pytest.approx(10 + 30 + 20 + 100, abs=1)
    assert tensors(grads_bytes=20, activation_bytes=1, optimizer_temp_bytes=60) == pytest.approx(10 + 30 + 80, abs=1)


def test_budget_is_the_inverse_of_the_rank_total() -> None:
    """The stage DP's budget (tensor_budget_bytes) is exactly what fills the GPU in estimate_rank_memory."""
    from autopar.cost_models.program_memory import estimate_fixed_bytes

    capacity = 80 * 2**30
    fixed = estimate_fixed_bytes(largest_unit_params=10**8, zero_stage=3, dp=8, dtype="bfloat16")
    budget = tensor_budget_bytes(capacity, fixed_bytes=fixed)
    full = estimate_rank_memory(params_bytes=budget / 2, grads_bytes=0, optimizer_bytes=budget / 4,
                                activation_bytes=budget / 4, fixed_bytes=fixed, capacity_bytes=capacity)
    assert capacity - 4 <= full.total <= capacity
    assert with_headroom(budget + fixed) == pytest.approx(capacity)


def test_foreach_optimizer_temporaries_raise_the_peak_only_past_the_activations() -> None:
    from autopar.cost_models.memory import ALLOCATOR_HEADROOM, estimate_rank_memory
    from autopar.cost_models.optimizer import optimizer_temporary_bytes

    owned = 1_000_000  # parameters this rank updates: one fp32 exp_avg_sq_sqrt of 4 MB during the step
    temp = optimizer_temporary_bytes(owned)
    states = dict(params_bytes=2e6, grads_bytes=2e6, optimizer_bytes=12e6, fixed_bytes=1e6, capacity_bytes=10**9)
    small = estimate_rank_memory(activation_bytes=1e6, optimizer_temp_bytes=temp, **states)
    assert small.total == pytest.approx((1 + ALLOCATOR_HEADROOM) * (16e6 + 1e6 + 4e6), abs=2)  # temp > acts
    large = estimate_rank_memory(activation_bytes=8e6, optimizer_temp_bytes=temp, **states)
    fused = estimate_rank_memory(activation_bytes=8e6, **states)
    assert large == fused  # the step's temporary fits in the freed activations


def test_a_training_dtype_capture_stores_the_models_fp32_upcasts_at_4_bytes() -> None:
    from autopar.graph.ir import Layer, ParamInfo, SavedTensor, TensorMeta

    def layer(capture: str) -> Layer:
        x, up = TensorMeta(shape=(1, 128, 64), dtype=capture), TensorMeta(shape=(1, 128, 64), dtype="float32")
        saved = (SavedTensor(producer="to_fp32", saver="pow", meta=up), SavedTensor(producer="mm", saver="mul", meta=x))
        return Layer(index=1, module_path="b.0", kind=f"k-{capture}", ops=(), params=(
            ParamInfo(name="w", shape=(64,), dtype=capture),), input_meta=(x,), saved=saved)

    n = 128 * 64
    got = {c: estimate_layer_activation_bytes(layer(c), micro_batch_size=1, graph_batch_size=1,
                                              recompute=Recompute.NONE, dtype="bfloat16")
           for c in ("bfloat16", "float32")}
    assert got == {"bfloat16": n * 4 + n * 2, "float32": n * 2 + n * 2}  # an fp32 capture cannot see the upcast


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_sp_split_of_the_emitted_block_follows_its_placements(gpt_unfused: OpGraph, tp: int) -> None:
    """Under SP the emitted block runs its norms, residual stream and the dropouts after each reduce-scatter on
    sequence shards, and each weight-holding child as the placements say, from its input gathered whole: with
    Megatron's placements that is Korthikanti's 34·sbh/t plus the two gathered inputs (LN outputs, 2·sbh bytes
    each) held whole, which Megatron keeps as shards and gathers again in backward; with every op kept
    replicated (an outcome of the sharding ILP when collectives are dear) the children's tensors are whole."""
    from autopar.cost_models.memory import sequence_parallel_split

    layer = block(gpt_unfused)
    region = megatron_region_ops(layer)

    def kept(placed: object, reducing: frozenset[str] = frozenset()) -> int:
        return estimate_layer_activation_bytes(
            layer, micro_batch_size=4, graph_batch_size=gpt_unfused.batch_size, recompute=Recompute.SELECTIVE,
            dtype="bfloat16", tp=tp, sequence_parallel=True, placed=True,
            sharded=sequence_parallel_split(layer, placed, reducing))  # type: ignore[arg-type]

    s, b, h = SEQ, 4, HIDDEN
    megatron = kept(lambda saved: saved.producer in region, frozenset({"attn.c_proj", "mlp.c_proj"}))
    gathered = 2 * (2 * s * b * h) * (1 - 1 / tp)
    assert megatron == pytest.approx(korthikanti_bytes(s=s, b=b, h=h, a=HEADS, t=tp, sp=True,
                                                       recompute=Recompute.SELECTIVE) + gathered, rel=0.01)
    replicated = kept(lambda saved: False)
    whole = korthikanti_bytes(s=s, b=b, h=h, a=HEADS, t=1, sp=False, recompute=Recompute.SELECTIVE)
    assert megatron < replicated < whole  # the norms' and residual's tensors stay sequence shards
