"""Rebuild a runnable ATen call from a captured ``Op``: target, input shapes/dtypes, scalar arguments.

Capture records an op's tensor arguments (flattened, in call order) and its
non-tensor positional arguments (``Op.scalars``: numbers, bools, int lists as
tuples, dtypes as names, None for anything else, including an omitted optional
tensor and a list of tensors). The op's schema (``OpOverload._schema``) says which
positional argument is which; the assignment that consumes every recorded tensor
and scalar is found by a small search, and the rebuilt call is accepted only if it
produces the captured output shapes. Kernels the local device lacks (the fused CUDA
attention kernels on CPU) are replaced by the public op the model calls
(``F.scaled_dot_product_attention``), which dispatches to the device's own kernel.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from autopar.cost_models.profiling.calibration import cast_float_inputs
from autopar.graph.flops import op_name
from autopar.graph.ir import Op, OpClass, TensorMeta

INTEGER_DTYPES = frozenset({"int64", "int32", "int16", "int8", "uint8"})
"""Integer inputs are indices: drawn in [0, smallest dim of the float inputs) so any lookup is in range."""

VIEW_CHAIN_DEPTH = 4
"""How many view ops back an input's strides are rebuilt (``view → transpose → view`` chains are short)."""

_FUSED_ATTENTION_SCALARS = {
    # name → (index of dropout_p, index of is_causal) among the non-tensor positional arguments
    "_scaled_dot_product_efficient_attention": (2, 3),
    "_scaled_dot_product_flash_attention": (0, 1),
    "_scaled_dot_product_cudnn_attention": (2, 3),
}


class RebuildError(Exception):
    """The op cannot be rebuilt or run on this device; the message says why."""


@dataclass(frozen=True, slots=True, kw_only=True)
class _Slot:
    """Placeholder for the i-th tensor argument inside an argument template."""

    index: int


@dataclass(frozen=True, slots=True, kw_only=True)
class OpCall:
    """A runnable call: ``fn(*args)`` with random tensors of the captured shapes."""

    fn: Callable[..., Any]
    """The op (keyword arguments already bound)."""
    template: tuple[Any, ...]
    """Positional arguments with ``_Slot``s where tensors go."""
    tensor_args: tuple[torch.Tensor, ...]
    """The tensors, in the op's recorded input order."""

    @property
    def args(self) -> tuple[Any, ...]:
        """Positional arguments with this call's tensors."""
        return self.with_tensors(self.tensor_args)

    def with_tensors(self, tensors: Sequence[torch.Tensor]) -> tuple[Any, ...]:
        """Positional arguments with ``tensors`` in the slots (e.g. leaves that require grad)."""
        def fill(value: Any) -> Any:
            if isinstance(value, _Slot):
                return tensors[value.index]
            if isinstance(value, list):
                return [fill(v) for v in value]
            return value

        return tuple(fill(v) for v in self.template)


def resolve_target(target: str) -> Any:
    """``"aten.mm.default"`` → ``torch.ops.aten.mm.default``.

    Raises:
        RebuildError: no such op in this torch build.
    """
    parts = target.split(".")
    if len(parts) != 3:
        raise RebuildError(f"target {target!r} is not '<namespace>.<name>.<overload>'")
    try:
        return getattr(getattr(getattr(torch.ops, parts[0]), parts[1]), parts[2])
    except (AttributeError, RuntimeError) as e:
        raise RebuildError(f"torch {torch.__version__} has no op {target}") from e


def build_call(op: Op, device: torch.device, dtype: str | None = None,
               producers: Mapping[str, Op] | None = None) -> OpCall:
    """A verified runnable call of ``op`` on ``device`` with random inputs.

    Args:
        op: the captured op.
        device: where to run it.
        dtype: cast floating-point inputs (and float outputs of factory ops) to this dtype.
        producers: the graph's ops by name. An input made by a view op (``t``, ``transpose``,
            ``expand``) is then rebuilt as that view of a random base, so it has the strides the
            model gives it (a GEMM on a transposed weight runs a different kernel than on a
            contiguous one).

    Raises:
        RebuildError: the arguments cannot be rebuilt, the kernel fails, or the outputs differ in shape.
    """
    if producers:
        try:
            return _build(op, device, dtype, producers)
        except RebuildError:  # the rebuilt strides can be wrong (a kernel may lay its output out transposed)
            pass
    return _build(op, device, dtype, {})


