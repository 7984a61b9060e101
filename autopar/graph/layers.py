"""Group a flat op sequence into layers and detect repeated layers by a structural hash.

A *block* is the shortest module path prefix that ends in a numeric component
(``blocks.3``, ``model.layers.17``, ``0`` in a Sequential): ops under it form one
layer. Runs of ops outside any block (embeddings, final norm, head) form layers
named after the top-level modules they touch. Two layers have the same ``kind``
when their ops, shapes, relative module paths, wiring and parameter shapes are
equal, so 80 identical transformer blocks are costed once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

from autopar.graph.ir import Layer, Op, ParamInfo, SavedTensor, TensorMeta


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
        boundary: dict[str, TensorMeta] = {}
        for op in run:
            for src, meta, param in zip(op.input_ops, op.inputs, op.input_params):
                if param is None and (src is None or op_layer.get(src, i) < i):
                    boundary.setdefault(src or f"<input:{meta.shape}>",
                                        output_meta[src][0] if src in output_meta else meta)
        layers.append(Layer(
            index=i, module_path=path, kind=structural_hash(run, layer_params, block_prefix(path) or ""),
            ops=tuple(run), params=layer_params, saved=tuple(saved_by_layer.get(i, ())),
            input_meta=tuple(boundary.values()),
        ))
    return tuple(layers)
