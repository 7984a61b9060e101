"""Run a traced program on meta tensors and record every ATen op it dispatches.

The traced ``GraphModule`` (from fx or export) is interpreted node by node with
all parameters, buffers and inputs on the ``meta`` device, under a
``TorchDispatchMode`` that sees each ATen op below autograd. Each op is copied
into a plain ``RecordedOp`` with the module path of the fx node that issued it.
After the forward pass the autograd graph is walked to find the tensors each
backward node saved (``_saved_*``), which is what training keeps in memory.

Two ops are run the way a GPU runs them rather than the way the meta device
would decompose them, because the prices are for GPUs:
- ``scaled_dot_product_attention`` → the fused memory-efficient kernel (keeps
  q, k, v, out and the log-sum-exp; no s×s tensor), instead of the math path;
- dropout with 0 < p < 1 → ``native_dropout`` (keeps a 1-byte mask), instead of
  ``bernoulli`` + ``mul`` (which keeps a mask in the activation dtype).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from autopar.graph.ir import SavedTensor, TensorMeta

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class RecordedOp:
    """One ATen call as seen by the dispatch mode."""

    name: str
    """Unique name, ``<packet>_<n>``."""
    target: str
    """ATen overload, e.g. ``aten.addmm.default``."""
    inputs: tuple[TensorMeta, ...]
    """Tensor arguments."""
    input_ops: tuple[str | None, ...]
    """Producer op per tensor argument (None: graph input, parameter, constant)."""
    input_params: tuple[str | None, ...]
    """Parameter/buffer name per tensor argument, if it is one (or a view of one)."""
    outputs: tuple[TensorMeta, ...]
    """Tensor results."""
    module_path: str
    """Module that issued the op."""
    scalars: tuple[Any, ...]
    """Non-tensor positional arguments (ints, floats, bools, int lists as tuples)."""
    keywords: tuple[tuple[str, Any], ...]
    """Non-tensor keyword arguments, e.g. ``("approximate", "tanh")`` of gelu."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Recording:
    """Everything one meta-device run yields."""

    ops: tuple[RecordedOp, ...]
    """ATen ops in execution order."""
    saved: tuple[SavedTensor, ...]
    """Tensors saved for backward, each storage once, attributed to its first saver."""
    input_metas: tuple[TensorMeta, ...]
    """The graph inputs."""


def _meta(t: torch.Tensor) -> TensorMeta:
    return TensorMeta(shape=tuple(int(s) for s in t.shape), dtype=str(t.dtype).removeprefix("torch."))


def _storage_key(t: torch.Tensor) -> int:
    return int(t.untyped_storage()._cdata)


def _scalar(a: Any) -> Any:
    if isinstance(a, (bool, int, float, str)) or a is None:
        return a
    if isinstance(a, (list, tuple)) and all(isinstance(x, (int, float, bool)) for x in a):
        return tuple(a)
    if isinstance(a, torch.dtype):
        return str(a).removeprefix("torch.")
    return None


class _Recorder(TorchDispatchMode):
    """Records ATen ops with their producers; keeps outputs alive so ids stay unique."""

    def __init__(self, param_storages: Mapping[int, str]) -> None:
        super().__init__()
        self.param_storages = dict(param_storages)
        self.module_path = ""
        self.ops: list[RecordedOp] = []
        self.producer: dict[int, str] = {}  # id(tensor) -> op name
        self.storage_owner: dict[int, tuple[str, TensorMeta]] = {}  # storage -> (op, meta of first output)
        self.keep: list[torch.Tensor] = []
        self.outputs_by_op: dict[str, list[torch.Tensor]] = {}
        self._counts: dict[str, int] = {}

    def _producer_of(self, t: torch.Tensor) -> str | None:
        """The op that returned ``t``; failing that (a factory whose output object was re-wrapped),
        the op that created its storage."""
        name = self.producer.get(id(t))
        if name is None:
            name = self.storage_owner.get(_storage_key(t), (None, None))[0]
        return name

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        target = str(func)
        if target in ("aten.detach.default", "aten._assert_tensor_metadata.default"):
            return out
        flat_in, _ = tree_flatten((args, kwargs))
        tensors_in = [a for a in flat_in if isinstance(a, torch.Tensor)]
        flat_out, _ = tree_flatten(out)
        tensors_out = [o for o in flat_out if isinstance(o, torch.Tensor)]
        packet = target.split(".")[1] if target.startswith("aten.") else target
        n = self._counts.get(packet, 0)
        self._counts[packet] = n + 1
        name = packet if n == 0 else f"{packet}_{n}"
        self.ops.append(RecordedOp(
            name=name,
            target=target,
            inputs=tuple(_meta(t) for t in tensors_in),
            input_ops=tuple(self._producer_of(t) for t in tensors_in),
            input_params=tuple(self.param_storages.get(_storage_key(t)) for t in tensors_in),
            outputs=tuple(_meta(t) for t in tensors_out),
            module_path=self.module_path,
            scalars=tuple(_scalar(a) for a in args if not isinstance(a, torch.Tensor)),
            keywords=tuple((k, _scalar(v)) for k, v in kwargs.items() if not isinstance(v, torch.Tensor)),
        ))
        for t in tensors_out:
            self.producer.setdefault(id(t), name)
            key = _storage_key(t)
            if key not in self.param_storages:
                self.storage_owner.setdefault(key, (name, _meta(t)))
            self.keep.append(t)
        self.outputs_by_op[name] = tensors_out
        return out


