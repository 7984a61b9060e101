"""Dropout under tensor parallelism on CPU: one mask stream per shard, the same stream for replicas.

DTensor gives a random op on a sharded tensor an independent mask per shard only on
CUDA (``OffsetBasedRNGTracker`` moves the Philox offset to each shard's place in the
whole tensor). A CPU generator has no offset, so without a tracker every rank runs
the op on its own shard from the same generator state: the two halves of a
head-sharded attention-probability tensor would get the same mask.

``ShardSeedTracker`` is the CPU equivalent DTensor calls around each random op
(its ``_distribute_region`` hook): the op draws one number from the step's
generator (the same draw on every rank, so the generators stay in step), and runs
on a generator seeded from that draw and the index of this rank's shard. Replicas
(index 0 on every rank of a replicated tensor) get identical masks; shards get
independent ones; a seed replays them. The masks are not the slices of the mask a
single process would draw for the whole tensor (CUDA's offsets are; CPU has none).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.distributed.tensor._random import _RNGStateTracker

SEED_BOUND = 2**62
"""Draws are in [0, SEED_BOUND): within ``torch.manual_seed``'s 64-bit range."""


def shard_index(spec: Any) -> int:
    """This rank's shard of a DTensor spec as one number (mixed radix over the mesh dims that split it; 0 when
    it is replicated), so ranks that hold the same data share an index and ranks holding different data do not."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    coordinate = spec.mesh.get_coordinate()
    if coordinate is None:
        return 0
    index = 0
    for dim, placement in enumerate(spec.placements):
        if isinstance(placement, (Shard, _StridedShard)):
            index = index * spec.mesh.size(dim) + coordinate[dim]
    return index


class ShardSeedTracker(_RNGStateTracker):
    """DTensor's RNG tracker interface for CPU meshes (see the module docstring)."""

    def __init__(self) -> None:  # the base class insists on an accelerator; nothing else is needed here
        self._device = torch.device("cpu")
        self._use_distribute_region = True

    @contextlib.contextmanager
    def _distribute_region(self, spec: Any, generator: torch.Generator | None = None) -> Iterator[None]:
        draw = int(torch.randint(0, SEED_BOUND, (1,), generator=generator or torch.default_generator))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hash((draw, shard_index(spec))) % SEED_BOUND)
            yield


@contextlib.contextmanager
def shard_seeded_dropout(device: torch.device) -> Iterator[None]:
    """Within the block, DTensor random ops on a CPU mesh use ``ShardSeedTracker`` (CUDA keeps DTensor's own)."""
    import torch.distributed.tensor._random as dtensor_random

    if device.type != "cpu":
        yield
        return
    previous = dtensor_random._rng_tracker
    dtensor_random._rng_tracker = ShardSeedTracker()
    try:
        yield
    finally:
        dtensor_random._rng_tracker = previous
