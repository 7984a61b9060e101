"""Module tricks: callable modules, and lazily imported package attributes.

Callable modules: ``autopar.capture(...)`` and ``autopar.plan(...)`` work after their submodules load.

``autopar/capture/`` and ``autopar/plan.py`` share their names with the functions the package
exports. Importing a submodule binds it as an attribute of ``autopar``, shadowing the function;
making the module callable forwards the call to the function, so both spellings keep working.
"""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Callable, Mapping
from typing import Any


def make_callable(module_name: str, target: str) -> None:
    """Let ``sys.modules[module_name](...)`` call ``target`` (``"package.module:function"``), imported lazily."""
    where, func = target.split(":")

    class _CallableModule(types.ModuleType):
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            return getattr(importlib.import_module(where), func)(*args, **kwargs)

    sys.modules[module_name].__class__ = _CallableModule


def lazy_attributes(module_name: str, names: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """PEP 562 ``__getattr__``/``__dir__`` for a package that imports heavy names on first use.

    Args:
        module_name: the package's ``__name__``.
        names: public name → module that defines it.

    Returns:
        ``(__getattr__, __dir__)`` to assign in the package.
    """
    def __getattr__(name: str) -> Any:
        where = names.get(name)
        if where is None:
            raise AttributeError(f"module {module_name!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(where), name)
        setattr(sys.modules[module_name], name, value)  # later lookups skip this function
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[module_name])) | set(names))

    return __getattr__, __dir__
