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
