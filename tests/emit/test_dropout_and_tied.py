"""Dropout under tensor parallelism, and a tied-weight checkpoint moving between layouts (GPT-2, planned)."""

from __future__ import annotations

import pytest
from tests.emit.harness import run_spmd

pytestmark = pytest.mark.multiproc


def test_dropout_masks_agree_across_tp_ranks_and_a_seed_replays_them() -> None:
    results = run_spmd("tests.emit.matrix_workers:check_dropout", 2)
    first, second = results
    assert first["sharded_weights"] > 0 and second["sharded_weights"] > 0  # TP really split GPT-2
    for r in results:
        assert r["runs"][0] == r["runs"][1]  # one seed, the same losses run after run
        assert r["runs"][0] != pytest.approx(r["no_dropout_losses"], abs=1e-4)  # dropout was on
    assert first["runs"] == second["runs"]
    masks0, masks1 = first["replicated_masks"], second["replicated_masks"]
    assert masks0 and masks0.keys() == masks1.keys()
    assert any(any(m) for m in masks0.values())  # some elements were dropped
    for name in masks0:  # a replicated activation got the same mask on both TP ranks
        assert masks0[name] == masks1[name], name
    sharded0, sharded1 = first["sharded_masks"], second["sharded_masks"]
    assert sharded0 and sharded0.keys() == sharded1.keys()  # GPT-2's attention dropout, on head shards
    for name in sharded0:  # shards of one activation got independent masks
        assert sharded0[name] != sharded1[name], name


@pytest.mark.parametrize(("first", "second"), [("tp2_pp2_1f1b", "dp2_tp2_sp"), ("zero3_dp2_pp2", "tp2_pp2_1f1b")])
def test_tied_checkpoint_resumes_under_another_layout(first: str, second: str) -> None:
    for r in run_spmd("tests.emit.matrix_workers:check_tied_resume", 4, first, second):
        assert r["losses"] == pytest.approx(r["ref_losses"], abs=1e-5), r["plans"]
        assert r["max_diff"] < 1e-5
