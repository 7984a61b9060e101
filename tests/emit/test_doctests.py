"""The examples in the emitter's docstrings run and give what they show."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = ["autopar.emit.mesh", "autopar.emit.dp", "autopar.emit.tp", "autopar.emit.program", "autopar.emit.runtime",
           "tests.emit.plans"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
    assert result.attempted > 0, f"{name} has no examples"
