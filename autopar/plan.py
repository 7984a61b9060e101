"""The ``Plan`` value: what to run, where, and what it is predicted to cost.

A solved plan and a hand-written (pinned) plan have the same type. Plans are
frozen, validated when built, and round-trip through JSON (never pickle):
``Plan.from_json(plan.to_json()) == plan``. A plan file carries a schema version
and the fingerprint of the graph it was made for, so loading it against another
model, or another schema, fails with a ``PlanValidationError`` that says so. It also
carries a digest of its content, checked when a file or JSON text is read: a plan
edited by hand (say dp4·tp2 turned into dp2·tp4, whose global batch and predictions
differ) is refused, and a changed plan comes from ``autopar plan --pin``. Derived
values written for readers (each memory ``total``, the layout's ``global_batch_size``)
are checked against their terms on load, and the stages must cover every layer once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autopar._compat import StrEnum
from autopar._modules import make_callable
from autopar.errors import PlanValidationError
from autopar.layout import CommBreakdown, Layout, MemoryBreakdown, Recompute, Runtime, Schedule, TPStyle

if TYPE_CHECKING:  # cost_models imports this module's vocabulary: load the record classes on use
    from autopar.cost_models.reliability import GoodputEstimate
    from autopar.replan_record import ReplanRecord

SCHEMA_VERSION = 2
"""Bumped whenever a field changes meaning; older files are refused, not guessed at.
2: ``predicted.communication`` (TP / DP by ZeRO collective / PP send-recv) replaces ``comm_time_s``."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ShardingPlan:
    """Intra-op sharding of one layer kind at one TP size, as the ILP chose it."""

    layer_kind: str
    """The ``Layer.kind`` this applies to."""
    modules: Mapping[str, TPStyle]
    """Module path relative to the layer (e.g. ``"attn.q_proj"``) → style, for modules with weights."""
    ops: Mapping[str, str]
    """Op name (of the first layer of that kind) → chosen strategy, e.g. ``"S1 = R x S1"``; for inspection."""
    params: Mapping[str, str] = field(default_factory=dict)
    """Parameter path relative to the layer → its split where no module style says it: ``"S(d)"``, or the
    strided ``"S(d,sf=k)"`` (each of k blocks of dim d split alike: a fused projection's gate and up halves).
    For weights that are not 2-D (an MoE's stacked experts) and strided splits; it overrides ``modules``."""
    forward_collectives: tuple[tuple[str, int], ...] = ()
    """(collective kind, bytes per micro-batch) issued by one forward pass of one layer."""

    def __post_init__(self) -> None:
        for path, style in self.modules.items():
            if not isinstance(style, TPStyle):
                raise PlanValidationError(f"sharding of {path!r} must be a TPStyle, got {style!r}")
        for path, text in self.params.items():
            if not re.fullmatch(r"S\(\d+(,sf=[1-9]\d*)?\)", text):
                raise PlanValidationError(f"split of parameter {path!r} must read S(d) or S(d,sf=k), got {text!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class StagePlan:
    """One (virtual) pipeline stage: a contiguous range of layers on one pipeline rank."""

    index: int
    """Stage index in model order (0 … pp·virtual_stages − 1)."""
    pp_rank: int
    """Pipeline rank that runs it (index mod pp for interleaved schedules)."""
    layer_start: int
    """First layer index (inclusive) into ``OpGraph.layers``."""
    layer_end: int
    """Last layer index (exclusive)."""
    module_paths: tuple[str, ...]
    """Module paths of the layers, so the emitter can split the real module."""
    recompute: Recompute
    """Recomputation policy for this stage."""
    sharding: tuple[ShardingPlan, ...] = ()
    """Sharding per layer kind present in the stage (empty when tp = 1)."""
    forward_time_s: float = 0.0
    """Predicted forward time of one micro-batch on this stage."""
    backward_time_s: float = 0.0
    """Predicted backward time (recompute included) of one micro-batch on this stage."""

    def __post_init__(self) -> None:
        if not 0 <= self.layer_start < self.layer_end:
            raise PlanValidationError(
                f"stage {self.index}: layer range [{self.layer_start}, {self.layer_end}) is empty or negative"
            )
        if len(self.module_paths) != self.layer_end - self.layer_start:
            raise PlanValidationError(
                f"stage {self.index}: {len(self.module_paths)} module paths for "
                f"{self.layer_end - self.layer_start} layers"
            )

    @property
    def num_layers(self) -> int:
        """Layers in the stage."""
        return self.layer_end - self.layer_start


@dataclass(frozen=True, slots=True, kw_only=True)
class Predicted:
    """What the cost model predicts for one optimizer step under the plan."""

    step_time_s: float
    """Wall time of one optimizer step."""
    model_tflops_per_gpu: float
    """Model FLOPs (3 × forward, no recompute) / step time / GPUs, in TFLOP/s (PaLM's MFU numerator)."""
    hardware_tflops_per_gpu: float
    """As above with recomputed forward passes counted (Megatron-LM's reporting)."""
    mfu: float
    """model_tflops_per_gpu / the GPU's dense peak."""
    tokens_per_s: float
    """Tokens (samples × sequence length) per second, whole job."""
    bubble_fraction: float
    """Share of the step the pipeline is idle in fill/drain."""
    communication: CommBreakdown
    """Communication time per step: TP, exposed DP (by ZeRO collective) and pipeline send/recv apart."""
    memory: tuple[MemoryBreakdown, ...]
    """Peak memory per GPU for each pipeline rank."""
    compute_time_s: float = 0.0
    """Compute time of one step on the busiest pipeline rank."""
    sources: Mapping[str, str] = field(default_factory=dict)
    """Where the numbers came from (e.g. ``{"compute": "roofline", "calibration": "none"}``)."""

    def __post_init__(self) -> None:
        if not (self.step_time_s > 0 and math.isfinite(self.step_time_s)):
            raise PlanValidationError(f"predicted.step_time_s must be positive and finite, got {self.step_time_s}")
        if not 0.0 <= self.bubble_fraction < 1.0:
            raise PlanValidationError(f"predicted.bubble_fraction must be in [0, 1), got {self.bubble_fraction}")

    @property
    def peak_memory_bytes(self) -> int:
        """Largest per-GPU total over the pipeline ranks."""
        return max(m.total for m in self.memory)


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    """A complete parallelization plan for one model on one cluster."""

    graph_fingerprint: str
    """``OpGraph.fingerprint()`` of the model it was made for."""
    model_name: str
    """Human-readable model name."""
    cluster_name: str
    """Cluster preset or file it was planned for."""
    num_gpus_available: int
    """GPUs in the cluster (the plan may use fewer)."""
    gpus_per_node: int
    """GPUs per node of that cluster."""
    seq_len: int
    """Tokens per sample (1 for non-sequence models)."""
    dtype: str
    """Training precision: ``"bfloat16"`` (mixed, fp32 master weights) or ``"float32"``."""
    layout: Layout
    """The parallel layout."""
    stages: tuple[StagePlan, ...]
    """Pipeline stages in model order (pp · virtual_stages of them)."""
    predicted: Predicted
    """Predicted time and memory."""
    num_layers: int
    """Number of layers in the graph (stages must cover 0 … num_layers exactly)."""
    explanation: tuple[str, ...] = ()
    """Lines saying why this plan won against the runner-up (filled by the planner)."""
    runtime: Runtime = Runtime.AUTOPAR
    """The training program it was priced for (``cost_models/runtimes.py``): autopar's emitter, or Megatron-LM's;
    optional in files (older plans were priced for autopar's)."""
    schema_version: int = SCHEMA_VERSION
    """Schema of this value; see ``SCHEMA_VERSION``."""
    reliability: GoodputEstimate | None = None
    """Checkpoint costs, checkpoint interval and expected goodput (None: not estimated; optional in files)."""
    contingencies: tuple[Plan, ...] = ()
    """Plans precomputed for this cluster minus 1, 2, … nodes, for ``autopar replan`` (optional in files)."""
    replanned_from: ReplanRecord | None = None
    """Set on a re-planned plan: what changed from the plan that lost nodes, and why (optional in files)."""

    def __post_init__(self) -> None:
        lay = self.layout
        expected = lay.pp * lay.virtual_stages
        if len(self.stages) != expected:
            raise PlanValidationError(
                f"plan has {len(self.stages)} stages but layout pp={lay.pp} × virtual_stages="
                f"{lay.virtual_stages} needs {expected}"
            )
        cursor = 0
        for i, stage in enumerate(self.stages):
            if stage.index != i or stage.layer_start != cursor:
                raise PlanValidationError(
                    f"stage {i} covers layers [{stage.layer_start}, {stage.layer_end}) but should start at {cursor}"
                )
            if stage.pp_rank != i % lay.pp:
                raise PlanValidationError(f"stage {i} runs on pp rank {stage.pp_rank}, expected {i % lay.pp}")
            cursor = stage.layer_end
        if cursor != self.num_layers:
            raise PlanValidationError(f"stages cover {cursor} layers but the graph has {self.num_layers}")
        if lay.num_gpus > self.num_gpus_available:
            raise PlanValidationError(
                f"layout uses dp·tp·pp = {lay.num_gpus} GPUs but the cluster has {self.num_gpus_available}"
            )
        if len(self.predicted.memory) != lay.pp:
            raise PlanValidationError(f"{len(self.predicted.memory)} memory breakdowns for pp={lay.pp}")

    # ---- explanation -------------------------------------------------------------------------

    def explain(self) -> str:
        """A readable account of the plan and why it won against the runner-up."""
        p, lay = self.predicted, self.layout
        lines = [
            f"{self.model_name} on {self.cluster_name}: {lay.describe()} ({lay.num_gpus} of "
            f"{self.num_gpus_available} GPUs)",
            f"  step {p.step_time_s:.3f} s, {p.model_tflops_per_gpu:.1f} model TFLOP/s/GPU "
            f"(MFU {p.mfu:.1%}), {p.tokens_per_s:,.0f} tokens/s, bubble {p.bubble_fraction:.1%}",
            f"  peak memory {p.peak_memory_bytes / 2**30:.1f} GiB of {p.memory[0].capacity / 2**30:.1f} GiB",
        ]
        if self.runtime is not Runtime.AUTOPAR:  # autopar's own program: the default, said by omission
            lines.append(f"  priced for: {p.sources.get('runtime', self.runtime.value)}")
        lines.extend(self.explanation)
        return "\n".join(lines)

    # ---- serialization -----------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (enums as their values), ending with the ``digest`` of the rest."""
        out: dict[str, Any] = _to_jsonable(self)
        out[DIGEST_KEY] = content_digest(out)
        return out

    def to_json(self, *, indent: int | None = 2) -> str:
        """JSON text with ``schema_version`` first."""
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False)

    def save(self, path: str | Path) -> None:
        """Write the plan as JSON (with its digest) through a temporary file and a rename.

        Raises:
            UserInputError: ``path`` cannot be written (no such directory, a directory, no permission).
        """
        from autopar._io import write_atomic

        write_atomic(path, self.to_json() + "\n")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, verify_digest: bool = False) -> Plan:
        """Build a plan from ``to_dict`` output; raises ``PlanValidationError`` on any mismatch.

        With ``verify_digest`` (files and JSON text), the ``digest`` entry must be present and
        match the content: a plan edited by hand is refused, since its predictions no longer
        hold. Without it (a dict built in Python), the digest is ignored.
        """
        if not isinstance(data, Mapping):
            raise PlanValidationError(f"a plan must be a JSON object, got {type(data).__name__}")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise PlanValidationError(
                f"plan schema version {version!r} is not supported (this autopar reads version "
                f"{SCHEMA_VERSION}); re-run `autopar plan` to make a new plan file"
            )
        data = _without_digest(data, verify=verify_digest)
        try:
            return _from_jsonable(cls, data)
        except PlanValidationError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise PlanValidationError(f"plan file is malformed: {e}") from e

    @classmethod
    def from_json(cls, text: str) -> Plan:
        """Parse JSON text written by ``to_json``; raises ``PlanValidationError`` for corrupt or edited text."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise PlanValidationError(f"plan file is not valid JSON ({e}); it may be truncated or corrupt") from e
        return cls.from_dict(data, verify_digest=True)

    @classmethod
    def load(cls, path: str | Path, *, fingerprint: str | None = None) -> Plan:
        """Read a plan file; if ``fingerprint`` is given, refuse a plan made for another model."""
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise PlanValidationError(f"cannot read plan file {path}: {e.strerror}") from e
        except UnicodeDecodeError as e:
            raise PlanValidationError(f"plan file {path} is not text; it is corrupt or not a plan") from e
        try:
            plan = cls.from_json(text)
        except PlanValidationError as e:
            raise PlanValidationError(f"plan file {path}: {e}") from e
        if fingerprint is not None:
            plan.validate_for(fingerprint)
        return plan

    def validate_for(self, fingerprint: str) -> None:
        """Raise ``PlanValidationError`` unless the plan was made for a graph with this fingerprint."""
        if fingerprint != self.graph_fingerprint:
            raise PlanValidationError(
                f"plan was made for model {self.model_name!r} (graph fingerprint {self.graph_fingerprint}) "
                f"but this model's fingerprint is {fingerprint}; re-plan for this model"
            )


# ---- digest ---------------------------------------------------------------------------------

DIGEST_KEY = "digest"
"""Key of the content digest in a plan's JSON object."""


