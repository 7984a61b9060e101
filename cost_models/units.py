"""Quantities with units, as people write them in cluster files: ``"80 GiB"``, ``"400 Gb/s"``, ``"3 us"``.

Cluster presets and user YAML files quote data sheets, which mix decimal and
binary prefixes and bits and bytes. Every such value is parsed here into one SI
base unit (bytes, bytes per second, FLOP per second, seconds), and a unit from
the wrong family (a bandwidth where a size belongs) is refused with the key that
holds it. Plain numbers are taken as already in the base unit.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

from autopar._compat import StrEnum
from autopar.errors import ClusterSpecError


class UnitKind(StrEnum):
    """The family a quantity belongs to; each has one SI base unit."""

    BYTES = "bytes"  # B
    BYTES_PER_S = "bytes_per_s"  # B/s
    FLOPS_PER_S = "flops_per_s"  # FLOP/s
    SECONDS = "seconds"  # s


_DECIMAL = {"": 1.0, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15}
_BINARY = {"Ki": 2.0**10, "Mi": 2.0**20, "Gi": 2.0**30, "Ti": 2.0**40}
BITS_PER_BYTE = 8
"""Network data sheets quote bits per second (Gb/s, Gbps); memory ones bytes per second."""


def _unit_table() -> Mapping[str, tuple[UnitKind, float]]:
    table: dict[str, tuple[UnitKind, float]] = {}
    for prefix, scale in {**_DECIMAL, **_BINARY}.items():
        table[f"{prefix}B"] = (UnitKind.BYTES, scale)
        table[f"{prefix}B/s"] = (UnitKind.BYTES_PER_S, scale)
    for prefix, scale in _DECIMAL.items():
        table[f"{prefix}b/s"] = (UnitKind.BYTES_PER_S, scale / BITS_PER_BYTE)
        table[f"{prefix}bps"] = (UnitKind.BYTES_PER_S, scale / BITS_PER_BYTE)
        table[f"{prefix}FLOP/s"] = (UnitKind.FLOPS_PER_S, scale)
        table[f"{prefix}FLOPS"] = (UnitKind.FLOPS_PER_S, scale)
    table.update({"s": (UnitKind.SECONDS, 1.0), "ms": (UnitKind.SECONDS, 1e-3),
                  "us": (UnitKind.SECONDS, 1e-6), "µs": (UnitKind.SECONDS, 1e-6),
                  "ns": (UnitKind.SECONDS, 1e-9)})
    return table


_UNITS = _unit_table()
_QUANTITY = re.compile(r"^\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*([A-Za-zµ/]*)\s*$")


def parse_quantity(value: object, kind: UnitKind, *, key: str) -> float:
    """A number in the base unit of ``kind`` from a plain number or a ``"<number> <unit>"`` string.

    Args:
        value: e.g. ``80``, ``"80 GiB"``, ``"400 Gb/s"``, ``"989.4 TFLOP/s"``, ``"2.7 us"``.
        kind: the family the key holds.
        key: dotted key path, named in errors.

    Returns:
        The value in bytes, bytes/s, FLOP/s or seconds.

    Raises:
        ClusterSpecError: not a number, an unknown unit, or a unit of another family.

    Example:
        >>> parse_quantity("400 Gb/s", UnitKind.BYTES_PER_S, key="inter_node.bytes_per_s")
        50000000000.0
        >>> parse_quantity("2 GiB", UnitKind.BYTES, key="gpu.mem_bytes")
        2147483648.0
    """
    if isinstance(value, bool):
        raise ClusterSpecError(f"{key}: expected a {kind.value} quantity, got the boolean {value!r}")
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        number = _parse_text(value, kind, key=key)
    else:
        raise ClusterSpecError(f"{key}: expected a number or a '<number> <unit>' string, got {value!r}")
    if not math.isfinite(number):
        raise ClusterSpecError(f"{key}: {value!r} is not a finite number")
    return number


def _parse_text(text: str, kind: UnitKind, *, key: str) -> float:
    match = _QUANTITY.match(text)
    if match is None:
        raise ClusterSpecError(f"{key}: cannot read {text!r} as '<number> <unit>' (e.g. '80 GiB', '400 Gb/s')")
    number, unit = float(match.group(1)), match.group(2)
    if not unit:
        return number
    if unit not in _UNITS:
        raise ClusterSpecError(f"{key}: unknown unit {unit!r} in {text!r}")
    unit_kind, scale = _UNITS[unit]
    if unit_kind is not kind:
        raise ClusterSpecError(f"{key}: {text!r} is a {unit_kind.value} quantity but {key} holds {kind.value}")
    return number * scale


def format_bytes(nbytes: float) -> str:
    """Bytes as a short binary-prefixed string.

    Example:
        >>> format_bytes(80 * 2**30)
        '80.0 GiB'
    """
    for unit, scale in (("TiB", 2.0**40), ("GiB", 2.0**30), ("MiB", 2.0**20), ("KiB", 2.0**10)):
        if abs(nbytes) >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes:.0f} B"


__all__ = ["BITS_PER_BYTE", "UnitKind", "format_bytes", "parse_quantity"]
