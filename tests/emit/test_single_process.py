"""``parallelize`` outside a distributed job: refused for several GPUs, run in-process for one."""

from __future__ import annotations

import pytest

from tests.emit.harness import run_spmd


@pytest.mark.multiproc
def test_outside_torchrun() -> None:
    (out,) = run_spmd("tests.emit.workers:check_outside_torchrun", 1, init_group=False)
    assert "torchrun --nproc-per-node 2" in out["refused"]
    for family in ("gpt", "llama"):
        got = out["equivalence"][family]
        assert got["losses"] == pytest.approx(got["ref_losses"], abs=1e-5)
        assert got["max_diff"] < 1e-5
        assert got["checkpointed"] == 4  # full recompute wraps every block
        assert got["param_types"] == ["Parameter"]
    assert "batch of 3 samples" in out["bad_batch"] and "global batch 8" in out["bad_batch"]
    for family, init in out["meta_init"].items():  # built on meta, materialised by the model's own initialiser
        assert 4.0 < init["loss"] < 6.0, family  # ~ ln(128) = 4.85 for small random weights
        assert init["std_ratio"] < 0.25, family  # the same init distribution as a real build
        assert init["buffers_equal"], family  # e.g. Llama's rotary inv_freq recomputed after to_empty
    assert out["meta_init"]["llama"]["num_buffers"] >= 1