def content_digest(data: Mapping[str, Any]) -> str:
    """``sha256:<hex>`` of the canonical JSON (sorted keys, no spaces) of ``data`` without its digest.

    Example:
        >>> content_digest({"b": 1, "a": [1.5, "x"]}) == content_digest({"a": [1.5, "x"], "b": 1, "digest": "?"})
        True
    """
    body = {k: v for k, v in data.items() if k != DIGEST_KEY}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def _without_digest(data: Mapping[str, Any], *, verify: bool) -> Mapping[str, Any]:
    """``data`` without its digest, after (with ``verify``) checking the digest against the content."""
    if not verify:
        return {k: v for k, v in data.items() if k != DIGEST_KEY}
    if DIGEST_KEY not in data:
        raise PlanValidationError(
            "plan has no content digest, so a hand edit cannot be told from the planner's output; "
            "write plan files with `autopar plan ... --out FILE` (or Plan.save)"
        )
    recorded, actual = data[DIGEST_KEY], content_digest(data)
    if recorded != actual:
        raise PlanValidationError(
            f"plan content does not match its digest ({recorded} recorded, {actual} computed): it was "
            f"edited or damaged after it was written, and its predictions no longer hold; make a changed "
            f"plan with `autopar plan ... --pin KEY=VALUE --out FILE`"
        )
    return {k: v for k, v in data.items() if k != DIGEST_KEY}


