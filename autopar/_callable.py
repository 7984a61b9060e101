"""Callable modules: ``autopar.capture(...)`` and ``autopar.plan(...)`` work after their submodules load.

``autopar/capture/`` and ``autopar/plan.py`` share their names with the functions the package
exports. Importing a submodule binds it as an attribute of ``autopar``, shadowing the function;
making the module callable forwards the call to the function, so both spellings keep working.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any


def make_callable(module_name: str, target: str) -> None:
    """Let ``sys.modules[module_name](...)`` call ``target`` (``"package.module:function"``), imported lazily."""
    where, func = target.split(":")

    class _CallableModule(types.ModuleType):
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            return getattr(importlib.import_module(where), func)(*args, **kwargs)

    sys.modules[module_name].__class__ = _CallableModule
