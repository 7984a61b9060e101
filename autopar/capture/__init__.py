"""Capture a module into an ``OpGraph``: trace (fx, else export), run on meta, copy into the IR.

    graph = autopar.capture(model, (input_ids,))          # positional example inputs
    graph = autopar.capture(hf_model, {"input_ids": ids})  # keyword example inputs

The model and inputs may live on any device, including ``meta``: the recorded run
always uses meta copies of parameters and inputs, so a 70B-parameter model is
captured without allocating its weights, and the caller's module is not changed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from autopar._modules import make_callable
from autopar.capture.record import record
from autopar.capture.trace import trace_module
from autopar.errors import CaptureError
from autopar.graph.flops import classify, count_bytes, count_flops
from autopar.graph.ir import Op, OpClass, OpGraph, ParamInfo
from autopar.graph.layers import build_layers

ExampleInputs = tuple[Any, ...] | Mapping[str, Any] | torch.Tensor


def capture(model: nn.Module, example_inputs: ExampleInputs) -> OpGraph:
    """Capture ``model``'s forward pass for ``example_inputs`` as an ``OpGraph``.

    Args:
        model: the module (on any device; ``meta`` works and allocates nothing).
        example_inputs: a tuple of positional tensors, a single tensor, or a dict of keyword
            tensors (Hugging Face style ``{"input_ids": ...}``). The leading dimension is the batch.

    Returns:
        The graph, with ``capture_method`` saying whether fx or export was used.

    Raises:
        CaptureError: the model cannot be traced or run on meta tensors; names the module/op and a fix.

    Example:
        >>> import torch
        >>> g = capture(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU()), (torch.randn(2, 4),))
        >>> g.capture_method, g.summary().matmul_flops
        ('fx', 128)
    """
    if not isinstance(model, nn.Module):
        raise CaptureError(f"capture needs an nn.Module, got {type(model).__name__}")
    args, kwargs = _split_inputs(example_inputs)
    was_training = model.training
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    model.train()  # capture what training runs (dropout on, saved activations kept)
    if use_cache:  # Hugging Face: training never keeps a KV cache (and its object is not a tensor)
        config.use_cache = False
    try:
        return _capture(model, args, kwargs)
    finally:
        model.train(was_training)
        if use_cache:
            config.use_cache = use_cache


def _capture(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> OpGraph:
    meta_args = tuple(_to_meta(a) for a in args)
    meta_kwargs = {k: _to_meta(v) for k, v in kwargs.items()}
    traced = trace_module(model, _like_model(model, args), {k: _like_model(model, v) for k, v in kwargs.items()})
    params = _param_infos(model)
    state = _meta_state(model)
    storage_names: dict[int, str] = {}
    for name, t in state.items():  # a tied parameter keeps its first name, as named_parameters() does
        storage_names.setdefault(int(t.untyped_storage()._cdata), name)
    recording = record(traced.gm, state, meta_args, meta_kwargs, storage_names,
                       flat_placeholders=traced.method == "export")
    if not recording.ops:
        raise CaptureError(f"{type(model).__name__}.forward ran no ATen ops on the example inputs; nothing to plan")
    ops = tuple(_to_op(r) for r in recording.ops)
    unknown = tuple(sorted({op.target for op in ops if op.op_class is OpClass.UNKNOWN}))
    batch = _batch_size(recording.input_metas)
    layers = build_layers(ops, params, recording.saved, recording.input_metas)
    return OpGraph(
        layers=layers,
        params=params,
        inputs=recording.input_metas,
        batch_size=batch,
        capture_method=traced.method,
        capture_note=traced.note,
        model_name=type(model).__name__,
        unknown_ops=unknown,
        tied_params=_tied(model),
        info=_hyperparameters(model, recording.input_metas, layers, batch),
    )


def _split_inputs(example_inputs: ExampleInputs) -> tuple[tuple, dict[str, Any]]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise CaptureError(
        f"example_inputs must be a tensor, a tuple of tensors or a dict of keyword tensors, "
        f"got {type(example_inputs).__name__}"
    )


def _to_meta(x: Any) -> Any:
    return x.to("meta") if isinstance(x, torch.Tensor) else x


def _like_model(model: nn.Module, x: Any) -> Any:
    """Inputs for tracing on the model's device (export cannot mix meta inputs with real weights)."""
    if not isinstance(x, torch.Tensor):
        return x
    device = next((p.device for p in model.parameters()), x.device)
    if x.device == device:
        return x
    return torch.zeros(x.shape, dtype=x.dtype, device=device)


