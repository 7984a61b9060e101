"""The planner's shared vocabulary: a leaf module that every stage of the flow may import.

``Layout`` (the knobs a person would set by hand), ``Recompute``, ``Schedule``, the TP
styles, the ``Collective`` kinds, and the two breakdowns a priced layout carries
(``MemoryBreakdown`` per pipeline rank, ``CommBreakdown`` per step). It imports nothing
of autopar but its errors, so capture, the cost models, the solvers, ``plan.py``, emit,
export and report can all use it without importing each other backwards.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from autopar._compat import StrEnum
from autopar.errors import PlanValidationError, UserInputError

class Recompute(StrEnum):
    """Activation recomputation policy (Korthikanti et al. 2022)."""

    NONE = "none"
    SELECTIVE = "selective"  # recompute the s×s attention core only
    FULL = "full"  # keep only each layer's input; recompute the whole layer in backward


class Schedule(StrEnum):
    """Pipeline schedule."""

    GPIPE = "gpipe"
    ONE_F_ONE_B = "1f1b"
    INTERLEAVED_1F1B = "interleaved-1f1b"


class TPStyle(StrEnum):
    """How one parameterised module is split over the tensor-parallel axis.

    Names follow ``torch.distributed.tensor.parallel``: ``colwise`` shards a
    Linear's output features (weight dim 0) or an Embedding's embedding dim;
    ``rowwise`` shards a Linear's input features (weight dim 1) or an
    Embedding's vocabulary (weight dim 0); ``replicate`` keeps it whole.
    """

    REPLICATE = "replicate"
    COLWISE = "colwise"
    ROWWISE = "rowwise"


class Collective(StrEnum):
    """Collective operations the planner issues (NCCL's names; ``p2p`` is a send/recv pair)."""

    ALL_REDUCE = "all_reduce"
    ALL_GATHER = "all_gather"
    REDUCE_SCATTER = "reduce_scatter"
    ALL_TO_ALL = "all_to_all"
    BROADCAST = "broadcast"
    SEND_RECV = "p2p"


class Runtime(StrEnum):
    """The training program a plan is priced for (``cost_models/program_memory.py`` selects its terms):
    ``autopar``, what ``autopar run`` emits (FSDP2 + torch pipelining); ``megatron``, Megatron-LM's (DDP grad
    buffer, distributed optimizer, its p2p schedules), what ``autopar export --to megatron`` writes for."""

    AUTOPAR = "autopar"
    MEGATRON = "megatron"


@dataclass(frozen=True, slots=True, kw_only=True)
class Layout:
    """The parallel layout: the knobs a person would set by hand."""

    dp: int
    """Data-parallel size."""
    tp: int
    """Tensor-parallel size."""
    pp: int
    """Pipeline-parallel size (number of pipeline ranks)."""
    micro_batch_size: int
    """Samples per micro-batch per data-parallel rank."""
    num_micro_batches: int
    """Micro-batches per step per data-parallel rank (gradient accumulation steps when pp = 1)."""
    zero_stage: int
    """0 (replicated), 1 (optimizer sharded), 2 (+ gradients), 3 (+ parameters, FSDP) over dp."""
    recompute: Recompute
    """Activation recomputation (the policy of the most-recomputed stage; per-stage in ``StagePlan``)."""
    sequence_parallel: bool
    """Megatron sequence parallelism for norms/dropout inside TP groups."""
    schedule: Schedule
    """Pipeline schedule (``1f1b`` when pp = 1, by convention)."""
    virtual_stages: int = 1
    """Model chunks per pipeline rank (> 1 only for interleaved 1F1B)."""

    def __post_init__(self) -> None:
        for name in ("dp", "tp", "pp", "micro_batch_size", "num_micro_batches", "virtual_stages"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise PlanValidationError(f"layout.{name} must be a positive integer, got {value!r}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise PlanValidationError(f"layout.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage!r}")
        if not isinstance(self.recompute, Recompute):
            raise PlanValidationError(f"layout.recompute must be a Recompute, got {self.recompute!r}")
        if not isinstance(self.schedule, Schedule):
            raise PlanValidationError(f"layout.schedule must be a Schedule, got {self.schedule!r}")
        if self.sequence_parallel and self.tp == 1:
            raise PlanValidationError("layout.sequence_parallel needs tp > 1 (it shards within the TP group)")
        if self.virtual_stages > 1 and self.schedule is not Schedule.INTERLEAVED_1F1B:
            raise PlanValidationError(
                f"layout.virtual_stages={self.virtual_stages} needs schedule 'interleaved-1f1b', "
                f"got {self.schedule.value!r}"
            )
        if self.schedule is Schedule.INTERLEAVED_1F1B and self.pp == 1:
            raise PlanValidationError("schedule 'interleaved-1f1b' needs pp > 1")

    @property
    def num_gpus(self) -> int:
        """GPUs the layout occupies: dp · tp · pp."""
        return self.dp * self.tp * self.pp

    @property
    def global_batch_size(self) -> int:
        """Samples per optimizer step: dp · micro_batch_size · num_micro_batches."""
        return self.dp * self.micro_batch_size * self.num_micro_batches

    def describe(self) -> str:
        """Compact one-line form, e.g. ``dp8 tp8 pp4 mb1x32 zero1 rc=selective sp 1f1b``."""
        parts = [f"dp{self.dp}", f"tp{self.tp}", f"pp{self.pp}"]
        parts.append(f"mb{self.micro_batch_size}x{self.num_micro_batches}")
        parts.append(f"zero{self.zero_stage}")
        parts.append(f"rc={self.recompute.value}")
        if self.sequence_parallel:
            parts.append("sp")
        if self.pp > 1:
            parts.append(self.schedule.value + (f"/v{self.virtual_stages}" if self.virtual_stages > 1 else ""))
        return " ".join(parts)


@dataclass(frozen=True, slots=True, kw_only=True)
class MemoryBreakdown:
    """Peak bytes per GPU on one pipeline stage."""

    params: int
    """Model weights resident during the step."""
    grads: int
    """Gradients."""
    optimizer: int
    """Optimizer states (fp32 master weights and Adam moments under mixed precision)."""
    activations: int
    """Activations saved for backward, all in-flight micro-batches."""
    buffers: int
    """Temporary communication/working buffers and allocator headroom."""
    capacity: int
    """The GPU's memory."""

    def __post_init__(self) -> None:
        for name in ("params", "grads", "optimizer", "activations", "buffers", "capacity"):
            if getattr(self, name) < 0:
                raise PlanValidationError(f"memory.{name} must be >= 0, got {getattr(self, name)}")

    @property
    def total(self) -> int:
        """Sum of all terms."""
        return self.params + self.grads + self.optimizer + self.activations + self.buffers

    @property
    def fits(self) -> bool:
        """Whether the total is within capacity."""
        return self.total <= self.capacity

    def dominant_term(self) -> str:
        """Name of the largest term."""
        terms = {n: getattr(self, n) for n in ("params", "grads", "optimizer", "activations", "buffers")}
        return max(terms, key=lambda n: terms[n])


@dataclass(frozen=True, slots=True, kw_only=True)
class CommBreakdown:
    """Communication time of one optimizer step, kept apart by the axis it runs on.

    TP collectives and pipeline sends sit inside the pipeline's compute time (they are on
    the critical path of every micro-batch); the data-parallel terms are what is left
    exposed after overlap with compute, on the pipeline rank whose reduction is slowest.
    """

    tp_s: float = 0.0
    """Tensor-parallel collectives (forward and backward of every micro-batch) on one pipeline rank."""
    dp_all_reduce_s: float = 0.0
    """Exposed gradient all-reduce over the dp group (ZeRO 0)."""
    dp_reduce_scatter_s: float = 0.0
    """Exposed gradient reduce-scatter over the dp group (ZeRO 1-3)."""
    dp_all_gather_s: float = 0.0
    """Exposed parameter all-gathers over the dp group (ZeRO 1/2: updated shards; ZeRO 3: every micro-batch)."""
    pp_p2p_s: float = 0.0
    """Pipeline point-to-point sends of stage-boundary activations and gradients on the busiest rank."""

    def __post_init__(self) -> None:
        for name in ("tp_s", "dp_all_reduce_s", "dp_reduce_scatter_s", "dp_all_gather_s", "pp_p2p_s"):
            value = getattr(self, name)
            if not value >= 0.0:
                raise PlanValidationError(f"communication.{name} must be >= 0 seconds, got {value!r}")

    @property
    def dp_s(self) -> float:
        """Exposed data-parallel communication: the sum of the three ZeRO collectives."""
        return self.dp_all_reduce_s + self.dp_reduce_scatter_s + self.dp_all_gather_s

    @property
    def total_s(self) -> float:
        """All communication terms together."""
        return self.tp_s + self.dp_s + self.pp_p2p_s

    def terms(self) -> dict[str, float]:
        """Readable label → seconds for the non-zero terms, largest first (for tables)."""
        named = {"TP collectives": self.tp_s, "DP all-reduce": self.dp_all_reduce_s,
                 "DP reduce-scatter": self.dp_reduce_scatter_s, "DP all-gather": self.dp_all_gather_s,
                 "PP send/recv": self.pp_p2p_s}
        return dict(sorted(((k, v) for k, v in named.items() if v > 0.0), key=lambda kv: -kv[1]))


@dataclass(frozen=True, slots=True, kw_only=True)
class Pins:
    """Layout knobs the user fixed (``None``: the planner chooses), parsed and checked once.

    The names are ``Layout``'s fields, plus ``num_gpus`` (dp·tp·pp exactly, e.g. a torchrun job's
    world size). Checks that need only the pins happen here; checks against the model or the
    cluster happen when the search space is built (``solvers.space.build_space``).
    """

    dp: int | None = None
    """Data-parallel size."""
    tp: int | None = None
    """Tensor-parallel size."""
    pp: int | None = None
    """Pipeline-parallel size."""
    micro_batch_size: int | None = None
    """Samples per micro-batch."""
    zero_stage: int | None = None
    """ZeRO stage 0-3."""
    recompute: Recompute | None = None
    """Recomputation policy (every stage)."""
    sequence_parallel: bool | None = None
    """Sequence parallelism on or off."""
    schedule: Schedule | None = None
    """Pipeline schedule."""
    virtual_stages: int | None = None
    """Model chunks per pipeline rank."""
    num_gpus: int | None = None
    """GPUs the layout must use exactly (dp·tp·pp)."""

    def __post_init__(self) -> None:
        for name in ("dp", "tp", "pp", "micro_batch_size", "virtual_stages", "num_gpus", "zero_stage"):
            value = getattr(self, name)
            low = 0 if name == "zero_stage" else 1
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < low):
                raise PlanValidationError(f"pin {name}={value!r} must be a positive integer")
        if self.zero_stage is not None and self.zero_stage > 3:
            raise PlanValidationError(f"pin zero_stage={self.zero_stage} must be 0, 1, 2 or 3")
        for name, kind in (("recompute", Recompute), ("schedule", Schedule)):
            value = getattr(self, name)
            if value is not None and not isinstance(value, kind):
                raise PlanValidationError(f"pin {name}={value!r} must be a {kind.__name__}")
        if self.sequence_parallel is not None and not isinstance(self.sequence_parallel, bool):
            raise PlanValidationError(f"pin sequence_parallel={self.sequence_parallel!r} must be true or false")
        self._check_together()

    def _check_together(self) -> None:
        """Pins that contradict each other (the rules ``Layout`` enforces, on the knobs that are set)."""
        if self.sequence_parallel and self.tp == 1:
            raise PlanValidationError("sequence_parallel=true needs tp > 1")
        v, sched = self.virtual_stages, self.schedule
        if v is not None and v > 1 and sched not in (None, Schedule.INTERLEAVED_1F1B):
            raise PlanValidationError(f"virtual_stages={v} needs schedule interleaved-1f1b, not {sched.value}")
        if sched is Schedule.INTERLEAVED_1F1B and self.pp == 1:
            raise PlanValidationError("schedule interleaved-1f1b needs pp > 1")
        used = (self.tp or 1) * (self.pp or 1) * (self.dp or 1)
        if self.num_gpus is not None and (self.num_gpus % used or (self.tp and self.pp and self.dp
                                                                    and used != self.num_gpus)):
            raise PlanValidationError(f"num_gpus={self.num_gpus} is not dp·tp·pp = {self.dp or '?'}·"
                                      f"{self.tp or '?'}·{self.pp or '?'}")

    @classmethod
    def from_mapping(cls, pins: Mapping[str, Any] | Pins | None) -> Pins:
        """Pins from ``{"tp": 8, "recompute": "full", ...}`` (enum values may be strings).

        Raises:
            PlanValidationError: an unknown name or a value of the wrong type.

        Example:
            >>> Pins.from_mapping({"tp": 8, "schedule": "1f1b"}).as_dict()
            {'tp': 8, 'schedule': <Schedule.ONE_F_ONE_B: '1f1b'>}
        """
        if isinstance(pins, Pins):
            return pins
        values = dict(pins or {})
        unknown = sorted(set(values) - set(PIN_NAMES))
        if unknown:
            raise PlanValidationError(f"unknown constraint(s) {unknown}; allowed: {', '.join(PIN_NAMES)}")
        for name, kind, hint in (("recompute", Recompute, "none, selective or full"),
                                 ("schedule", Schedule, "gpipe, 1f1b or interleaved-1f1b")):
            if name in values and not isinstance(values[name], kind):
                try:
                    values[name] = kind(values[name])
                except ValueError as e:
                    raise PlanValidationError(f"pin {name}={values[name]!r}: use {hint}") from e
        return cls(**values)

    @classmethod
    def from_strings(cls, pins: Sequence[str]) -> Pins:
        """Pins from the command line's ``KEY=VALUE`` words (``PIN_ALIASES`` accepted).

        Raises:
            UserInputError: not ``key=value``, an unknown key (the message lists the allowed keys),
                a key given twice, or a value of the wrong type.

        Example:
            >>> Pins.from_strings(["tp=8", "sp=on", "schedule=1f1b"]).as_dict()
            {'tp': 8, 'sequence_parallel': True, 'schedule': <Schedule.ONE_F_ONE_B: '1f1b'>}
        """
        out: dict[str, object] = {}
        for pin in pins:
            key, sep, raw = pin.partition("=")
            key = PIN_ALIASES.get(key.strip(), key.strip())
            if not sep:
                raise UserInputError(f"--pin {pin!r}: expected key=value, e.g. --pin tp=8")
            if key not in PIN_TYPES:
                raise UserInputError(f"--pin {pin!r}: unknown key {key!r}; allowed keys: {', '.join(PIN_TYPES)} "
                                     f"(aliases: {', '.join(f'{a}={k}' for a, k in PIN_ALIASES.items())})")
            if key in out:
                raise UserInputError(f"--pin {key} given twice")
            out[key] = _pin_value(key, raw.strip())
        try:
            return cls(**out)  # type: ignore[arg-type]
        except PlanValidationError as e:
            raise UserInputError(f"--pin: {e}") from e

    def as_dict(self) -> dict[str, Any]:
        """The pins that are set, by name."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}

    def admits(self, layout: Layout) -> bool:
        """Whether ``layout`` has every pinned value (``num_gpus``: the GPUs it uses).

        Example:
            >>> lay = Layout(dp=2, tp=4, pp=1, micro_batch_size=1, num_micro_batches=1, zero_stage=3,
            ...              recompute=Recompute.FULL, sequence_parallel=False, schedule=Schedule.ONE_F_ONE_B)
            >>> Pins(tp=4, num_gpus=8).admits(lay), Pins(tp=8).admits(lay)
            (True, False)
        """
        return all(getattr(layout, name) == value for name, value in self.as_dict().items())

    def describe(self) -> str:
        """The pins that are set, as ``--pin`` words: ``"tp=8 recompute=full"`` ("" when none is)."""
        return " ".join(f"{k}={v.value if isinstance(v, StrEnum) else str(v).lower() if isinstance(v, bool) else v}"
                        for k, v in self.as_dict().items())

    def __contains__(self, name: str) -> bool:
        return getattr(self, name, None) is not None


PIN_NAMES = tuple(f.name for f in dataclasses.fields(Pins))
"""Names a pin may have: the ``Layout`` fields a person sets by hand, and ``num_gpus``."""

PIN_TYPES: dict[str, type] = {
    "dp": int, "tp": int, "pp": int, "micro_batch_size": int, "zero_stage": int, "recompute": Recompute,
    "sequence_parallel": bool, "schedule": Schedule, "virtual_stages": int,
}
"""Keys ``--pin`` accepts and the type each value parses to (``num_gpus`` comes from the job, not a flag)."""

PIN_ALIASES: dict[str, str] = {"mb": "micro_batch_size", "zero": "zero_stage", "sp": "sequence_parallel",
                               "v": "virtual_stages"}
"""Short names for pin keys."""

_BOOLS = {"true": True, "on": True, "yes": True, "1": True, "false": False, "off": False, "no": False, "0": False}


def _pin_value(key: str, raw: str) -> object:
    kind = PIN_TYPES[key]
    if kind is bool:
        if raw.lower() not in _BOOLS:
            raise UserInputError(f"--pin {key}={raw}: expected true/false/on/off")
        return _BOOLS[raw.lower()]
    if kind is int:
        try:
            return int(raw)
        except ValueError:
            raise UserInputError(f"--pin {key}={raw}: expected an integer") from None
    assert issubclass(kind, StrEnum)
    try:
        return kind(raw.lower())
    except ValueError:
        raise UserInputError(f"--pin {key}={raw}: expected one of {', '.join(m.value for m in kind)}") from None


__all__ = [
    "Collective",
    "CommBreakdown",
    "Layout",
    "MemoryBreakdown",
    "PIN_ALIASES",
    "PIN_NAMES",
    "PIN_TYPES",
    "Pins",
    "Recompute",
    "Runtime",
    "Schedule",
    "TPStyle",
]
