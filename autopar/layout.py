"""The planner's shared vocabulary: a leaf module that every stage of the flow may import.

``Layout`` (the knobs a person would set by hand), ``Recompute``, ``Schedule``, the TP
styles, the ``Collective`` kinds, and the two breakdowns a priced layout carries
(``MemoryBreakdown`` per pipeline rank, ``CommBreakdown`` per step). It imports nothing
of autopar but its errors, so capture, the cost models, the solvers, ``plan.py``, emit,
export and report can all use it without importing each other backwards.
"""

from __future__ import annotations

from dataclasses import dataclass

from autopar._compat import StrEnum
from autopar.errors import PlanValidationError

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


__all__ = [
    "Collective",
    "CommBreakdown",
    "Layout",
    "MemoryBreakdown",
    "Recompute",
    "Schedule",
    "TPStyle",
]
