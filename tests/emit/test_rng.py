"""The CPU dropout tracker on rank 1 of a two-rank fake process group (no data moves; masks are local).

A replicated tensor's mask must be the one every rank draws (stream of shard 0), a
sharded tensor's the stream of this rank's shard, and each random op must advance
the step generator by exactly one draw on every rank, so later replicas still agree.
The 2-rank GPT-2 test (``test_dropout_and_tied.py``) checks the masks across real ranks.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from autopar.emit.rng import SEED_BOUND, shard_index, shard_seeded_dropout


@pytest.fixture(scope="module")
def mesh() -> Iterator[object]:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("fake", rank=1, world_size=2, store=FakeStore())
    try:
        yield init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    finally:
        dist.destroy_process_group()


def _expected_mask(seed: int, shard: int, shape: tuple[int, ...]) -> torch.Tensor:
    """What the tracker must draw: one number from the step's stream, then the shard's own stream."""
    g = torch.Generator().manual_seed(seed)
    draw = int(torch.randint(0, SEED_BOUND, (1,), generator=g))
    torch.manual_seed(hash((draw, shard)) % SEED_BOUND)
    return torch.nn.functional.dropout(torch.ones(shape), p=0.5) == 0


@pytest.mark.parametrize("sharded", [False, True])
def test_a_random_op_draws_from_its_shards_stream_and_advances_the_step_by_one_draw(mesh: object,
                                                                                   sharded: bool) -> None:
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    placement = Shard(0) if sharded else Replicate()
    x = distribute_tensor(torch.ones(8, 6), mesh, [placement], src_data_rank=None)
    assert shard_index(x._spec) == (1 if sharded else 0)
    with torch.random.fork_rng(devices=[]):
        expected = _expected_mask(7, shard_index(x._spec), tuple(x.to_local().shape))
        torch.manual_seed(7)
        with shard_seeded_dropout(torch.device("cpu")):
            got = torch.nn.functional.dropout(x, p=0.5).to_local() == 0
        after = torch.get_rng_state()
        torch.manual_seed(7)
        torch.randint(0, SEED_BOUND, (1,))
        assert torch.equal(after, torch.get_rng_state())  # one draw, the same on every rank
    assert torch.equal(got, expected)


def test_the_tracker_is_removed_after_the_step(mesh: object) -> None:
    import torch.distributed.tensor._random as dtensor_random

    before = dtensor_random._rng_tracker
    with shard_seeded_dropout(torch.device("cpu")):
        assert dtensor_random._rng_tracker is not None
    assert dtensor_random._rng_tracker is before
