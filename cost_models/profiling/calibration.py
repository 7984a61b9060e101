"""Calibration tables: measured forward/backward seconds per distinct (op, shapes, dtypes).

The profiler (``profiler.py``) writes them; the compute model (``compute.py``) reads
them. A table belongs to one device and one torch version. A file may hold tables
for several devices, keyed ``"<device name> | torch <version>"``, so one file can
travel with a project and serve whichever machine plans with it.

This module is torch-free: it only knows op keys, numbers and JSON.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from autopar.errors import UserInputError
from autopar.graph.ir import Op, TensorMeta

CALIBRATION_FORMAT = 1
"""Version of the JSON layout; files of another version are refused."""

FLOAT_DTYPES = frozenset({"float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"})
"""Dtypes that a training dtype replaces (integer ids and bool masks keep theirs)."""


def op_key(target: str, inputs: Sequence[TensorMeta], scalars: Sequence[object] = ()) -> str:
    """The table key of one op call: target, input shapes, input dtypes and scalar arguments.

    Scalars are part of the key because they change the work (a reduction's dim, a dropout's p).

    Example:
        >>> a = TensorMeta(shape=(4, 8), dtype="float32")
        >>> op_key("aten.mm.default", [a, a])
        'aten.mm.default|4x8;4x8|float32,float32|()'
    """
    shapes = ";".join("x".join(str(d) for d in t.shape) for t in inputs)
    dtypes = ",".join(t.dtype for t in inputs)
    return f"{target}|{shapes}|{dtypes}|{tuple(scalars)!r}"


def op_key_for(op: Op, dtype: str | None = None) -> str:
    """Key of ``op`` as it runs with its floating-point inputs cast to ``dtype`` (None: as captured)."""
    return op_key(op.target, cast_float_inputs(op.inputs, dtype), op.scalars)


def cast_float_inputs(inputs: Sequence[TensorMeta], dtype: str | None) -> tuple[TensorMeta, ...]:
    """Inputs with floating-point dtypes replaced by ``dtype`` (None: unchanged)."""
    if dtype is None:
        return tuple(inputs)
    return tuple(TensorMeta(shape=t.shape, dtype=dtype) if t.dtype in FLOAT_DTYPES else t for t in inputs)


_GPU_FAMILY = re.compile(r"\b([A-Z]{1,3}\d{2,4}[A-Z]?)\b")
"""A GPU product family in a name: A100, H100, H200, L40S, V100, B200, MI300X (data-sheet names)."""


def device_kind(name: str) -> str:
    """The kind of device a name denotes: the GPU family when the name has one, else the whole name.

    torch names a GPU ``"NVIDIA H100 80GB HBM3"`` and a cluster preset calls it ``"H100-SXM5-80GB"``;
    both are one kind. A CPU (``cpu:<model>:<threads>threads``) is its own kind.

    Example:
        >>> device_kind("NVIDIA H100 80GB HBM3"), device_kind("H100-SXM5-80GB"), device_kind("L40S-48GB")
        ('H100', 'H100', 'L40S')
        >>> device_kind("cpu:Intel(R) Xeon(R) CPU @ 2.20GHz:1threads")
        'cpu:Intel(R) Xeon(R) CPU @ 2.20GHz:1threads'
    """
    if name.startswith("cpu:"):
        return name
    found = _GPU_FAMILY.search(name.upper().replace("-", " ").replace("_", " "))
    return found.group(1) if found else name


def table_id(device_name: str, torch_version: str) -> str:
    """The key a table is stored under in a calibration file."""
    return f"{device_name} | torch {torch_version}"


@dataclass(frozen=True, slots=True, kw_only=True)
class CalibrationTable:
    """Measured op times on one device with one torch version."""

    device_name: str
    """Device as torch names it (``torch.cuda.get_device_name()``, or the CPU model)."""
    torch_version: str
    """``torch.__version__`` at profiling time."""
    entries: Mapping[str, tuple[float, float]]
    """``op_key`` → (forward seconds, backward seconds) at the captured shapes."""
    skipped: Mapping[str, str] = field(default_factory=dict)
    """``op_key`` → why it was not profiled (priced by the roofline instead)."""
    dtype: str | None = None
    """Dtype floating-point inputs were cast to when profiling (None: as captured)."""
    batch_entries: Mapping[str, Mapping[float, tuple[float, float]]] = field(default_factory=dict)
    """``op_key`` (at the captured shapes) → {batch scale: (forward s, backward s)}: the same op measured in the
    model captured at another batch size (scale = that batch / the captured one). A micro-batch between two
    measured sizes is priced from them (``measured_points``), not from the roofline's ratio."""

    def __post_init__(self) -> None:
        for key, (fwd, bwd) in self.entries.items():
            if not (fwd >= 0 and bwd >= 0):
                raise ValueError(f"calibration entry {key!r}: negative time ({fwd}, {bwd})")
        for key, points in self.batch_entries.items():
            for scale, (fwd, bwd) in points.items():
                if not (scale > 0 and fwd >= 0 and bwd >= 0):
                    raise ValueError(f"calibration entry {key!r} at batch scale {scale}: bad value ({fwd}, {bwd})")

    def measured_points(self, op: Op, dtype: str | None = None) -> tuple[tuple[float, float, float], ...]:
        """(batch scale, forward_s, backward_s) measured for ``op`` with its floats in ``dtype`` (None: as captured),
        by scale: 1.0 (the captured shapes) and every other batch it was profiled at; empty when the op was not
        measured. Keys carry the dtypes the op ran in, so an fp32 measurement never prices bf16 training.

        Example:
            >>> from autopar.graph.ir import OpClass
            >>> a = TensorMeta(shape=(4, 8), dtype="float32")
            >>> op = Op(name="mm", target="aten.mm.default", op_class=OpClass.MATMUL, inputs=(a, a),
            ...         input_ops=("x", None), input_params=(None, "w"), outputs=(a,), flops=1, nbytes_moved=1,
            ...         module_path="lin")
            >>> key = op_key_for(op)
            >>> t = CalibrationTable(device_name="cpu", torch_version="x", entries={key: (2e-6, 4e-6)},
            ...                      batch_entries={key: {4.0: (5e-6, 9e-6), 0.5: (1.5e-6, 3e-6)}})
            >>> t.measured_points(op)
            ((0.5, 1.5e-06, 3e-06), (1.0, 2e-06, 4e-06), (4.0, 5e-06, 9e-06))
        """
        key = op_key_for(op, dtype)
        at_captured = self.entries.get(key)
        if at_captured is None:
            return ()
        points = {1.0: at_captured, **self.batch_entries.get(key, {})}
        return tuple((scale, *points[scale]) for scale in sorted(points))

    def require_device(self, gpu_name: str) -> None:
        """Refuse to price a cluster of another device kind with this table.

        Raises:
            UserInputError: the table was measured on another kind of device; names both.

        Example:
            >>> CalibrationTable(device_name="NVIDIA H100 80GB HBM3", torch_version="2.5", entries={}
            ...                  ).require_device("H100-SXM5-80GB")
        """
        if device_kind(self.device_name) != device_kind(gpu_name):
            raise UserInputError(
                f"calibration table was measured on {self.device_name!r} but the cluster's GPU is {gpu_name!r}: "
                "its times do not apply there; profile on that kind of device, or plan without --calibration")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {"device_name": self.device_name, "torch_version": self.torch_version, "dtype": self.dtype,
                "entries": {k: [f, b] for k, (f, b) in sorted(self.entries.items())},
                "skipped": dict(sorted(self.skipped.items())),
                "batch_entries": {k: {repr(scale): [f, b] for scale, (f, b) in sorted(points.items())}
                                  for k, points in sorted(self.batch_entries.items())}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CalibrationTable:
        """Inverse of ``to_dict``."""
        try:
            entries = {str(k): (float(v[0]), float(v[1])) for k, v in data["entries"].items()}
            batch = {str(k): MappingProxyType({float(s): (float(v[0]), float(v[1])) for s, v in points.items()})
                     for k, points in data.get("batch_entries", {}).items()}  # absent in tables of one size
            return cls(device_name=str(data["device_name"]), torch_version=str(data["torch_version"]),
                       entries=MappingProxyType(entries), skipped=MappingProxyType(dict(data.get("skipped", {}))),
                       dtype=data.get("dtype"), batch_entries=MappingProxyType(batch))
        except (KeyError, TypeError, IndexError, ValueError, AttributeError) as e:  # AttributeError: not a mapping
            raise UserInputError(f"calibration table is malformed: {type(e).__name__}: {e}") from e

    def save(self, path: str | Path) -> None:
        """Write (or replace) this table in the JSON file at ``path``, keeping other devices' tables."""
        path = Path(path)
        tables: dict[str, Any] = {}
        if path.exists():
            tables = dict(_read_file(path))
        tables[table_id(self.device_name, self.torch_version)] = self.to_dict()
        from autopar._io import write_atomic  # temporary file and rename: an interrupt leaves the old table

        write_atomic(path, json.dumps({"format": CALIBRATION_FORMAT, "tables": tables}, indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path, *, device_name: str | None = None,
             torch_version: str | None = None) -> CalibrationTable:
        """Read the table for ``device_name``/``torch_version`` (either may be omitted if it is unambiguous).

        Raises:
            UserInputError: unreadable or malformed file, or no (or more than one) matching table.
        """
        tables = _read_file(Path(path))
        matches = [t for t in tables.values()
                   if (device_name is None or t.get("device_name") == device_name)
                   and (torch_version is None or t.get("torch_version") == torch_version)]
        if len(matches) != 1:
            raise UserInputError(
                f"calibration file {path} has {len(matches)} tables for device={device_name!r} "
                f"torch={torch_version!r}; it holds: {sorted(tables)}")
        return cls.from_dict(matches[0])


def _read_file(path: Path) -> Mapping[str, Mapping[str, Any]]:
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise UserInputError(f"cannot read calibration file {path}: {e.strerror}") from e
    except json.JSONDecodeError as e:
        raise UserInputError(f"calibration file {path} is not valid JSON: {e}") from e
    if not isinstance(data, Mapping) or data.get("format") != CALIBRATION_FORMAT:
        raise UserInputError(f"calibration file {path} is not format {CALIBRATION_FORMAT} "
                             f"(found {data.get('format') if isinstance(data, Mapping) else type(data).__name__!r})")
    tables = data.get("tables")
    if not isinstance(tables, Mapping):
        raise UserInputError(f"calibration file {path} has no 'tables' mapping")
    return tables


__all__ = ["CALIBRATION_FORMAT", "CalibrationTable", "FLOAT_DTYPES", "cast_float_inputs", "device_kind", "op_key",
           "op_key_for", "table_id"]
