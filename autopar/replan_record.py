"""What a re-plan changed and why: the record a re-planned ``Plan`` carries (``Plan.replanned_from``).

A leaf module (no autopar imports) so that ``plan.py`` can name it without importing the re-planner.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplanRecord:
    """How a plan for the surviving cluster was derived from the plan that lost nodes."""

    previous_layout: str
    """``Layout.describe()`` of the plan before the failure."""
    previous_num_gpus_available: int
    """GPUs of the cluster before the failure."""
    lost_nodes: int
    """Nodes lost."""
    num_gpus_available: int
    """GPUs left."""
    previous_global_batch_size: int
    """Samples per step before."""
    global_batch_size: int
    """Samples per step now (the same whenever some layout on the survivors keeps it)."""
    changes: tuple[str, ...]
    """Layout knobs that changed, e.g. ``"dp 64 → 62"``."""
    reasons: tuple[str, ...]
    """Why: what forced each change and how the new plan compares with the old one."""
    method: str
    """How it was found: ``"contingency"`` (precomputed with the plan), ``"templates"`` or ``"search"``."""
    solve_time_s: float
    """Seconds the re-plan took."""

    def __post_init__(self) -> None:
        if self.lost_nodes < 1 or self.num_gpus_available < 1:
            raise ValueError(f"a re-plan loses at least one node and keeps at least one GPU, got "
                             f"lost_nodes={self.lost_nodes}, num_gpus_available={self.num_gpus_available}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ReplanRecord:
        """Inverse of the plan's JSON form (lists back to tuples)."""
        return cls(**{**data, "changes": tuple(data["changes"]), "reasons": tuple(data["reasons"])})


__all__ = ["ReplanRecord"]