def _module_path(node: fx.Node) -> str:
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return _clean_path(str(path))


def _clean_path(path: str) -> str:
    """Export may spell paths as ``L['self'].blocks[0]``; normalise to ``blocks.0``."""
    if "L['self']" not in path and "[" not in path:
        return path
    path = path.replace("L['self']", "").replace("['", ".").replace("']", "").replace("[", ".").replace("]", "")
    return path.strip(".")


def _fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Any = None,
                     dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                     enable_gqa: bool = False) -> torch.Tensor:
    """SDPA as the fused memory-efficient kernel a GPU would pick."""
    if k.shape[-3] != q.shape[-3]:  # grouped-query attention: broadcast kv heads as the kernel would
        rep = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(rep, dim=-3), v.repeat_interleave(rep, dim=-3)
    bias = attn_mask
    if bias is not None and bias.dtype == torch.bool:
        bias = torch.zeros(bias.shape, dtype=q.dtype, device=q.device).masked_fill(~bias, float("-inf"))
    if bias is not None:
        bias = bias.expand(q.shape[0], q.shape[-3], q.shape[-2], k.shape[-2])
    out = torch.ops.aten._scaled_dot_product_efficient_attention(
        q, k, v, bias, True, dropout_p, is_causal and bias is None, scale=scale)
    return out[0]


def _fused_dropout(x: torch.Tensor, p: float = 0.5, train: bool = True, inplace: bool = False, *,
                   training: bool | None = None) -> torch.Tensor:
    """Dropout as a GPU runs it: identity for p = 0 or eval, else ``native_dropout`` with a bool mask.
    ``training``: ``F.dropout``'s name for ``train`` (fx passes it by keyword)."""
    if training is not None:
        train = training
    if not train or p == 0.0:
        return x
    return torch.native_dropout(x, p, True)[0]


_SDPA_TARGETS = {F.scaled_dot_product_attention, torch.ops.aten.scaled_dot_product_attention.default}
_DROPOUT_TARGETS = {F.dropout, torch.dropout, torch.ops.aten.dropout.default}


class _Interpreter(fx.Interpreter):
    """Runs the traced graph, telling the recorder which module each node belongs to."""

    def __init__(self, gm: fx.GraphModule, recorder: _Recorder) -> None:
        super().__init__(gm)
        self.recorder = recorder
        self.current: fx.Node | None = None

    def run_node(self, n: fx.Node) -> Any:
        self.recorder.module_path = _module_path(n)
        self.current = n
        try:
            return super().run_node(n)
        except Exception as e:  # re-raised with the node that failed (cf. fx ShapeProp)
            from autopar.errors import CaptureError

            raise CaptureError(
                f"running op {n.format_node()} of module {self.recorder.module_path or '<root>'!r} on meta "
                f"tensors failed: {type(e).__name__}: {e}"
            ) from e

    def call_function(self, target: Any, args: tuple, kwargs: dict) -> Any:
        # a program traced on real weights bakes their device into factory/.to calls; run them on meta
        args, kwargs = _on_meta(args), _on_meta(kwargs)
        if target in _SDPA_TARGETS:
            return _fused_attention(*args, **kwargs)
        if target in _DROPOUT_TARGETS:
            return _fused_dropout(*args, **kwargs)
        return super().call_function(target, args, kwargs)

    def call_method(self, target: Any, args: tuple, kwargs: dict) -> Any:
        return super().call_method(target, _on_meta(args), _on_meta(kwargs))

    def call_module(self, target: Any, args: tuple, kwargs: dict) -> Any:
        mod = self.fetch_attr(target)
        if isinstance(mod, nn.Dropout):
            return _fused_dropout(args[0], mod.p, mod.training)
        return super().call_module(target, args, kwargs)


