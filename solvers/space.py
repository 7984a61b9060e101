"""The search space: which layouts the planner considers, and user pins that narrow it.

Pins (``autopar.layout.Pins``) use the same names as ``Layout``'s fields; they check
themselves against each other when built. Contradictions between pins and the cluster
or the model raise ``PlanValidationError`` here, naming the values.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from autopar.errors import PlanValidationError
from autopar.layout import PIN_NAMES, Pins, Recompute, Schedule


MAX_VIRTUAL_STAGES = 4
"""Largest interleaving degree searched: Narayanan et al. (2021) report diminishing returns past 4
chunks per rank as point-to-point traffic grows with v."""

MICRO_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
"""Micro-batch sizes searched (powers of two, as practitioners use; others can be pinned)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelShape:
    """What the space needs to know about the model."""

    num_layers: int
    """Layers in the graph (embedding, blocks, head)."""
    num_heads: int | None
    """Attention heads (tp must divide them), if the model has attention."""
    num_kv_heads: int | None = None
    """Key/value heads of grouped-query attention (tp must divide them too, unless there is one: multi-query
    attention's projection is kept whole or split along the head dim by the sharding ILP, and both emit)."""
    tp_dims: tuple[int, ...] = ()
    """Other dimensions TP shards (hidden, FFN, vocab) that tp must divide."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SearchSpace:
    """Candidate values per knob, after pins and the cluster have narrowed them."""

    num_gpus: int
    """GPUs available."""
    gpus_per_node: int
    """GPUs per node (TP groups stay inside one unless ``allow_cross_node_tp``)."""
    global_batch_size: int
    """Samples per optimizer step."""
    tp: tuple[int, ...]
    """Tensor-parallel sizes."""
    pp: tuple[int, ...]
    """Pipeline-parallel sizes."""
    dp: tuple[int, ...] | None
    """Pinned data-parallel sizes (None: derived from the GPUs left)."""
    micro_batch_size: tuple[int, ...]
    """Micro-batch sizes."""
    zero_stage: tuple[int, ...]
    """ZeRO stages."""
    recompute: tuple[Recompute, ...]
    """Recompute policies."""
    sequence_parallel: tuple[bool, ...]
    """Sequence parallelism on/off (only with tp > 1)."""
    schedule: tuple[Schedule, ...]
    """Pipeline schedules."""
    virtual_stages: tuple[int, ...]
    """Interleaving degrees (for interleaved 1F1B)."""
    pinned: Pins = field(default_factory=Pins)
    """The user's pins."""

    def dp_sizes(self, tp: int, pp: int) -> Iterator[int]:
        """Data-parallel sizes to try with (tp, pp): the largest that fits and divides the batch, and halves.

        Using fewer GPUs than available is allowed; it can win only when the batch does not
        divide over more replicas, so the largest feasible size and a few smaller ones suffice.
        """
        exact = self.pinned.num_gpus
        if exact is not None:
            d, rest = divmod(exact, tp * pp)
            if not rest and self.global_batch_size % d == 0 and (self.dp is None or d in self.dp):
                yield d
            return
        if self.dp is not None:
            yield from (d for d in self.dp if d * tp * pp <= self.num_gpus)
            return
        limit = self.num_gpus // (tp * pp)
        sizes = [d for d in range(limit, 0, -1) if self.global_batch_size % d == 0]
        if sizes:
            best = sizes[0]
            yield best
            yield from (d for d in sizes[1:] if d * 2 == best or d * 4 == best)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _tp_candidates(shape: ModelShape, num_gpus: int, gpus_per_node: int, allow_cross_node_tp: bool) -> list[int]:
    limit = num_gpus if allow_cross_node_tp else min(num_gpus, gpus_per_node)
    dims = [d for _, d in _divided_by_tp(shape)] + [d for d in shape.tp_dims if d]
    return [t for t in range(1, limit + 1) if (t & (t - 1)) == 0 and all(d % t == 0 for d in dims)]


def _divided_by_tp(shape: ModelShape) -> list[tuple[str, int]]:
    """The head counts tp must divide, named: the attention heads, and the key/value heads of grouped-query
    attention (a single one, multi-query attention, is kept whole or split along the head dim)."""
    heads = [("attention heads", shape.num_heads)]
    if shape.num_kv_heads and shape.num_kv_heads > 1:
        heads.append(("key/value heads", shape.num_kv_heads))
    return [(label, d) for label, d in heads if d]


