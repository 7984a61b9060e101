"""The examples in the solvers' docstrings run and give what they show."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = ["bottlenecks", "pipeline.stage_dp", "pipeline.runs", "sharding.sharding_problem", "sharding.sharding_ilp",
           "oracles", "sharding.placement",
           "sharding.view_rules", "sharding.op_rules", "sharding.op_strategies", "sharding.layer_graph",
           "sharding.layer_result", "sharding.strategies"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(f"autopar.solvers.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
    if name not in ("sharding.strategies",):
        assert result.attempted > 0, f"{name} has no examples"