_META = torch.device("meta")


def _on_meta(value: Any) -> Any:
    """Replace every non-meta ``torch.device`` (and device strings in kwargs) by meta."""
    if isinstance(value, torch.device):
        return _META
    if isinstance(value, dict):
        return {k: (_META if k == "device" and isinstance(v, str) else _on_meta(v)) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_on_meta(v) for v in value)
    return value


def _saved_tensors(grad_fn: Any) -> Iterator[torch.Tensor]:
    for attr in dir(grad_fn):
        if not attr.startswith("_saved_"):
            continue
        try:
            value = getattr(grad_fn, attr)
        except RuntimeError:  # already freed or not accessible
            continue
        values = value if isinstance(value, (tuple, list)) else (value,)
        yield from (v for v in values if isinstance(v, torch.Tensor))


def _collect_saved(rec: _Recorder, outputs: list[torch.Tensor]) -> tuple[SavedTensor, ...]:
    """Walk the autograd graph; each saved storage once, attributed to its first saver in op order."""
    node_op: dict[Any, str] = {}
    for name, outs in rec.outputs_by_op.items():
        for t in outs:
            if t.grad_fn is not None:
                node_op.setdefault(t.grad_fn, name)
    order = {op.name: i for i, op in enumerate(rec.ops)}
    found: dict[int, SavedTensor] = {}
    seen: set[Any] = set()
    stack = [t.grad_fn for t in outputs if t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        stack.extend(nxt for nxt, _ in node.next_functions if nxt is not None)
        saver = node_op.get(node)
        if saver is None:
            continue
        for t in _saved_tensors(node):
            key = _storage_key(t)
            if key in rec.param_storages:
                continue
            producer, meta = rec.storage_owner.get(key, (None, _meta(t)))
            prev = found.get(key)
            if prev is None or order[saver] < order[prev.saver]:
                found[key] = SavedTensor(producer=producer, saver=saver, meta=meta)
    return tuple(sorted(found.values(), key=lambda s: order[s.saver]))


def record(gm: fx.GraphModule, meta_state: Mapping[str, torch.Tensor], args: tuple, kwargs: Mapping[str, Any],
           param_names: Mapping[int, str], *, flat_placeholders: bool) -> Recording:
    """Interpret ``gm`` with ``meta_state`` swapped in for its parameters; record ops and saved tensors.

    Args:
        gm: the traced program (fx or the unlifted export module).
        meta_state: fully-qualified name → meta tensor (parameters require grad).
        args, kwargs: meta example inputs.
        param_names: storage key → parameter name, for the tensors in ``meta_state``.
        flat_placeholders: the graph takes the pytree-flattened (args, kwargs), as export's does;
            otherwise placeholders are matched to kwargs by name, as fx's are.
    """
    rec = _Recorder(param_names)
    flat_inputs = [a for a in tree_flatten((args, dict(kwargs)))[0] if isinstance(a, torch.Tensor)]
    for t in flat_inputs:
        rec.storage_owner.setdefault(_storage_key(t), (None, _meta(t)))  # type: ignore[arg-type]
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    bound = flat_inputs if flat_placeholders else _bind_inputs(placeholders, args, kwargs)
    with torch.nn.utils.stateless._reparametrize_module(gm, dict(meta_state), tie_weights=True, strict=False):
        with torch.enable_grad(), rec:
            result = _Interpreter(gm, rec).run(*bound)
    outputs = [o for o in tree_flatten(result)[0] if isinstance(o, torch.Tensor) and o.requires_grad]
    saved = _collect_saved(rec, outputs)
    return Recording(ops=tuple(rec.ops), saved=saved, input_metas=tuple(_meta(t) for t in flat_inputs))


def _bind_inputs(placeholders: list[fx.Node], args: tuple, kwargs: Mapping[str, Any]) -> list[Any]:
    """Positional values for the graph's placeholders from args + kwargs (by placeholder name)."""
    values: list[Any] = list(args)
    for node in placeholders[len(args):]:
        name = str(node.target).lstrip("*")
        if name in kwargs:
            values.append(kwargs[name])
        elif node.args:  # default value recorded by the tracer
            values.append(node.args[0])
        else:
            values.append(None)
    return values
