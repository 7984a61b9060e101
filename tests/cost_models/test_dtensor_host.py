"""DTensor host terms of a tensor-parallel stage (``cost_models/dtensor_host.py``) and where pricing adds them."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from autopar.cost_models.cluster import Cluster, list_presets
from autopar.cost_models.dtensor_host import REDUCING_COLLECTIVES, tp_hook_sites
from autopar.graph.ir import OpGraph
from autopar.layout import Recompute
from autopar.pricing import LayerPricer
from tests.cost_models.conftest import block

H100 = Cluster.preset("dgx-h100")
LOCAL2 = Cluster.from_yaml(Path(__file__).parent / "data" / "local2_gloo.yaml")
"""2 gloo ranks of a CPU measured without the host terms: the ILP splits a block there (collectives issued)."""
OP_S, OP_BWD_S, COLL_S, HOOK_S, HOOK_BWD_S = 1e-4, 3e-4, 7e-4, 2e-4, 5e-4


def _host_cluster(cluster: Cluster = H100) -> Cluster:
    gpu = dataclasses.replace(cluster.gpu, dtensor_op_s=OP_S, dtensor_backward_op_s=OP_BWD_S,
                              dtensor_collective_s=COLL_S, dtensor_hook_s=HOOK_S, dtensor_hook_backward_s=HOOK_BWD_S)
    return dataclasses.replace(cluster, gpu=gpu)


def test_hook_sites_are_the_emitters_f_wraps(gpt_unfused: OpGraph) -> None:
    """A GPT block wraps its attention and its MLP (the two children holding projections), not its norms; the
    head layer (``ln_f+lm_head``) wraps the LM head; the embedding reads integer ids and wraps nothing."""
    by_path = {layer.module_path: layer for layer in gpt_unfused.layers}
    assert tp_hook_sites(block(gpt_unfused)) == 2
    assert tp_hook_sites(by_path["ln_f+lm_head"]) == 1
    assert tp_hook_sites(gpt_unfused.layers[0]) == 0


@pytest.mark.parametrize("sequence_parallel", [False, True])
@pytest.mark.parametrize("recompute", [Recompute.NONE, Recompute.FULL])
def test_pricing_adds_each_host_term_once_per_site(gpt_unfused: OpGraph, sequence_parallel: bool,
                                                   recompute: Recompute) -> None:
    """A block at tp 2 costs, over the same block on a GPU without host terms: n ops · (δ, δ_b); per collective
    the ILP issues, δ_c; per f (2 children without SP, none with it, plus one per forward reduction) (δ_f, δ_fb);
    full recompute re-runs the forward's ops, collectives and wraps in backward."""
    layer = block(gpt_unfused)
    base, host = (LayerPricer(gpt_unfused, c, dtype="float32") for c in (LOCAL2, _host_cluster(LOCAL2)))
    cost0, cost = (p._kind_cost(layer, 2, sequence_parallel, 2, recompute) for p in (base, host))
    sharding = host._sharding(layer.kind, 2, sequence_parallel)
    n_fwd, n_bwd = len(sharding.forward_collectives), len(sharding.backward_collectives)
    hooks = (0 if sequence_parallel else 2) + sum(k in REDUCING_COLLECTIVES for k, _ in sharding.forward_collectives)
    assert hooks >= 1 and n_fwd >= 1  # a split block reduces its row-split output at least once
    fwd = len(layer.ops) * OP_S + n_fwd * COLL_S + hooks * HOOK_S
    bwd = len(layer.ops) * OP_BWD_S + n_bwd * COLL_S + hooks * HOOK_BWD_S
    if recompute is Recompute.FULL:
        bwd += fwd
    assert cost.forward_s - cost0.forward_s == pytest.approx(fwd, rel=1e-9)
    assert cost.backward_s - cost0.backward_s == pytest.approx(bwd, rel=1e-9)
    assert cost.tp_comm_s - cost0.tp_comm_s == pytest.approx(
        (n_fwd + n_bwd + (n_fwd if recompute is Recompute.FULL else 0)) * COLL_S, rel=1e-9)


def test_host_terms_are_absent_at_tp1_and_on_gpu_presets(gpt_unfused: OpGraph) -> None:
    layer = block(gpt_unfused)
    host = LayerPricer(gpt_unfused, _host_cluster())._kind_cost(layer, 1, False, 2, Recompute.NONE)
    assert host == LayerPricer(gpt_unfused, H100)._kind_cost(layer, 1, False, 2, Recompute.NONE)
    for name in list_presets():
        gpu = Cluster.preset(name).gpu
        assert (gpu.dtensor_op_s, gpu.dtensor_collective_s, gpu.dtensor_hook_s, gpu.dtensor_hook_backward_s) == (0,) * 4
