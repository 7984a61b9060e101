"""Hardware descriptions: a GPU kind, the links between GPUs, and the cluster they form.

    cluster = Cluster.preset("dgx-h100", nodes=4)      # shipped presets (presets.yaml, data sheets cited)
    cluster = Cluster.from_yaml("my_cluster.yaml")      # a user file, optionally ``preset: dgx-h100`` + overrides

A user file may set any field of a preset; unknown keys, missing fields and
non-positive numbers are refused with a ``ClusterSpecError`` naming the key.
Quantities may carry units (``"80 GiB"``, ``"400 Gb/s"``, ``"2.7 us"``; see ``units.py``).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from autopar._compat import StrEnum
from autopar.cost_models.reliability import ReliabilitySpec, build_reliability_spec
from autopar.cost_models.units import UnitKind, format_bytes, parse_quantity
from autopar.errors import ClusterSpecError

PRESET_FILE = "presets.yaml"
"""Package data file (in ``cost_models/``) holding the presets."""

DTYPE_ALIASES: Mapping[str, str] = MappingProxyType({
    "bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32",
    "fp8": "float8_e4m3fn", "float8": "float8_e4m3fn",
})
"""Short dtype spellings accepted by ``GPUSpec.peak_flops``."""

TRAINING_DTYPES: tuple[str, ...] = ("bfloat16", "float16", "float32")
"""Training precisions the cost models price: bf16/fp16 mixed precision with fp32 master weights, or fp32."""

KNOWN_COMPUTE_DTYPES = frozenset({"bfloat16", "float16", "float32", "tf32", "float64", "float8_e4m3fn", "float8_e5m2"})
"""Dtype names a ``peak_flops_per_s`` table may use (``tf32`` is fp32 storage on tensor cores)."""


class LinkKind(StrEnum):
    """Physical interconnect of a link."""

    NVLINK = "nvlink"  # NVLink, directly or through NVSwitch
    PCIE = "pcie"
    INFINIBAND = "infiniband"
    ROCE = "roce"  # RDMA over converged Ethernet
    ETHERNET = "ethernet"  # TCP or a cloud fabric (EFA)


DTENSOR_HOST_FIELDS = ("dtensor_op_s", "dtensor_backward_op_s", "dtensor_collective_s", "dtensor_hook_s",
                       "dtensor_hook_backward_s")
"""``GPUSpec``'s host times of a tensor-parallel stage's DTensors (``profiling/dtensor_probe.py``; 0 on GPUs)."""
HOST_FIELDS = (*DTENSOR_HOST_FIELDS, "fsdp_unit_s")
"""Every ``GPUSpec`` host time a CPU rank measures (``autopar profile --ranks``): the DTensor ones and FSDP2's."""