def build_space(shape: ModelShape, *, num_gpus: int, gpus_per_node: int, global_batch_size: int,
                constraints: Pins | Mapping[str, Any] | None = None, allow_cross_node_tp: bool = False,
                zero_stages: tuple[int, ...] = (0, 1, 2, 3),
                schedules: tuple[Schedule, ...] = tuple(Schedule)) -> SearchSpace:
    """The space to search, narrowed by pins; raises ``PlanValidationError`` on contradictions.

    ``zero_stages`` and ``schedules``: what the priced program runs (``cost_models/runtimes.py``); a pin
    outside them is the caller's to refuse (``api.PlanOptions`` says what to do)."""
    pins = Pins.from_mapping(constraints)
    if global_batch_size < 1:
        raise PlanValidationError(f"global batch size must be positive, got {global_batch_size}")
    _check_pins_against_model(pins, shape, num_gpus, gpus_per_node, allow_cross_node_tp, global_batch_size)
    def one_or(pinned: Any, choices: tuple[Any, ...]) -> tuple[Any, ...]:
        return choices if pinned is None else (pinned,)

    v_max = min(MAX_VIRTUAL_STAGES, shape.num_layers)
    return SearchSpace(
        num_gpus=num_gpus, gpus_per_node=gpus_per_node, global_batch_size=global_batch_size,
        tp=one_or(pins.tp, tuple(_tp_candidates(shape, num_gpus, gpus_per_node, allow_cross_node_tp))),
        pp=one_or(pins.pp, tuple(range(1, min(shape.num_layers, num_gpus) + 1))),
        dp=one_or(pins.dp, ()) or None,
        micro_batch_size=one_or(pins.micro_batch_size, tuple(m for m in MICRO_BATCH_SIZES if m <= global_batch_size)),
        zero_stage=one_or(pins.zero_stage, zero_stages), recompute=one_or(pins.recompute, tuple(Recompute)),
        sequence_parallel=one_or(pins.sequence_parallel, (False, True)), schedule=one_or(pins.schedule, schedules),
        virtual_stages=one_or(pins.virtual_stages, tuple(range(1, v_max + 1))), pinned=pins,
    )


def _check_pins_against_model(pins: Pins, shape: ModelShape, num_gpus: int, gpus_per_node: int,
                              allow_cross_node_tp: bool, global_batch_size: int) -> None:
    tp, pp, dp = pins.tp, pins.pp, pins.dp
    if tp is not None:
        for label, dim in _divided_by_tp(shape):
            if dim % tp:
                raise PlanValidationError(f"tp={tp} does not divide the model's {dim} {label}")
        if tp > gpus_per_node and not allow_cross_node_tp:
            raise PlanValidationError(
                f"tp={tp} is larger than a node ({gpus_per_node} GPUs) and cross-node TP is not allowed")
    if pp is not None and pp > shape.num_layers:
        raise PlanValidationError(f"pp={pp} is larger than the model's {shape.num_layers} layers")
    used = (tp or 1) * (pp or 1) * (dp or 1)
    exact = pins.num_gpus
    if exact is not None and exact > num_gpus:
        raise PlanValidationError(f"num_gpus={exact} is more than the cluster's {num_gpus} GPUs")
    if used > num_gpus:
        raise PlanValidationError(f"dp·tp·pp = {dp or 1}·{tp or 1}·{pp or 1} = {used} is larger than the cluster's "
                                  f"{num_gpus} GPUs")
    mbs = pins.micro_batch_size
    if dp is not None and global_batch_size % (dp * (mbs or 1)):
        raise PlanValidationError(
            f"global batch {global_batch_size} is not divisible by dp × micro-batch = {dp} × {mbs or 1}")
    if mbs is not None and global_batch_size % mbs:
        raise PlanValidationError(f"global batch {global_batch_size} is not divisible by micro-batch {mbs}")
    v = pins.virtual_stages
    if v is not None and pp is not None and v * pp > shape.num_layers:
        raise PlanValidationError(f"pp·virtual_stages = {pp}·{v} is more than the model's {shape.num_layers} layers")
