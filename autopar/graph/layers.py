"""Group a flat op sequence into layers and detect repeated layers by a structural hash.

A *block* is the shortest module path prefix that ends in a numeric component
(``blocks.3``, ``model.layers.17``, ``0`` in a Sequential): ops under it form one
layer. Runs of ops outside any block (embeddings, final norm, head) form layers
named after the top-level modules they touch. Two layers have the same ``kind``
when their ops, shapes, relative module paths, wiring and parameter shapes are
equal, so 80 identical transformer blocks are costed once.

A layer's boundary is what it reads from earlier layers, less what the emitted
program recomputes instead of sending (``input_only_sources``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Iterable, Mapping, Sequence

from autopar.graph.ir import Layer, Op, OpClass, ParamInfo, SavedTensor, TensorMeta

MAX_RECOMPUTED_NODES = 256
"""Largest input-only subgraph a later pipeline stage recomputes (``autopar.emit.program``); a larger one is sent."""

RANDOM_ATEN_OPS = frozenset({
    "_cudnn_attention_backward", "_cudnn_attention_forward", "_cudnn_init_dropout_state", "_cudnn_rnn",
    "_efficient_attention_forward", "_fill_mem_eff_dropout_mask_", "_flash_attention_forward",
    "_flash_attention_forward_no_dropout_inplace", "_fused_dropout", "_fused_sdp_choice", "_lstm_mps",
    "_nested_tensor_softmax_with_shape", "_sample_dirichlet", "_scaled_dot_product_attention_math",
    "_scaled_dot_product_attention_math_for_mps", "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_cudnn_attention_backward", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_efficient_attention_backward", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_fused_attention_overrideable",
    "_standard_gamma", "_triton_scaled_dot_attention", "alpha_dropout", "alpha_dropout_", "bernoulli", "bernoulli_",
    "binomial", "cauchy", "cauchy_", "dropout", "dropout_", "exponential", "exponential_", "feature_alpha_dropout",
    "feature_alpha_dropout_", "feature_dropout", "feature_dropout_", "geometric", "geometric_", "gru", "log_normal",
    "log_normal_", "lstm", "miopen_rnn", "multinomial", "native_dropout", "normal", "normal_", "normal_functional",
    "poisson", "rand", "rand_like", "randint", "randint_like", "randn", "randn_like", "random", "random_",
    "randperm", "rnn_relu", "rnn_tanh", "rrelu", "rrelu_", "rrelu_with_noise", "rrelu_with_noise_",
    "rrelu_with_noise_functional", "scaled_dot_product_attention", "uniform", "uniform_",
})
"""ATen op packets that draw random numbers: torch tags them ``nondeterministic_seeded``, the tag emit reads on
the exported program (a test checks this list against torch's tags). Their outputs are never recomputed."""


def block_prefix(module_path: str) -> str | None:
    """The block an op belongs to, or None outside repeated blocks.

    Example:
        >>> block_prefix("model.layers.7.self_attn.q_proj")
        'model.layers.7'
        >>> block_prefix("lm_head") is None
        True
    """
    parts = module_path.split(".") if module_path else []
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return None


def _group_key(op: Op) -> str:
    prefix = block_prefix(op.module_path)
    return prefix if prefix is not None else "<outside>"


def split_into_runs(ops: Sequence[Op]) -> list[list[Op]]:
    """Consecutive ops with the same block (or outside any block) form one run."""
    runs: list[list[Op]] = []
    current_key: str | None = None
    for op in ops:
        key = _group_key(op)
        if runs and key == current_key:
            runs[-1].append(op)
        else:
            runs.append([op])
            current_key = key
    return _merge_parameterless_runs(runs)


def _merge_parameterless_runs(runs: list[list[Op]]) -> list[list[Op]]:
    """Fold a run outside blocks that owns no parameters and does no arithmetic into a neighbour.

    Glue such as a reshape between blocks would otherwise become a layer of its own.
    """
    merged: list[list[Op]] = []
    for run in runs:
        glue = _group_key(run[0]) == "<outside>" and not any(p for op in run for p in op.input_params) \
            and sum(op.flops for op in run) == 0
        if glue and merged:
            merged[-1].extend(run)
        else:
            merged.append(run)
    if len(merged) > 1 and _group_key(merged[0][0]) == "<outside>" and not any(
            p for op in merged[0] for p in op.input_params) and sum(op.flops for op in merged[0]) == 0:
        merged[1] = merged[0] + merged[1]
        merged.pop(0)
    return merged


def _layer_path(run: Sequence[Op]) -> str:
    prefix = block_prefix(run[0].module_path)
    if prefix is not None:
        return prefix
    owners: list[str] = []
    for op in run:
        for p in op.input_params:
            if p is None:
                continue
            owner = p.rsplit(".", 1)[0] if "." in p else p
            if owner not in owners:
                owners.append(owner)
    return "+".join(owners) if owners else (run[0].module_path or "<root>")


def _relative(path: str, prefix: str) -> str:
    if prefix and (path == prefix or path.startswith(prefix + ".")):
        return path[len(prefix):].lstrip(".")
    return path


def structural_hash(ops: Sequence[Op], params: Sequence[ParamInfo], prefix: str) -> str:
    """Hash of what the layer computes, independent of where it sits in the model."""
    h = hashlib.sha256()
    local = {op.name: i for i, op in enumerate(ops)}
    for op in ops:
        wiring = tuple(local.get(p, -1) if p is not None else -2 for p in op.input_ops)
        rel_params = tuple(_relative(p, prefix) if p else "" for p in op.input_params)
        h.update(repr((op.target, _relative(op.module_path, prefix), op.inputs, op.outputs, wiring,
                       rel_params, op.scalars)).encode())
    for p in params:
        h.update(repr((_relative(p.name, prefix), p.shape, p.dtype)).encode())
    return h.hexdigest()[:12]


def build_layers(ops: Sequence[Op], params: Sequence[ParamInfo], saved: Iterable[SavedTensor],
                 graph_inputs: Sequence[TensorMeta]) -> tuple[Layer, ...]:
    """Layers in execution order, each with its ops, first-used parameters and saved tensors."""
    runs = split_into_runs(ops)
    by_name = {p.name: p for p in params}
    op_layer = {op.name: i for i, run in enumerate(runs) for op in run}
    saved_by_layer: dict[int, list[SavedTensor]] = {}
    for s in saved:
        saved_by_layer.setdefault(op_layer[s.saver], []).append(s)
    output_meta = {op.name: op.outputs for op in ops}
    by_op = {op.name: op for op in ops}
    buffers = frozenset(p.name for p in params if p.is_buffer)
    recipes: dict[str, dict[str, TensorMeta] | None] = {}
    claimed: set[str] = set()
    layers = []
    for i, run in enumerate(runs):
        names: list[str] = []
        for op in run:
            for p in op.input_params:
                if p is not None and p not in claimed and p in by_name:
                    claimed.add(p)
                    names.append(p)
        layer_params = tuple(by_name[n] for n in names)
        path = _layer_path(run)
        read: dict[str, TensorMeta] = {}
        for op in run:
            for src, meta, param in zip(op.input_ops, op.inputs, op.input_params):
                if param is None and (src is None or op_layer.get(src, i) < i):
                    read.setdefault(src or _input_key(meta), output_meta[src][0] if src in output_meta else meta)
        layers.append(Layer(
            index=i, module_path=path, kind=structural_hash(run, layer_params, block_prefix(path) or ""),
            ops=tuple(run), params=layer_params, saved=tuple(saved_by_layer.get(i, ())),
            input_meta=tuple(read.values()), sent_meta=_sent(read, by_op, buffers, recipes),
        ))
    return tuple(layers)


def _input_key(meta: TensorMeta) -> str:
    """How a boundary names a graph input (the recording keeps no identity for them: one per shape)."""
    return f"<input:{meta.shape}>"


def _sent(read: dict[str, TensorMeta], by_op: dict[str, Op], buffers: frozenset[str],
          recipes: dict[str, dict[str, TensorMeta] | None]) -> tuple[TensorMeta, ...]:
    """What a stage boundary sends for a layer that reads ``read``: each value made from graph inputs alone is
    replaced by those inputs (each once); ``recipes`` caches ``input_only_sources`` per op across layers."""
    sent: dict[str, TensorMeta] = {}
    for key, meta in read.items():
        if key not in recipes and key in by_op:
            recipes[key] = input_only_sources(key, by_op, buffers)
        sources = recipes.get(key)
        if sources is None:
            sent.setdefault(key, meta)
        else:
            for input_key, input_meta in sources.items():
                sent.setdefault(input_key, input_meta)
    return tuple(sent.values())


def _is_random(op: Op) -> bool:
    packet = op.target.split(".")[1] if op.target.startswith("aten.") else op.target
    return op.op_class is OpClass.DROPOUT or packet in RANDOM_ATEN_OPS


def input_only_sources(name: str, by_op: Mapping[str, Op], buffers: Collection[str]) -> dict[str, TensorMeta] | None:
    """The graph inputs that op ``name``'s output is computed from, when it needs nothing else; else None.

    This is the rule of ``autopar.emit.program._input_only_subgraph``: a value whose ops read only graph inputs,
    buffers and constants, draw no random numbers and number at most ``MAX_RECOMPUTED_NODES`` (an attention mask,
    rotary cos/sin) is recomputed by each later pipeline stage that reads it, and the graph inputs it is made
    from (token or position ids; none for a mask built from ``arange``) travel instead.

    Args:
        name: the producing op.
        by_op: every op of the graph by name.
        buffers: names of the model's buffers (a parameter in the chain means the value is sent).

    Returns:
        Graph input key → its shape and dtype, or None when the value is sent as it is.

    Example:
        >>> from autopar.graph.ir import OpClass
        >>> ids = TensorMeta(shape=(2, 8), dtype="int64")
        >>> mask = TensorMeta(shape=(2, 1, 8, 8), dtype="float32")
        >>> op = Op(name="m", target="aten.lt.Tensor", op_class=OpClass.ELEMENTWISE, inputs=(ids,),
        ...         input_ops=(None,), input_params=(None,), outputs=(mask,), flops=0, nbytes_moved=0,
        ...         module_path="")
        >>> input_only_sources("m", {"m": op}, buffers=())
        {'<input:(2, 8)>': TensorMeta(shape=(2, 8), dtype='int64')}
    """
    sources: dict[str, TensorMeta] = {}
    seen: set[str] = set()
    todo = [name]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        op = by_op.get(n)
        if op is None or _is_random(op) or len(seen) >= MAX_RECOMPUTED_NODES:
            return None
        seen.add(n)
        for src, meta, param in zip(op.input_ops, op.inputs, op.input_params):
            if param is not None and param not in buffers:
                return None
            if src is not None:
                todo.append(src)
            elif param is None:
                sources.setdefault(_input_key(meta), meta)
    return sources