def _build(op: Op, device: torch.device, dtype: str | None, producers: Mapping[str, Op]) -> OpCall:
    inputs = cast_float_inputs(op.inputs, dtype)
    bound = _index_bound(inputs)
    tensors = tuple(_input_tensor(op, i, device, dtype, bound, producers, VIEW_CHAIN_DEPTH)
                    for i in range(len(inputs)))
    name = op_name(op.target)
    if name in _FUSED_ATTENTION_SCALARS and device.type == "cpu":
        call = _sdpa_call(op, tensors)
    else:
        overload = resolve_target(op.target)
        template = _assign(overload._schema.arguments, len(tensors), op.scalars)
        if template is None:
            raise RebuildError(f"{op.target}: cannot match {len(tensors)} tensors and scalars {op.scalars!r} "
                               f"to its schema {overload._schema}")
        kwargs = _keyword_args(overload._schema.arguments, op, device, dtype)
        call = OpCall(fn=functools.partial(overload, **kwargs) if kwargs else overload, template=template,
                      tensor_args=tensors)
    # fused attention's auxiliary outputs (log-sum-exp padding, RNG state) differ by kernel: compare the output
    _verify(op, call, compare=1 if name in _FUSED_ATTENTION_SCALARS else None)
    return call


def _input_tensor(op: Op, index: int, device: torch.device, dtype: str | None, bound: int,
                  producers: Mapping[str, Op], depth: int) -> torch.Tensor:
    """Input ``index`` of ``op``: a view of a random base when a view op made it, else a random tensor."""
    meta = cast_float_inputs(op.inputs[index:index + 1], dtype)[0]
    producer = producers.get(op.input_ops[index] or "")
    if depth > 0 and producer is not None and producer.op_class is OpClass.VIEW and producer.inputs:
        try:
            base = _input_tensor(producer, 0, device, dtype, bound, producers, depth - 1)
            view = _view_of(producer, base, device, dtype)
        except RebuildError:
            view = None
        if view is not None and tuple(view.shape) == meta.shape and view.dtype == getattr(torch, meta.dtype):
            return view
    return _random_tensor(meta, device, bound)


def _view_of(producer: Op, base: torch.Tensor, device: torch.device, dtype: str | None) -> torch.Tensor | None:
    if len(producer.inputs) != 1:
        return None
    call = build_call(producer, device, dtype)
    try:
        out = call.fn(*call.with_tensors([base]))
    except RuntimeError:  # e.g. a view that needs the original (unknown) strides of its base
        return None
    return out if isinstance(out, torch.Tensor) else None


def _sdpa_call(op: Op, tensors: tuple[torch.Tensor, ...]) -> OpCall:
    drop_at, causal_at = _FUSED_ATTENTION_SCALARS[op_name(op.target)]
    scalars = op.scalars
    raw = scalars[drop_at] if len(scalars) > drop_at else None
    dropout_p = raw if isinstance(raw, float) else 0.0
    causal = len(scalars) > causal_at and scalars[causal_at] is True
    if len(tensors) != 3:
        raise RebuildError(f"{op.target} with an attention bias is not rebuilt on CPU")
    fn = functools.partial(F.scaled_dot_product_attention, dropout_p=dropout_p, is_causal=causal)
    return OpCall(fn=fn, template=(_Slot(index=0), _Slot(index=1), _Slot(index=2)), tensor_args=tensors)


def _assign(schema_args: Sequence[Any], n_tensors: int, scalars: Sequence[Any]) -> tuple[Any, ...] | None:
    """Positional arguments (with ``_Slot``s) consuming all tensors and scalars, or None if none fits."""
    positional = [a for a in schema_args if not a.kwarg_only]

    def search(j: int, ti: int, si: int) -> list[Any] | None:
        if ti == n_tensors and si == len(scalars):
            return [] if all(a.has_default_value() for a in positional[j:]) else None
        if j == len(positional):
            return None
        for value, next_ti, next_si in _options(str(positional[j].type), ti, si, n_tensors, scalars):
            rest = search(j + 1, next_ti, next_si)
            if rest is not None:
                return [value, *rest]
        return None

    found = search(0, 0, 0)
    return tuple(found) if found is not None else None