# ---- JSON helpers ---------------------------------------------------------------------------


def _to_jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = {f.name: _to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, Plan):
            out = {"schema_version": out.pop("schema_version"), **out}
        if isinstance(value, MemoryBreakdown):
            out["total"] = value.total  # derived, written for readers of the JSON; checked on load
        if isinstance(value, Layout):
            out["global_batch_size"] = value.global_batch_size  # derived as above: dp · mb · micro-batches
        return out
    if isinstance(value, StrEnum):
        return value.value
    if isinstance(value, Mapping):
        return {str(k): _to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_to_jsonable(v) for v in value]
    return value


_ENUMS: Mapping[str, type[StrEnum]] = {"recompute": Recompute, "schedule": Schedule, "runtime": Runtime}
_NESTED: Mapping[str, type] = {
    "layout": Layout,
    "predicted": Predicted,
    "communication": CommBreakdown,
}


_DERIVED: Mapping[type, str] = {MemoryBreakdown: "total", Layout: "global_batch_size"}
"""Derived values written into the JSON for its readers, and checked against their terms on load."""


def _from_jsonable(cls: type, data: Mapping[str, Any]) -> Any:
    derived = _DERIVED.get(cls)
    if derived is not None and derived in data:
        data = dict(data)
        recorded = data.pop(derived)
        built = _from_jsonable(cls, data)
        if recorded != getattr(built, derived):
            raise PlanValidationError(_derived_mismatch(built, derived, recorded))
        return built
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise PlanValidationError(f"unknown field(s) {sorted(unknown)} in {cls.__name__}")
    kwargs: dict[str, Any] = {}
    for name, raw in data.items():
        kwargs[name] = _field_from_json(cls, name, raw)
    return cls(**kwargs)