@dataclass(frozen=True, slots=True, kw_only=True)
class GPUSpec:
    """One accelerator kind: peak rates and what the software reaches of them."""

    name: str
    """Product name, e.g. ``"H100-SXM5-80GB"``."""
    peak_flops_per_s: Mapping[str, float]
    """Dense peak FLOP/s per dtype name (``"bfloat16"``, ``"float16"``, ``"float32"``, ``"tf32"``, ...)."""
    mem_bytes: int
    """Device memory capacity."""
    mem_bytes_per_s: float
    """Peak device-memory bandwidth."""
    matmul_efficiency: float
    """Fraction of peak FLOP/s that large, well-shaped GEMMs reach (measured MAMF / peak)."""
    memory_efficiency: float
    """Fraction of peak bandwidth that large streaming kernels (copies) reach."""
    kernel_launch_s: float
    """Floor on the time of one eager op: host dispatch plus kernel launch."""
    half_efficiency_s: float
    """Hockney's n½ as time: a kernel whose work takes this long at full rate runs at half efficiency."""
    dtensor_op_s: float = 0.0
    """Host time DTensor adds to each forward op of a tensor-parallel stage (sharding propagation, wrapping),
    where it adds to the op's time: on a rank whose host runs the kernels (a CPU rank, measured by
    ``autopar profile --ranks``). 0 on GPUs, whose kernels of the sizes planned here outlast it."""
    dtensor_backward_op_s: float = 0.0
    """The same for the backward ops of one forward op."""
    dtensor_collective_s: float = 0.0
    """Host time DTensor adds to each collective a tensor-parallel stage issues (a redistribution through
    functional collectives), over the collective's own time (``measured_collectives``, gloo's direct call)."""
    dtensor_hook_s: float = 0.0
    """Host time of one Megatron *f* (``from_local(to_local(x))``, ``emit/tp.py``) in forward."""
    dtensor_hook_backward_s: float = 0.0
    """The same in backward."""
    fsdp_unit_s: float = 0.0
    """Host time FSDP2 adds per unit (block or stage root) and micro-batch: its forward and backward hooks
    (``profiling/fsdp_probe.py``). 0 on GPUs, where they overlap the kernels queued before them."""
    grad_reduce_overlaps: bool = True
    """Whether a data-parallel gradient reduce runs beside the backward that follows it: FSDP2 issues it on its
    own CUDA stream. False on a CPU rank, which has no streams: FSDP2's ``foreach_reduce`` calls the
    reduce-scatter and all-reduce with ``async_op=False``, so the backward waits for each one."""

    def __post_init__(self) -> None:
        if not self.peak_flops_per_s:
            raise ClusterSpecError(f"gpu {self.name!r}: peak_flops_per_s is empty")
        for dtype, rate in self.peak_flops_per_s.items():
            _require_positive(f"gpu.peak_flops_per_s.{dtype}", rate)
        for name in ("mem_bytes", "mem_bytes_per_s", "kernel_launch_s", "half_efficiency_s"):
            _require_positive(f"gpu.{name}", getattr(self, name))
        for name in ("matmul_efficiency", "memory_efficiency"):
            _require_fraction(f"gpu.{name}", getattr(self, name))
        for name in HOST_FIELDS:
            _require_non_negative(f"gpu.{name}", getattr(self, name))

    def __hash__(self) -> int:
        return hash((self.name, tuple(sorted(self.peak_flops_per_s.items())), self.mem_bytes, self.mem_bytes_per_s,
                     self.matmul_efficiency, self.memory_efficiency, self.kernel_launch_s, self.half_efficiency_s,
                     *(getattr(self, name) for name in HOST_FIELDS), self.grad_reduce_overlaps))

    def peak_flops(self, dtype: str) -> float:
        """Dense peak FLOP/s for ``dtype`` (aliases such as ``"bf16"`` accepted).

        Raises:
            ClusterSpecError: the GPU has no figure for that dtype (e.g. bf16 on V100).

        Example:
            >>> Cluster.preset("dgx-a100-80gb").gpu.peak_flops("bf16")
            312000000000000.0
        """
        key = DTYPE_ALIASES.get(dtype, dtype)
        rate = self.peak_flops_per_s.get(key)
        if rate is None:
            raise ClusterSpecError(
                f"gpu {self.name!r} has no peak FLOP/s for dtype {dtype!r}; it lists "
                f"{sorted(self.peak_flops_per_s)} (V100 has no bf16 units: plan it with float16)"
            )
        return rate

    def best_training_dtype(self) -> str:
        """The GPU's best 16-bit training type: bfloat16, or float16 where it has no bf16 units (V100);
        float32 for a GPU that lists neither.

        Example:
            >>> Cluster.preset("dgx-h100").gpu.best_training_dtype(), Cluster.preset("v100-p3").gpu.best_training_dtype()
            ('bfloat16', 'float16')
        """
        return next((d for d in ("bfloat16", "float16") if d in self.peak_flops_per_s), "float32")

    @property
    def achievable_mem_bytes_per_s(self) -> float:
        """Bandwidth that streaming kernels reach: peak × memory_efficiency."""
        return self.mem_bytes_per_s * self.memory_efficiency