def _options(typ: str, ti: int, si: int, n_tensors: int, scalars: Sequence[Any]) -> list[tuple[Any, int, int]]:
    """The ways argument type ``typ`` can consume the next tensors/scalars: (value, next ti, next si)."""
    options: list[tuple[Any, int, int]] = []
    has_scalar = si < len(scalars)
    if typ in ("Tensor", "Optional[Tensor]"):
        if ti < n_tensors:
            options.append((_Slot(index=ti), ti + 1, si))
        if has_scalar and typ == "Tensor" and isinstance(scalars[si], (int, float)):
            options.append((torch.tensor(scalars[si]), ti, si + 1))  # a Python number wrapped as a tensor
        if has_scalar and typ == "Optional[Tensor]" and scalars[si] is None:
            options.append((None, ti, si + 1))
    elif typ.startswith(("List[", "Optional[List[")) and "Tensor" in typ:
        if has_scalar and scalars[si] is None:  # capture records a tensor list as None, its tensors in order
            options.extend(([_Slot(index=ti + i) for i in range(k)], ti + k, si + 1)
                           for k in range(n_tensors - ti, -1, -1))
    elif has_scalar:
        options.append((_scalar_value(scalars[si]), ti, si + 1))
    return options


def _scalar_value(value: Any) -> Any:
    if isinstance(value, str) and isinstance(getattr(torch, value, None), torch.dtype):
        return getattr(torch, value)  # capture writes dtypes as their names
    if isinstance(value, tuple):
        return list(value)
    return value


def _keyword_args(schema_args: Sequence[Any], op: Op, device: torch.device, dtype: str | None) -> dict[str, Any]:
    """Keyword-only arguments capture does not record that decide the result: output dtype and device."""
    kwargs: dict[str, Any] = {}
    names = {a.name for a in schema_args if a.kwarg_only}
    if "dtype" in names and op.outputs:
        out = cast_float_inputs(op.outputs[:1], dtype)[0]
        kwargs["dtype"] = getattr(torch, out.dtype)
    if "device" in names:
        kwargs["device"] = device
    return kwargs


def _index_bound(inputs: Sequence[TensorMeta]) -> int:
    dims = [d for t in inputs if t.dtype not in INTEGER_DTYPES and t.dtype != "bool" for d in t.shape if d > 0]
    return max(1, min(dims)) if dims else 1


def _random_tensor(meta: TensorMeta, device: torch.device, bound: int) -> torch.Tensor:
    try:
        dtype = getattr(torch, meta.dtype)
    except AttributeError as e:
        raise RebuildError(f"unknown dtype {meta.dtype!r}") from e
    if meta.dtype == "bool":
        return torch.rand(meta.shape, device=device) < 0.5
    if meta.dtype in INTEGER_DTYPES:
        return torch.randint(0, bound, meta.shape, device=device, dtype=dtype)
    return torch.randn(meta.shape, device=device, dtype=dtype)


def _verify(op: Op, call: OpCall, *, compare: int | None) -> None:
    """Run once; the outputs must have the captured shapes (the first ``compare`` of them, or all)."""
    try:
        with torch.no_grad():
            out = call.fn(*call.args)
    except Exception as e:  # any kernel failure means the rebuilt call is not the captured one
        raise RebuildError(f"{op.target} failed on {call.tensor_args[0].device if call.tensor_args else 'device'}: "
                           f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    got = [tuple(t.shape) for t in _flatten(out)]
    want = [t.shape for t in op.outputs]
    n = len(want) if compare is None else compare
    if got[:n] != want[:n]:
        raise RebuildError(f"{op.target}: rebuilt call returns shapes {got} but capture recorded {want}")


def _flatten(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _flatten(v)]
    return []


__all__ = ["OpCall", "RebuildError", "build_call", "resolve_target"]
