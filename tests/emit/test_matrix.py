"""32 Hugging Face architectures × 4 layouts on 4 gloo ranks: the emitted program trains like the original.

Each architecture (tiny config, ``zoo.py``) is planned by autopar's planner on the
slow-compute test cluster under four pinned layouts: TP2×PP2 with 1F1B, with and
without sequence parallelism (with it, the stages exchange sequence shards), DP2×TP2
with sequence parallelism, and ZeRO-3 DP2×PP2. The planner chooses the stage
split and the shardings. Three SGD-with-momentum steps under ``autopar.parallelize``
must give the single-process losses within 1e-5 and parameters within 1e-5 (relative
above 1), and under TP the attention and MLP weights must really be sharded DTensors.

A combination autopar cannot emit must be refused with an autopar error before
any process-group work; ``REFUSED`` lists those, with the message each must carry.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests.emit.harness import run_spmd
from tests.emit.matrix_workers import LAYOUTS
from tests.emit.zoo import ARCHS

pytestmark = pytest.mark.multiproc

TOL = 1e-5

ATTENTION = ("attn", "attention", "SelfAttention", "EncDecAttention")
"""Module-path fragments of attention weights across the families."""
MLP = ("mlp", "fc1", "fc_in", "intermediate", "DenseReluDense", "dense_h_to_4h", "c_fc")
"""Module-path fragments of MLP weights across the families."""

REFUSED: dict[tuple[str, str], str] = {}
"""(architecture, layout) → regex the refusal must match: what autopar cannot emit, and why."""

def _check_layout(arch: str, layout: str, per_rank: list[dict[str, Any]]) -> None:
    expected = REFUSED.get((arch, layout))
    if expected is not None:
        for got in per_rank:
            assert "refused" in got, f"{arch} {layout} now runs: remove it from REFUSED"
            assert re.search(expected, got["refused"]), got["refused"]
        return
    assert "refused" not in per_rank[0], per_rank[0].get("refused")
    for rank, got in enumerate(per_rank):
        assert got["losses"] == pytest.approx(got["ref_losses"], abs=TOL), (arch, layout, rank)
        assert got["max_diff"] < TOL, (arch, layout, rank, got["max_diff"])
    assert abs(per_rank[0]["ref_losses"][-1] - per_rank[0]["ref_losses"][0]) > 100 * TOL  # it really trained
    covered = set().union(*(r["keys"] for r in per_rank))
    missing = [names for names in per_rank[0]["ref_groups"] if not covered & set(names)]
    assert not missing, f"parameters on no rank: {missing}"
    if LAYOUTS[layout]["tp"] > 1:
        sharded = set().union(*(r["tp_sharded"] for r in per_rank))
        assert any(f in name for name in sharded for f in ATTENTION), (arch, layout, sorted(sharded))
        assert any(f in name for name in sharded for f in MLP), (arch, layout, sorted(sharded))
        experts = {name for names in per_rank[0]["ref_groups"] for name in names if ".experts." in name}
        assert experts <= sharded, (arch, layout, sorted(experts - sharded))  # an MoE's routed experts split too
    if LAYOUTS[layout]["pp"] > 1:
        assert len(per_rank[0]["stages"]) == 2


@pytest.mark.parametrize("arch", list(ARCHS))
def test_architecture_matrix(arch: str) -> None:
    layouts = list(LAYOUTS)
    results = run_spmd("tests.emit.matrix_workers:check_arch", 4, arch, layouts, timeout_s=600)
    for layout in layouts:
        _check_layout(arch, layout, [r[layout] for r in results])
    _check_sequence_boundaries([r["tp2_pp2_1f1b"] for r in results], [r["tp2_pp2_sp"] for r in results])


def _check_sequence_boundaries(whole: list[dict[str, Any]], sp: list[dict[str, Any]]) -> None:
    """Under SP the stages exchange sequence shards: each receive buffer (activation or gradient) of the
    TP2×PP2 run is there, with the floating ``[batch, seq, hidden]`` ones' even sequence halved (an odd one,
    ViT's 17 tokens, travels whole); ids and masks are unchanged."""
    assert sp[0]["stages"] == whole[0]["stages"], "the two layouts split the model differently: compare per stage"

    def halved(shape: list[int], dtype: str) -> list[Any]:
        split = dtype.startswith("torch.float") and len(shape) == 3 and shape[1] % 2 == 0
        return [[shape[0], shape[1] // 2, *shape[2:]] if split else shape, dtype]

    expected = [[[halved(*b) for b in stage] for stage in r["received"]] for r in whole]
    assert [r["received"] for r in sp] == expected
    assert any(b for r in whole for stage in r["received"] for b in stage)
