"""The errors autopar raises. Each names what is wrong and what to do about it.

The CLI maps them to exit codes (see ``autopar/cli.py``); nothing else escapes it.
"""

from __future__ import annotations


class AutoparError(Exception):
    """Base class of every error autopar raises on purpose."""


class CaptureError(AutoparError):
    """A model could not be captured into an ``OpGraph``; names the module/op that failed."""


class InfeasiblePlanError(AutoparError):
    """No plan fits the cluster's memory; says what would fit and which memory term dominates."""


class PlanValidationError(AutoparError, ValueError):
    """Contradictory pins, or a plan file that is corrupt, of another schema, or for another model."""


class ClusterSpecError(AutoparError, ValueError):
    """A cluster description (preset name or YAML file) is invalid; names the offending key."""


class UserInputError(AutoparError, ValueError):
    """Any other bad user input: a model spec that does not import, a factory that raises, bad flags."""


class ExportError(UserInputError):
    """A plan uses a feature the target library cannot express; says which and what to do instead."""


class CheckpointError(UserInputError):
    """A checkpoint is missing, incomplete, corrupt or truncated, or cannot resume this run; names the file.

    Raised on every rank alike (the ranks agree on the verdict before raising), so a
    launcher reports it once, from rank 0.
    """


__all__ = [
    "AutoparError",
    "CaptureError",
    "InfeasiblePlanError",
    "PlanValidationError",
    "ClusterSpecError",
    "UserInputError",
    "ExportError",
    "CheckpointError",
]