@dataclass(frozen=True, slots=True, kw_only=True)
class LinkSpec:
    """A GPU's connection to its peers over one kind of link, per GPU and per direction."""

    kind: LinkKind
    """Interconnect technology."""
    bytes_per_s: float
    """Peak bandwidth per GPU in one direction (a NIC shared by k GPUs counts 1/k)."""
    latency_s: float
    """Per-step latency of a collective over this link (NCCL's low-latency protocol hardware latency)."""
    efficiency: float
    """Fraction of ``bytes_per_s`` that NCCL reaches as bus bandwidth on large messages."""

    def __post_init__(self) -> None:
        if not isinstance(self.kind, LinkKind):
            raise ClusterSpecError(f"link kind must be a LinkKind, got {self.kind!r}")
        _require_positive("link.bytes_per_s", self.bytes_per_s)
        _require_positive("link.latency_s", self.latency_s)
        _require_fraction("link.efficiency", self.efficiency)

    @property
    def achievable_bytes_per_s(self) -> float:
        """Bus bandwidth reached on large messages: bytes_per_s × efficiency."""
        return self.bytes_per_s * self.efficiency


@dataclass(frozen=True, slots=True, kw_only=True)
class Cluster:
    """Homogeneous GPU nodes joined by a fabric."""

    name: str
    """Preset name or the user file's name."""
    gpu: GPUSpec
    """The accelerator every node carries."""
    gpus_per_node: int
    """GPUs in one node."""
    nodes: int
    """Number of nodes."""
    intra_node: LinkSpec
    """Link between GPUs of one node (NVLink/NVSwitch or PCIe)."""
    inter_node: LinkSpec
    """Fabric between nodes, per GPU (InfiniBand, RoCE, Ethernet)."""
    host_mem_bytes: int
    """CPU memory of one node (for offloading and data loading)."""
    description: str = ""
    """One line for people (``autopar clusters``)."""
    reliability: ReliabilitySpec = dataclasses.field(default_factory=ReliabilitySpec)
    """Failure rates, restart time and checkpoint storage bandwidth (``cost_models/reliability.py``)."""
    measured_collectives: tuple[tuple[str, int, float, float], ...] = ()
    """Measured alpha-beta fits inside one node, (collective kind, group size, alpha_s, beta_s_per_byte):
    they replace the link model for that kind and size (``autopar profile --ranks``; gloo's kinds differ
    by 10× on one machine, which one link cannot describe). Empty for presets."""
    host_cores: int = 0
    """CPU cores the ranks of one node share, when a "GPU" is a host thread (``autopar profile --ranks``: this
    machine as a cluster); the ``gpu`` rates are then one rank with a core of its own, and a node whose busy ranks
    outnumber its cores takes turns (``host_wait_s``). 0: every rank has a device of its own (GPU clusters)."""

    def measured_collective(self, kind: str, group_size: int) -> tuple[float, float] | None:
        """(alpha_s, beta_s_per_byte) measured for ``kind`` over ``group_size`` ranks of one node, or None."""
        for k, n, alpha, beta in self.measured_collectives:
            if k == kind and n == group_size:
                return alpha, beta
        return None

    def __post_init__(self) -> None:
        for name in ("gpus_per_node", "nodes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ClusterSpecError(f"{name} must be a positive integer, got {value!r}")
        _require_positive("host_mem_bytes", self.host_mem_bytes)
        if isinstance(self.host_cores, bool) or not isinstance(self.host_cores, int) or self.host_cores < 0:
            raise ClusterSpecError(f"host_cores must be an integer >= 0, got {self.host_cores!r}")

    @property
    def num_gpus(self) -> int:
        """GPUs in the cluster: nodes × gpus_per_node."""
        return self.nodes * self.gpus_per_node

    def peak_flops(self, dtype: str) -> float:
        """Dense peak FLOP/s of one GPU for ``dtype``."""
        return self.gpu.peak_flops(dtype)

    def with_nodes(self, nodes: int) -> Cluster:
        """The same cluster with another node count."""
        return dataclasses.replace(self, nodes=nodes)

    @classmethod
    def resolve(cls, spec: Cluster | str | Path, *, nodes: int | None = None) -> Cluster:
        """A cluster from a value, a preset name, or a YAML file (``.yaml``/``.yml`` or an existing file).

        Args:
            spec: what the user gave.
            nodes: overrides the node count when given.

        Raises:
            ClusterSpecError: unknown preset, bad file, or a non-positive ``nodes``.
        """
        if isinstance(spec, Cluster):
            cluster = spec
        elif isinstance(spec, (str, Path)):
            text = str(spec)
            is_file = text.endswith((".yaml", ".yml")) or Path(text).is_file()
            cluster = cls.from_yaml(text) if is_file else cls.preset(text)
        else:
            raise ClusterSpecError(f"cluster must be a Cluster, a preset name or a YAML path, got {spec!r}")
        if nodes is None:
            return cluster
        if nodes < 1:
            raise ClusterSpecError(f"nodes must be positive, got {nodes}")
        return cluster.with_nodes(nodes)

    def describe(self) -> str:
        """One line: GPUs, memory, peak bf16/fp16, links.

        Example:
            >>> Cluster.preset("dgx-h100", nodes=2).describe().split(",")[0]
            'dgx-h100: 2 x 8 H100-SXM5-80GB'
        """
        dtype = "bfloat16" if "bfloat16" in self.gpu.peak_flops_per_s else next(iter(self.gpu.peak_flops_per_s))
        return (
            f"{self.name}: {self.nodes} x {self.gpus_per_node} {self.gpu.name}, {format_bytes(self.gpu.mem_bytes)}, "
            f"{self.gpu.peak_flops(dtype) / 1e12:.0f} TFLOP/s {dtype}, "
            f"{self.intra_node.kind.value} {self.intra_node.bytes_per_s / 1e9:.0f} GB/s, "
            f"{self.inter_node.kind.value} {self.inter_node.bytes_per_s * 8 / 1e9:.0f} Gb/s per GPU"
        )

    @classmethod
    def preset(cls, name: str, nodes: int = 1) -> Cluster:
        """A shipped cluster preset (see ``list_presets()``) with ``nodes`` nodes.

        Raises:
            ClusterSpecError: unknown preset name (the message lists the known ones).

        Example:
            >>> Cluster.preset("dgx-a100-80gb", nodes=4).num_gpus
            32
        """
        raw = _raw_presets().get(name)
        if raw is None:
            raise ClusterSpecError(f"unknown cluster preset {name!r}; choose one of {', '.join(list_presets())}")
        return cls.from_dict({**raw, "nodes": nodes}, name=name)

    @classmethod
    def from_yaml(cls, path: str | Path) -> Cluster:
        """Read a cluster file; ``preset: <name>`` starts from a preset and the other keys override it.

        Raises:
            ClusterSpecError: unreadable file, bad YAML, unknown keys, missing fields or bad values.
        """
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except OSError as e:
            raise ClusterSpecError(f"cannot read cluster file {path}: {e.strerror}") from e
        except yaml.YAMLError as e:
            raise ClusterSpecError(f"cluster file {path} is not valid YAML: {e}") from e
        if not isinstance(data, Mapping):
            raise ClusterSpecError(f"cluster file {path} must hold a mapping of keys, got {type(data).__name__}")
        return cls.from_dict(data, name=path.stem)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, name: str = "custom") -> Cluster:
        """Build a cluster from a mapping shaped like a preset (``preset:`` allowed), validating every key."""
        _check_keys(data, _TOP_KEYS, prefix="")
        base_name = data.get("preset")
        merged: Mapping[str, Any] = data
        if base_name is not None:
            raw = _raw_presets().get(str(base_name))
            if raw is None:
                raise ClusterSpecError(f"preset: unknown cluster preset {base_name!r}; choose one of "
                                       f"{', '.join(list_presets())}")
            merged = _deep_merge(raw, {k: v for k, v in data.items() if k != "preset"})
        return _build_cluster(merged, default_name=str(data.get("name", base_name if base_name else name)))


