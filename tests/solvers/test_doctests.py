"""The examples in the solvers' docstrings run and give what they show."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = ["stage_dp", "sharding_problem", "sharding_ilp", "oracles", "placement", "view_rules",
           "op_rules", "op_strategies", "layer_graph", "layer_result", "strategies"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(f"autopar.solvers.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
    if name not in ("strategies",):
        assert result.attempted > 0, f"{name} has no examples"
