"""DTensor sharding rules for ATen ops that torch registers none for, but that exported programs contain.

The exported program is run on DTensors (``autopar.emit.tp``); an op without a
sharding rule would stop it. ``register_rules`` adds the missing ones through
``torch.distributed.tensor.experimental.register_sharding`` (it never overrides
an op DTensor already handles):

- ``_scaled_dot_product_flash_attention_for_cpu`` (+ backward): what
  ``F.scaled_dot_product_attention`` becomes when exported on CPU. Like the CUDA
  flash kernel (which DTensor supports), it is exact when query, key, value,
  output and log-sum-exp are all sharded on the heads dim (1), or all replicated.
"""

from __future__ import annotations

import functools
from typing import Any


@functools.cache
def register_rules() -> None:
    """Register the rules once per process."""
    import torch
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.experimental import register_sharding

    aten = torch.ops.aten

    def heads(*tensors: Any) -> list[Any]:
        return [Shard(1) if t is not None else None for t in tensors]

    @register_sharding(aten._scaled_dot_product_flash_attention_for_cpu.default)
    def _sdpa_cpu(query: Any, key: Any, value: Any, dropout_p: float = 0.0, is_causal: bool = False,
                  *, attn_mask: Any = None, scale: Any = None) -> list[Any]:
        rest = [None, None] + ([] if attn_mask is None else [Replicate()])
        replicated = ([Replicate(), Replicate()], [Replicate()] * 3 + rest)
        sharded = ([Shard(1), Shard(1)], heads(query, key, value) + rest)
        return [replicated, sharded]

    @register_sharding(aten._scaled_dot_product_flash_attention_for_cpu_backward.default)
    def _sdpa_cpu_backward(grad_out: Any, query: Any, key: Any, value: Any, out: Any, logsumexp: Any,
                           dropout_p: float, is_causal: bool, *, attn_mask: Any = None,
                           scale: Any = None) -> list[Any]:
        rest = [None, None] + ([] if attn_mask is None else [Replicate()])
        replicated = ([Replicate()] * 3, [Replicate()] * 6 + rest)
        sharded = ([Shard(1)] * 3, [Shard(1)] * 6 + rest)
        return [replicated, sharded]


def has_rule(op: Any) -> bool:
    """Whether DTensor can run ``op`` (a rule, a strategy, or a decomposition into ops that have one)."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._decompositions import DecompShardingStrategy

    prop = DTensor._op_dispatcher.sharding_propagator
    if op in prop.op_to_rules or op in prop.op_strategy_funcs or op in prop.op_single_dim_strategy_funcs:
        return True
    return bool(DecompShardingStrategy.has_decomp(op))


def replicate_unruled_ops(graph_modules: Any) -> list[str]:
    """Give every op of the program that DTensor has no rule for an all-replicated rule; return their names.

    Each rank then computes such an op on full (replicated) operands, the same
    result everywhere, so the program stays exact; it only forgoes splitting that
    op's work (e.g. Hugging Face's ``grouped_mm_fallback`` for MoE experts).
    """
    import torch
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.experimental import register_sharding

    added: list[str] = []
    ops = {n.target for gm in graph_modules for n in gm.graph.nodes
           if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)}
    for op in list(ops):  # a custom op's backward (``<name>_backward``) runs only in backward: add it now
        packet = getattr(getattr(torch.ops, op.namespace), f"{op._schema.name.split('::')[-1]}_backward", None)
        if packet is not None and getattr(packet, "default", None) is not None:
            ops.add(packet.default)
    for op in sorted(ops, key=str):
        if not has_rule(op):
            schema = op._schema
            outputs = [Replicate() for r in schema.returns]

            def rule(*args: Any, _outputs: list = outputs, **kwargs: Any) -> list[Any]:
                inputs = [Replicate() if hasattr(a, "shape") else None for a in args]
                return [(_outputs, inputs)]

            register_sharding(op)(rule)
            added.append(str(op))
    return added