def _derived_mismatch(built: Any, name: str, recorded: Any) -> str:
    if isinstance(built, Layout):
        return (f"plan is inconsistent: global batch {recorded} but dp {built.dp} × micro-batch "
                f"{built.micro_batch_size} × {built.num_micro_batches} micro-batches = {built.global_batch_size}")
    return f"memory total {recorded} is not the sum of its terms ({getattr(built, name)})"


def _field_from_json(cls: type, name: str, raw: Any) -> Any:
    if name in _ENUMS:
        try:
            return _ENUMS[name](raw)
        except ValueError as e:
            raise PlanValidationError(f"{cls.__name__}.{name}: {e}") from e
    if name in _NESTED:
        return _from_jsonable(_NESTED[name], raw)
    if cls is Plan and name == "stages":
        return tuple(_from_jsonable(StagePlan, s) for s in raw)
    if cls is StagePlan and name == "sharding":
        return tuple(_from_jsonable(ShardingPlan, s) for s in raw)
    if cls is StagePlan and name == "module_paths":
        return tuple(raw)
    if cls is ShardingPlan and name == "modules":
        return {k: TPStyle(v) for k, v in raw.items()}
    if cls is ShardingPlan and name == "params":
        return {str(k): str(v) for k, v in raw.items()}
    if cls is ShardingPlan and name == "forward_collectives":
        return tuple((str(k), int(b)) for k, b in raw)
    if cls is Predicted and name == "memory":
        return tuple(_from_jsonable(MemoryBreakdown, m) for m in raw)
    if name == "explanation":
        return tuple(raw)
    if cls is Plan and name in ("reliability", "replanned_from") and raw is not None:
        from autopar.cost_models.reliability import GoodputEstimate
        from autopar.replan_record import ReplanRecord

        return (GoodputEstimate if name == "reliability" else ReplanRecord).from_dict(raw)
    if cls is Plan and name == "contingencies":
        return tuple(Plan.from_dict(c) for c in raw)
    return raw


__all__ = [
    "DIGEST_KEY",
    "SCHEMA_VERSION",
    "CommBreakdown",
    "Layout",
    "MemoryBreakdown",
    "Plan",
    "Predicted",
    "Recompute",
    "Schedule",
    "ShardingPlan",
    "StagePlan",
    "TPStyle",
    "content_digest",
]

make_callable(__name__, "autopar.api:plan")  # autopar.plan(...) stays the planner after `import autopar.plan`