def _meta_state(model: nn.Module) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    seen: dict[int, torch.Tensor] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) not in seen:
            seen[id(p)] = torch.empty_like(p, device="meta").requires_grad_(p.requires_grad)
        state[name] = seen[id(p)]
    for name, b in model.named_buffers(remove_duplicate=False):
        if id(b) not in seen:
            seen[id(b)] = torch.empty_like(b, device="meta")
        state[name] = seen[id(b)]
    return state


def _param_infos(model: nn.Module) -> tuple[ParamInfo, ...]:
    def info(name: str, t: torch.Tensor, is_buffer: bool) -> ParamInfo:
        return ParamInfo(name=name, shape=tuple(t.shape), dtype=str(t.dtype).removeprefix("torch."),
                         is_buffer=is_buffer)

    params = [info(n, p, False) for n, p in model.named_parameters()]
    buffers = [info(n, b, True) for n, b in model.named_buffers()]
    return tuple(params + buffers)


def _tied(model: nn.Module) -> tuple[tuple[str, str], ...]:
    owner: dict[int, str] = {}
    tied = []
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in owner:
            tied.append((name, owner[id(p)]))
        else:
            owner[id(p)] = name
    return tuple(tied)


def _to_op(r: Any) -> Op:
    return Op(
        name=r.name, target=r.target, op_class=classify(r.target), inputs=r.inputs, input_ops=r.input_ops,
        input_params=r.input_params, outputs=r.outputs, flops=count_flops(r.target, r.inputs, r.outputs),
        nbytes_moved=count_bytes(r.target, r.inputs, r.outputs), module_path=r.module_path, scalars=r.scalars,
        keywords=r.keywords,
    )


def _batch_size(inputs: tuple) -> int:
    batched = [t.shape[0] for t in inputs if t.shape]
    if not batched:
        raise CaptureError("example inputs have no batch dimension; pass tensors shaped (batch, ...)")
    return int(batched[0])


_HPARAM_NAMES = {
    "hidden": ("n_embd", "hidden_size", "d_model", "dim"),
    "heads": ("n_head", "num_attention_heads", "n_heads"),
    "kv_heads": ("num_key_value_heads", "n_kv_heads"),
    "layers": ("n_layer", "num_hidden_layers", "n_layers"),
    "vocab": ("vocab_size",),
    "ffn_hidden": ("intermediate_size", "ffn_dim", "n_inner"),
}


def _hyperparameters(model: nn.Module, inputs: tuple, layers: tuple = (), batch: int = 1) -> dict[str, int]:
    """Hyper-parameters readable from ``model.config`` (GPTConfig, HF PretrainedConfig), if any,
    and the tokens per sample read from the graph (``token_count``)."""
    config = getattr(model, "config", None)
    info: dict[str, int] = {}
    for key, names in _HPARAM_NAMES.items():
        for name in names:
            value = getattr(config, name, None)
            if isinstance(value, int) and not isinstance(value, bool):
                info[key] = value
                break
    tokens = token_count(layers, batch, info.get("hidden"))
    if tokens is not None:
        info["seq_len"] = tokens
    elif inputs and len(inputs[0].shape) >= 2:
        info["seq_len"] = int(inputs[0].shape[1])
    return info


def token_count(layers: tuple, batch: int, hidden: int | None) -> int | None:
    """Tokens per sample: the sequence dim of the hidden states entering the first repeated block.

    The first input's second dim is the token count only for token ids: for
    ViT it is the colour channels (the blocks see patches + 1), for Whisper the
    mel bins (the blocks see frames). The graph says what the blocks see: a
    (batch, tokens, hidden) tensor. None when no block takes one.
    """
    from autopar.graph.layers import block_prefix

    for layer in layers:
        if block_prefix(layer.module_path) != layer.module_path:
            continue
        for meta in layer.input_meta:
            shape = meta.shape
            if len(shape) == 3 and shape[0] == batch and (hidden is None or shape[2] == hidden):
                return int(shape[1])
        return None
    return None


make_callable(__name__, "autopar.capture:capture")  # autopar.capture(...) after `import autopar.capture.x`

__all__ = ["capture", "ExampleInputs"]
