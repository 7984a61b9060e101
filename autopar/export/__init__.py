"""Writing a plan as another training library's configuration.

    result = export_plan(plan, ExportTarget.MEGATRON)
    print(result.text)             # the main output
    for name, text in result.extras.items(): ...   # files the target also reads

A plan feature the target cannot express raises ``ExportError`` (a ``UserInputError``)
naming the feature and what to do; nothing is dropped silently.
"""

from __future__ import annotations

from autopar.export.base import ExportError, ExportResult, ExportTarget
from autopar.plan import Plan


def export_plan(plan: Plan, target: ExportTarget | str) -> ExportResult:
    """Write ``plan`` for ``target`` (``megatron``, ``deepspeed``, ``torchtitan`` or ``json``).

    Args:
        plan: the plan.
        target: the library.

    Returns:
        The main text, its suffix, extra files and notes.

    Raises:
        ExportError: unknown target, or a plan feature the target cannot express.
    """
    try:
        kind = ExportTarget(target)
    except ValueError as e:
        choices = ", ".join(t.value for t in ExportTarget)
        raise ExportError(f"unknown export target {target!r}; choose one of {choices}") from e
    match kind:
        case ExportTarget.MEGATRON:
            from autopar.export.megatron import export_megatron

            return export_megatron(plan)
        case ExportTarget.DEEPSPEED:
            from autopar.export.deepspeed import export_deepspeed

            return export_deepspeed(plan)
        case ExportTarget.TORCHTITAN:
            from autopar.export.torchtitan import export_torchtitan

            return export_torchtitan(plan)
        case ExportTarget.JSON:
            return ExportResult(target=kind, text=plan.to_json() + "\n", suffix=".json")
        case _:
            raise ExportError(f"unknown export target {kind!r}")


__all__ = ["ExportError", "ExportResult", "ExportTarget", "export_plan"]
