"""The TP collectives the planner prices are the ones the emitted program issues (single process, recorded).

``python bench/tp_collectives.py`` runs plan_regret's GPT (4 × 128, V 2048, seq 128) at dp1 tp2 pp1,
one micro-batch of 8, fp32, planned on this machine's 2 gloo ranks (``data/local2_gloo.yaml``, measured
by that bench), for one training step on 2 ranks and logs every c10d collective. ``ISSUED`` is what it
printed for rank 0's forward and backward. This test prices the same plan in one process and checks the
sharding ILP charges exactly those collectives, so a change of the pricing (or of the ILP's choice) that
makes them diverge fails here. The emitter side is checked by re-running the bench (2 ranks, ~1 min).

Not recorded here: the runtime's one scalar all-reduce of the loss per step (not a layer's collective)
and the cases that still diverge (sequence parallelism, the Llama model; docs/cost-model-fidelity.md).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch

import autopar
from autopar.cost_models.cluster import Cluster
from autopar.examples.gpt import GPT, GPTConfig
from autopar.plan import TPStyle
from autopar.pricing import LayerPricer

LOCAL2 = Path(__file__).parent / "data" / "local2_gloo.yaml"
MICRO_BATCH = 8
ISSUED = {  # (phase, kind, bytes as NCCL counts them) -> calls per step, bench/tp_collectives.py on 2 gloo ranks
    ("forward", "all_reduce", 524_288): 8,  # attn.c_proj and mlp.c_proj of 4 blocks (rowwise outputs)
    ("forward", "all_gather", 8_388_608): 1,  # the vocabulary-split logits, gathered for the loss (8 × 128 × 2048 × 4 B)
    ("backward", "all_reduce", 524_288): 9,  # ln_1, ln_2 inputs' gradients of 4 blocks and ln_f's (NativeLayerNormBackward0)
}
STYLES = {"attn.q_proj": TPStyle.COLWISE, "attn.k_proj": TPStyle.COLWISE, "attn.v_proj": TPStyle.COLWISE,
          "attn.c_proj": TPStyle.ROWWISE, "mlp.c_fc": TPStyle.COLWISE, "mlp.c_proj": TPStyle.ROWWISE}
"""The blocks' sharding the recording ran (the ILP's choice on ``LOCAL2``)."""


def _priced(pricing: LayerPricer, graph: autopar.OpGraph) -> Counter[tuple[str, str, int]]:
    scale = MICRO_BATCH // graph.batch_size
    out: Counter[tuple[str, str, int]] = Counter()
    for layer in graph.layers:
        result = pricing._sharding(layer.kind, 2, False)
        for phase, calls in (("forward", result.forward_collectives), ("backward", result.backward_collectives)):
            out.update((phase, kind, nbytes * scale) for kind, nbytes in calls)
    return out


def test_gpt_tp2_prices_the_collectives_the_emitted_program_issues() -> None:
    with torch.device("meta"):
        model = GPT(GPTConfig(n_layer=4, n_embd=128, n_head=4, vocab_size=2048, block_size=128, dropout=0.0))
    graph = autopar.capture(model, (torch.zeros(2, 128, dtype=torch.long, device="meta"),))
    pricing = LayerPricer(graph, Cluster.from_yaml(LOCAL2), dtype="float32")
    block = graph.layers[1].kind
    assert dict(pricing._sharding(block, 2, False).modules) == STYLES, "the ILP chose another sharding: re-record"
    assert _priced(pricing, graph) == Counter(ISSUED)