def list_presets() -> tuple[str, ...]:
    """Names of the shipped presets, in file order.

    Example:
        >>> "dgx-h100" in list_presets() and "v100-p3" in list_presets()
        True
    """
    return tuple(_raw_presets())


# ---- parsing --------------------------------------------------------------------------------

_TOP_KEYS = frozenset({"name", "description", "preset", "nodes", "gpus_per_node", "host_mem_bytes", "gpu",
                       "intra_node", "inter_node", "reliability", "measured_collectives", "host_cores"})
_GPU_KEYS = frozenset({f.name for f in dataclasses.fields(GPUSpec)})
_LINK_KEYS = frozenset({f.name for f in dataclasses.fields(LinkSpec)})


@functools.lru_cache(maxsize=1)
def _raw_presets() -> Mapping[str, Mapping[str, Any]]:
    text = importlib.resources.files("autopar.cost_models").joinpath(PRESET_FILE).read_text()
    data = yaml.safe_load(text)
    return MappingProxyType(dict(data["presets"]))


def _deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _check_keys(data: Mapping[str, Any], allowed: frozenset[str], *, prefix: str) -> None:
    unknown = sorted(str(k) for k in data if k not in allowed)
    if unknown:
        raise ClusterSpecError(f"unknown key(s) {', '.join(prefix + k for k in unknown)}; "
                               f"allowed: {', '.join(sorted(prefix + k for k in allowed))}")


