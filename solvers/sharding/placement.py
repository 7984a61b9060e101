"""Placements of a tensor over one tensor-parallel mesh axis, and what it costs to change them.

A placement says how the t ranks of a TP group hold a tensor (the names follow
``torch.distributed.tensor``):

* ``R``    replicated: every rank holds all of it;
* ``S(d)`` sharded: rank r holds the r-th of t equal slices along tensor dim d;
* ``P``    partial sum: every rank holds a full-size tensor and the value is their sum.

``S(d,sf=k)`` is a *strided* shard (DTensor's ``_StridedShard``): dim d is a merge
of an outer factor of size k and an inner part, and each of the k outer blocks is
sharded separately. It appears when a reshape merges a sharded dim into a
larger one that is not its outermost, e.g. (B, H) → B·H with H sharded, and lets
the inverse reshape recover S(H) exactly.

Changing placement costs one collective. Its size is given as NCCL counts it
(``nccl_size``): the whole tensor for all-reduce, all-gather (the gathered output)
and reduce-scatter (the input), and one rank's buffer (the whole / t) for
all-to-all; the caller's ``collective_time`` applies its own ring factors:

=======  ========  ==================
from     to        collective
=======  ========  ==================
P        R         all_reduce
P        S(d)      reduce_scatter
S(d)     R         all_gather
S(d)     S(d')     all_to_all
R        S / P     none (local slice / scale by 1/t)
S(d)     P         none (zero-pad the local slice)
=======  ========  ==================
"""

from __future__ import annotations

import re
from typing import NamedTuple

from autopar._compat import StrEnum
from autopar.layout import Collective


class PlacementKind(StrEnum):
    """How a tensor lies on the TP axis."""

    REPLICATE = "R"
    SHARD = "S"
    PARTIAL = "P"


class Placement(NamedTuple):
    """One tensor's placement; ``str()`` gives ``R``, ``P``, ``S(1)`` or ``S(0,sf=4)`` and ``from_str`` reads it back.

    Example:
        >>> Placement.from_str("S(2)")
        Placement(kind=<PlacementKind.SHARD: 'S'>, dim=2, sf=1)
        >>> str(Placement.from_str("S(0,sf=4)")), str(REPLICATE)
        ('S(0,sf=4)', 'R')
    """

    kind: PlacementKind
    """R, S or P."""
    dim: int = -1
    """Sharded tensor dim (non-negative) for S; -1 otherwise."""
    sf: int = 1
    """Split factor of a strided shard (1 for a plain shard)."""

    def __str__(self) -> str:
        if self.kind is not PlacementKind.SHARD:
            return self.kind.value
        return f"S({self.dim})" if self.sf == 1 else f"S({self.dim},sf={self.sf})"

    @property
    def is_shard(self) -> bool:
        """True for S(d)."""
        return self.kind is PlacementKind.SHARD

    @property
    def is_partial(self) -> bool:
        """True for P."""
        return self.kind is PlacementKind.PARTIAL

    @property
    def is_replicate(self) -> bool:
        """True for R."""
        return self.kind is PlacementKind.REPLICATE

    @classmethod
    def from_str(cls, text: str) -> Placement:
        """Parse ``R``, ``P``, ``S(d)`` or ``S(d,sf=k)``."""
        text = text.strip()
        if text in ("R", "P"):
            return cls(PlacementKind(text))
        match = re.fullmatch(r"S\((\d+)(?:,sf=(\d+))?\)", text)
        if match is None:
            raise ValueError(f"not a placement: {text!r} (expected R, P, S(d) or S(d,sf=k))")
        return shard(int(match.group(1)), int(match.group(2) or 1))


REPLICATE = Placement(PlacementKind.REPLICATE)
"""R."""
PARTIAL = Placement(PlacementKind.PARTIAL)
"""P (partial sum)."""


def shard(dim: int, sf: int = 1) -> Placement:
    """S(dim), or the strided S(dim,sf=sf).

    Example:
        >>> str(shard(1))
        'S(1)'
    """
    if dim < 0 or sf < 1:
        raise ValueError(f"shard dim must be >= 0 and sf >= 1, got dim={dim}, sf={sf}")
    return Placement(PlacementKind.SHARD, dim, sf)


def reshard_collective(src: Placement, dst: Placement) -> Collective | None:
    """The collective that turns ``src`` into ``dst`` on one mesh axis (None when it is local).

    Example:
        >>> reshard_collective(PARTIAL, REPLICATE)
        <Collective.ALL_REDUCE: 'all_reduce'>
        >>> reshard_collective(REPLICATE, shard(0)) is None
        True
    """
    if src == dst or src.is_replicate:
        return None
    if src.is_partial:
        return Collective.ALL_REDUCE if dst.is_replicate else Collective.REDUCE_SCATTER
    # src is a shard
    if dst.is_replicate:
        return Collective.ALL_GATHER
    if dst.is_shard:
        return Collective.ALL_TO_ALL
    return None  # S -> P: each rank zero-pads its slice


def nccl_size(kind: Collective, tensor_nbytes: int, tp: int) -> int:
    """Size NCCL (and ``cost_models.comm``) counts for a collective on a tensor of ``tensor_nbytes`` in total.

    Example:
        >>> nccl_size(Collective.ALL_GATHER, 1024, 4), nccl_size(Collective.ALL_TO_ALL, 1024, 4)
        (1024, 256)
    """
    return tensor_nbytes // tp if kind is Collective.ALL_TO_ALL else tensor_nbytes


def grad_placement(out: Placement) -> Placement:
    """Placement the gradient of a tensor must have for the backward of the op that produced it.

    A partial output was computed as the sum of per-rank pieces, so each rank
    needs the whole gradient (R); R and S gradients follow their tensor.

    Example:
        >>> str(grad_placement(PARTIAL)), str(grad_placement(shard(1)))
        ('R', 'S(1)')
    """
    return REPLICATE if out.is_partial else out


def input_grad_placement(inp: Placement, outputs: tuple[Placement, ...]) -> Placement:
    """Placement of the gradient an op's backward produces for one input.

    * P input: the op used a 1/t share on each rank, so each rank's gradient is the full one (R);
    * R input to an op whose output is split over ranks (S or P): each rank's
      gradient covers only its part of the work, so the gradients are partial
      sums (P) — Megatron's ``f`` operator all-reduces exactly this;
    * otherwise the gradient has the input's placement.

    Example:
        >>> str(input_grad_placement(REPLICATE, (shard(1),)))
        'P'
    """
    if inp.is_partial:
        return REPLICATE
    if inp.is_replicate and any(not o.is_replicate for o in outputs):
        return PARTIAL
    return inp


__all__ = [
    "PARTIAL",
    "Placement",
    "PlacementKind",
    "REPLICATE",
    "grad_placement",
    "input_grad_placement",
    "nccl_size",
    "reshard_collective",
    "shard",
]
