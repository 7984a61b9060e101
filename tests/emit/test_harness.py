"""The multi-process harness: many cases in one process group, each failure reported where it happened."""

from __future__ import annotations

import pytest

from tests.emit.harness import run_spmd_cases, values

pytestmark = pytest.mark.multiproc


def rank_times(x: int, fail_on_rank: int = -1) -> int:
    """A case body: this rank's number times ``x``, raising on rank ``fail_on_rank``."""
    import torch.distributed as dist

    if dist.get_rank() == fail_on_rank:
        raise ValueError(f"case asked rank {fail_on_rank} to fail")
    return dist.get_rank() * x


def test_cases_share_a_group_and_a_failure_stops_the_rest() -> None:
    results = run_spmd_cases("tests.emit.test_harness:rank_times", 2,
                             [("first", (3,)), ("broken", (5, 1)), ("after", (7,))], timeout_s=120)
    assert values(results["first"], "first") == [0, 3]
    assert results["broken"][0] == ("ok", 0) and results["broken"][1][0] == "error"
    assert "case asked rank 1 to fail" in results["broken"][1][1]
    with pytest.raises(RuntimeError, match="rank 1 of 2: error"):
        values(results["broken"], "broken")
    assert [status for status, _ in results["after"]] == ["not run", "not run"]
    assert "broken" in results["after"][0][1]