def _get(data: Mapping[str, Any], key: str, prefix: str) -> Any:
    if key not in data or data[key] is None:
        raise ClusterSpecError(f"missing field {prefix}{key}")
    return data[key]


def _build_cluster(data: Mapping[str, Any], *, default_name: str) -> Cluster:
    _check_keys(data, _TOP_KEYS, prefix="")
    gpu, intra, inter = (_get(data, k, "") for k in ("gpu", "intra_node", "inter_node"))
    for key, section in (("gpu", gpu), ("intra_node", intra), ("inter_node", inter)):
        if not isinstance(section, Mapping):
            raise ClusterSpecError(f"{key} must be a mapping of fields, got {section!r}")
    return Cluster(
        name=str(data.get("name", default_name)),
        description=str(data.get("description", "")),
        gpu=_build_gpu(gpu),
        gpus_per_node=_count(_get(data, "gpus_per_node", ""), "gpus_per_node"),
        nodes=_count(data.get("nodes", 1), "nodes"),
        intra_node=_build_link(intra, "intra_node."),
        inter_node=_build_link(inter, "inter_node."),
        host_mem_bytes=int(_positive(_get(data, "host_mem_bytes", ""), UnitKind.BYTES, "host_mem_bytes")),
        reliability=build_reliability_spec(data.get("reliability")),
        measured_collectives=_measured_collectives(data.get("measured_collectives", {})),
        host_cores=data.get("host_cores", 0),
    )


def _measured_collectives(data: object) -> tuple[tuple[str, int, float, float], ...]:
    """``{kind: {group_size: [alpha_s, beta_s_per_byte]}}`` → sorted tuples; refuses malformed entries."""
    if not isinstance(data, Mapping):
        raise ClusterSpecError(f"measured_collectives must map a collective kind to {{group size: [alpha, beta]}}, "
                               f"got {data!r}")
    out = []
    for kind, sizes in data.items():
        if not isinstance(sizes, Mapping):
            raise ClusterSpecError(f"measured_collectives.{kind} must map group sizes to [alpha_s, beta_s_per_byte]")
        for n, fit in sizes.items():
            if not (isinstance(fit, (list, tuple)) and len(fit) == 2
                    and all(isinstance(v, (int, float)) and v >= 0 for v in fit)):
                raise ClusterSpecError(f"measured_collectives.{kind}.{n} must be [alpha_s, beta_s_per_byte] >= 0, "
                                       f"got {fit!r}")
            out.append((str(kind), _count(n, f"measured_collectives.{kind} group size"), float(fit[0]), float(fit[1])))
    return tuple(sorted(out))


