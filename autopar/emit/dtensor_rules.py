"""DTensor sharding rules for ATen ops that torch registers none for, but that exported programs contain.

The exported program is run on DTensors (``autopar.emit.tp``); an op without a
sharding rule would stop it. ``register_rules`` adds the missing ones through
``torch.distributed.tensor.experimental.register_sharding`` (it never overrides
an op DTensor already handles):

- ``_scaled_dot_product_flash_attention_for_cpu`` (+ backward): what
  ``F.scaled_dot_product_attention`` becomes when exported on CPU. Like the CUDA
  flash kernel (which DTensor supports), it is exact when query, key, value,
  output and log-sum-exp are all sharded on the heads dim (1), or all replicated.

``register_program_rules`` adds rules for ops a program contains that come from
other libraries (registered only once those libraries are imported):

- ``transformers::grouped_mm_fallback`` (+ backward): the routed experts' grouped
  GEMM, input (S, K) × weight (E, K, N) → (S, N). Each expert's matmul splits like
  a Linear: on N (weight and output sharded, input replicated) or on K (input and
  weight sharded, output partial); never on S or E, which the group ends couple.

``split_at_seams`` (see ``keep_fused_splits_sharded``) cuts a fused projection's
output, strided-sharded over its k parts, into k plainly sharded pieces.
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


GROUPED_MM = "transformers::grouped_mm_fallback"
"""Hugging Face's grouped GEMM for MoE experts (``transformers.integrations.moe``)."""


def register_program_rules(graph_modules: Any) -> list[str]:
    """Register the rules of this module for the library ops the program contains; return their names."""
    import torch

    ops = {str(n.target._schema.name) for gm in graph_modules for n in gm.graph.nodes
           if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)}
    if GROUPED_MM in ops:
        _register_grouped_mm()
        return [GROUPED_MM, f"{GROUPED_MM}_backward"]
    return []


@functools.cache
def _register_grouped_mm() -> None:
    """Single-dim strategies (outputs first, then inputs), filled by DTensor with the shard kind its inputs
    carry: a plain ``Shard`` or the ``_StridedShard`` of a fused gate/up weight."""
    import torch
    from torch.distributed.tensor import Partial, Replicate
    from torch.distributed.tensor._ops.single_dim_strategy import (
        _ShardingPlaceholder as S,
        register_single_dim_strategy,
    )

    ops = torch.ops.transformers

    @register_single_dim_strategy(ops.grouped_mm_fallback.default)
    def _forward(op: Any, args: Any, kwargs: Any) -> list[list[Any]]:
        # (out, input, weight, offs): split N (column) or K (row: partial out)
        return [[S(1), Replicate(), S(2), Replicate()], [Partial(), S(1), S(1), Replicate()]]

    @register_single_dim_strategy(ops.grouped_mm_fallback_backward.default)
    def _backward(op: Any, args: Any, kwargs: Any) -> list[list[Any]]:
        # (grad_input, grad_weight, input, weight, offs, grad_output)
        column = [Partial(), S(2), Replicate(), S(2), Replicate(), S(1)]
        row = [S(1), S(1), S(1), S(1), Replicate(), Replicate()]
        return [column, row]


def keep_fused_splits_sharded(graph_modules: Any) -> int:
    """Run every ``split``/``chunk`` of the program through ``split_at_seams``; return how many were rewritten."""
    import torch
    import torch.fx as fx

    aten = torch.ops.aten
    targets = {aten.split.Tensor: split_at_seams, aten.split_with_sizes.default: split_at_seams,
               aten.chunk.default: chunk_at_seams}
    count = 0
    for gm in graph_modules:
        before = count
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target in targets:
                node.target = targets[node.target]
                count += 1
        if count > before:  # the code that runs the graph: the module's own, or an InterpreterModule's
            for owner in (gm, getattr(gm, "graph_module", None)):
                if isinstance(owner, fx.GraphModule) and owner.graph is gm.graph:
                    owner.recompile()
    return count


def split_at_seams(x: Any, split_size: Any, dim: int = 0) -> Any:
    """``aten.split`` (an int size or a list of sizes) that keeps a fused projection's pieces sharded.

    DTensor gathers a tensor sharded on the split dim before splitting it. A
    fused projection (gate/up, q/k/v) whose weight is strided-sharded over its k
    parts (``_StridedShard(dim, split_factor=k)``: each rank holds its slice of
    every part) yields an output laid out alike, and cutting it into its k equal
    parts is local: each rank cuts its own slice, and each piece is a plain
    ``Shard(dim)``. Anything else runs the ATen op.
    """
    import torch

    pieces = _strided_pieces(x, split_size, dim)
    if pieces is not None:
        return pieces
    if isinstance(split_size, int):
        return torch.ops.aten.split.Tensor(x, split_size, dim)
    return torch.ops.aten.split_with_sizes.default(x, split_size, dim)


def chunk_at_seams(x: Any, chunks: int, dim: int = 0) -> Any:
    """``aten.chunk`` through ``split_at_seams`` (chunks of ``ceil(size / chunks)``, as ``torch.chunk`` cuts)."""
    import torch

    size = x.shape[dim % x.dim()]
    pieces = _strided_pieces(x, -(-size // chunks), dim) if chunks > 0 and size else None
    return pieces if pieces is not None else torch.ops.aten.chunk.default(x, chunks, dim)


def _strided_pieces(x: Any, split_size: Any, dim: int) -> tuple[Any, ...] | None:
    import torch
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    if not isinstance(x, DTensor):
        return None
    dim = dim % x.dim()
    n = x.shape[dim]
    sizes = [split_size] * (n // split_size) + ([n % split_size] if n % split_size else []) \
        if isinstance(split_size, int) else list(split_size)
    axes = [i for i, p in enumerate(x.placements) if isinstance(p, (Shard, _StridedShard)) and p.dim == dim]
    if len(sizes) < 2 or len(set(sizes)) != 1 or len(axes) != 1:
        return None
    strided = x.placements[axes[0]]
    if not isinstance(strided, _StridedShard) or strided.split_factor != len(sizes) \
            or sizes[0] % x.device_mesh.size(axes[0]):
        return None
    local = x.to_local()
    placements = [Shard(dim) if i == axes[0] else p for i, p in enumerate(x.placements)]
    shape = list(x.shape)
    shape[dim] = sizes[0]
    return tuple(DTensor.from_local(t, x.device_mesh, placements, run_check=False, shape=torch.Size(shape),
                                    stride=x.stride())
                 for t in local.split(local.shape[dim] // len(sizes), dim))

