"""DTensor rules for routed experts and fused projections, checked on one rank's local shards.

Rank 0 of a two-rank fake process group (no data moves, so only rules that compute
locally can be checked here; the 4-rank matrix checks the numbers end to end):
the grouped GEMM column-split on a strided gate/up weight computes rank 0's slice of
each half, ``chunk``/``split`` at the seams hands on plain shards of the gate and up
halves, and the row-split down projection gives rank 0's partial sum.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

E, S, H, INTER, TP = 2, 6, 4, 6, 2
"""Experts, routed rows, hidden size, intermediate size per half, ranks."""


@pytest.fixture(scope="module")
def mesh() -> Iterator[object]:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    import transformers.integrations.moe  # noqa: F401  (registers transformers::grouped_mm_fallback)

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("fake", rank=0, world_size=TP, store=FakeStore())
    try:
        yield init_device_mesh("cpu", (TP,), mesh_dim_names=("tp",))
    finally:
        dist.destroy_process_group()


def close(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to float summation order (a slice of a weight may take another matmul kernel)."""
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def _register() -> None:
    from autopar.emit import dtensor_rules

    dtensor_rules._register_grouped_mm()


def test_experts_run_split_at_the_seams_of_their_fused_weight(mesh: object) -> None:
    from torch.distributed.tensor import Partial, Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.placement_types import _StridedShard

    from autopar.emit.dtensor_rules import chunk_at_seams, split_at_seams

    _register()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(S, H, generator=g)
    gate_up = torch.randn(E, H, 2 * INTER, generator=g)  # (E, K, N), the layout grouped_mm reads
    down = torch.randn(E, INTER, H, generator=g)
    offs = torch.tensor([2, S], dtype=torch.int32)
    grouped = torch.ops.transformers.grouped_mm_fallback

    full = grouped(x, gate_up, offs)
    full_gate, full_up = full.chunk(2, dim=-1)
    mine = slice(0, INTER // TP)  # rank 0's share of each half

    dx, doffs = (distribute_tensor(t, mesh, [Replicate()]) for t in (x, offs))
    dw = distribute_tensor(gate_up, mesh, [_StridedShard(2, split_factor=2)], src_data_rank=None)
    out = grouped(dx, dw, doffs)
    assert out.placements == (_StridedShard(1, split_factor=2),)
    close(out.to_local(), torch.cat([full_gate[:, mine], full_up[:, mine]], dim=1))

    for pieces in (chunk_at_seams(out, 2, -1), split_at_seams(out, INTER, 1), split_at_seams(out, [INTER] * 2, 1)):
        gate, up = pieces
        assert gate.placements == up.placements == (Shard(1),) and gate.shape == (S, INTER)
        close(gate.to_local(), full_gate[:, mine])
        close(up.to_local(), full_up[:, mine])

    hidden = torch.nn.functional.silu(gate) * up
    dd = distribute_tensor(down, mesh, [Shard(1)], src_data_rank=None)
    y = grouped(hidden, dd, doffs)
    assert y.placements == (Partial(),)
    expected = grouped(torch.nn.functional.silu(full_gate[:, mine]) * full_up[:, mine], down[:, mine], offs)
    close(y.to_local(), expected)


def test_a_split_off_the_seams_runs_as_dtensor_does(mesh: object) -> None:
    """Three pieces of a weight strided over two parts are not its parts: the ATen op runs (DTensor gathers)."""
    from torch.distributed.tensor import distribute_tensor
    from torch.distributed.tensor.placement_types import _StridedShard

    from autopar.emit.dtensor_rules import _strided_pieces

    t = distribute_tensor(torch.randn(4, 12), mesh, [_StridedShard(1, split_factor=2)], src_data_rank=None)
    assert _strided_pieces(t, 4, 1) is None
    assert _strided_pieces(t.to_local(), 3, 1) is None  # a plain tensor


def test_fsdp_splits_a_dim_that_a_strided_tp_split_leaves_whole(mesh: object) -> None:
    """Phi-3's gate/up weight is strided over TP on dim 0: FSDP takes dim 1 (torch cannot reassemble both on
    dim 0); the experts' (E, 2I, H) weight is strided on dim 1, so FSDP keeps its default (dim 0)."""
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.distributed.tensor.placement_types import _StridedShard

    from autopar.emit.dp import beside_strided_tp

    def param(shape: tuple[int, ...], placement: object) -> torch.nn.Parameter:
        return torch.nn.Parameter(distribute_tensor(torch.zeros(shape), mesh, [placement], src_data_rank=None))

    assert beside_strided_tp(param((8, 4), _StridedShard(0, split_factor=2))) == Shard(1)
    assert beside_strided_tp(param((2, 8, 4), _StridedShard(1, split_factor=2))) is None
    assert beside_strided_tp(param((8, 4), Shard(0))) is None
    assert beside_strided_tp(torch.nn.Parameter(torch.zeros(8, 4))) is None


def test_checkpoints_hold_strided_tensors_replicated_and_give_them_back_strided(mesh: object) -> None:
    """DCP stores one box per rank; a strided shard is several, so it is saved replicated over its axis."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.placement_types import _StridedShard

    from autopar.emit.checkpoint import restrided, unstrided

    strided = distribute_tensor(torch.zeros(8, 4), mesh, [_StridedShard(0, split_factor=2)], src_data_rank=None)
    plain = distribute_tensor(torch.zeros(8, 4), mesh, [Shard(0)], src_data_rank=None)
    state = {"model": {"fused": strided, "plain": plain}, "optim": {"fused.momentum": strided, "step": 3}}
    saved = unstrided(state)
    assert saved["model"]["fused"].placements == (Replicate(),) == saved["optim"]["fused.momentum"].placements
    assert saved["model"]["plain"] is plain and saved["optim"]["step"] == 3
    back = restrided(saved, state)
    assert back["model"]["fused"].placements == strided.placements and back["model"]["plain"] is plain