def _build_gpu(data: Mapping[str, Any]) -> GPUSpec:
    _check_keys(data, _GPU_KEYS, prefix="gpu.")
    peaks = _get(data, "peak_flops_per_s", "gpu.")
    if not isinstance(peaks, Mapping) or not peaks:
        raise ClusterSpecError(f"gpu.peak_flops_per_s must map dtype names to FLOP/s, got {peaks!r}")
    _check_keys(peaks, KNOWN_COMPUTE_DTYPES, prefix="gpu.peak_flops_per_s.")
    return GPUSpec(
        name=str(_get(data, "name", "gpu.")),
        peak_flops_per_s=MappingProxyType({
            str(k): _positive(v, UnitKind.FLOPS_PER_S, f"gpu.peak_flops_per_s.{k}") for k, v in peaks.items()}),
        mem_bytes=int(_positive(_get(data, "mem_bytes", "gpu."), UnitKind.BYTES, "gpu.mem_bytes")),
        mem_bytes_per_s=_positive(_get(data, "mem_bytes_per_s", "gpu."), UnitKind.BYTES_PER_S, "gpu.mem_bytes_per_s"),
        matmul_efficiency=_fraction(_get(data, "matmul_efficiency", "gpu."), "gpu.matmul_efficiency"),
        memory_efficiency=_fraction(_get(data, "memory_efficiency", "gpu."), "gpu.memory_efficiency"),
        kernel_launch_s=_positive(_get(data, "kernel_launch_s", "gpu."), UnitKind.SECONDS, "gpu.kernel_launch_s"),
        half_efficiency_s=_positive(_get(data, "half_efficiency_s", "gpu."), UnitKind.SECONDS,
                                    "gpu.half_efficiency_s"),
        **{key: _non_negative(data[key], UnitKind.SECONDS, f"gpu.{key}")
           for key in HOST_FIELDS if key in data},
        grad_reduce_overlaps=_flag(data.get("grad_reduce_overlaps", True), "gpu.grad_reduce_overlaps"),
    )


def _flag(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise ClusterSpecError(f"{where} must be true or false, got {value!r}")
    return value


def _build_link(data: Mapping[str, Any], prefix: str) -> LinkSpec:
    _check_keys(data, _LINK_KEYS, prefix=prefix)
    kind = _get(data, "kind", prefix)
    try:
        link_kind = LinkKind(kind)
    except ValueError as e:
        raise ClusterSpecError(f"{prefix}kind: {kind!r} is not one of {[k.value for k in LinkKind]}") from e
    return LinkSpec(
        kind=link_kind,
        bytes_per_s=_positive(_get(data, "bytes_per_s", prefix), UnitKind.BYTES_PER_S, f"{prefix}bytes_per_s"),
        latency_s=_positive(_get(data, "latency_s", prefix), UnitKind.SECONDS, f"{prefix}latency_s"),
        efficiency=_fraction(_get(data, "efficiency", prefix), f"{prefix}efficiency"),
    )


def _positive(value: object, kind: UnitKind, key: str) -> float:
    number = parse_quantity(value, kind, key=key)
    _require_positive(key, number)
    return number


def _non_negative(value: object, kind: UnitKind, key: str) -> float:
    number = parse_quantity(value, kind, key=key)
    _require_non_negative(key, number)
    return number


def _fraction(value: object, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ClusterSpecError(f"{key} must be a number in (0, 1], got {value!r}")
    _require_fraction(key, float(value))
    return float(value)


def _count(value: object, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ClusterSpecError(f"{key} must be a positive integer, got {value!r}")
    return value


def _require_positive(key: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ClusterSpecError(f"{key} must be a positive number, got {value!r}")


def _require_non_negative(key: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ClusterSpecError(f"{key} must be a number >= 0, got {value!r}")


def _require_fraction(key: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and 0.0 < value <= 1.0):
        raise ClusterSpecError(f"{key} must be in (0, 1], got {value!r}")


__all__ = ["Cluster", "GPUSpec", "LinkKind", "LinkSpec", "list_presets", "DTYPE_ALIASES", "KNOWN_COMPUTE_DTYPES"]
