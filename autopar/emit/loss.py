"""The loss on a vocabulary-split head: ``loss_parallel`` where it is exact, the gathered logits elsewhere.

A column-split LM head leaves the last stage as a ``Shard(-1)`` DTensor
(``autopar.emit.tp``: ``_outputs_to_local`` keeps it), so each tensor-parallel
rank holds V/t of the vocabulary. The user's ``loss_fn`` then runs under
``torch.distributed.tensor.parallel.loss_parallel()``, as torchtitan runs it:
cross-entropy is computed at V/t per rank with three all-reduces of per-token
values (the max and the sum of exponentials in ``_log_softmax``, the target's
log-probability in ``nll_loss_forward``), and its backward needs no collective.

``loss_parallel`` fuses the two backward steps: ``nll_loss``'s backward returns
the gradient with respect to the *logits* (``softmax - onehot``) and
``_log_softmax``'s backward passes it through unchanged. That is exact only when
every ``log_softmax`` output reaches the loss through ``nll_loss`` alone and
every ``nll_loss`` reads a ``log_softmax`` output: label smoothing (which also
sums the log-probabilities) or an ``nll_loss`` on other values would get wrong
gradients *silently*. So after the loss is computed, ``parallel_loss_is_exact``
reads its autograd graph; when the check fails, or the loss function raises
on DTensors (``.numpy()``, an op ``loss_parallel`` refuses), the loss is computed
again on the gathered logits (today's path, exact for any loss) and a warning
says so once per loss function. ``ParallelModel.step(..., loss_parallel=False)``
takes the gathered path from the start.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

logger = logging.getLogger(__name__)

_LOG_SOFTMAX = frozenset({"LogSoftmaxBackward0"})
_NLL = frozenset({"NllLossBackward0", "NllLoss2dBackward0"})
_PASS_THROUGH = frozenset({
    "ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0", "TransposeBackward0", "TransposeBackward1",
    "PermuteBackward0", "TBackward0", "CloneBackward0", "ToCopyBackward0", "SqueezeBackward0", "SqueezeBackward1",
    "SqueezeBackward2", "UnsqueezeBackward0", "AliasBackward0",
})
"""Autograd nodes that only re-index or re-type a tensor (a bijection of its elements): the fused gradient of
``nll_loss`` (``softmax - onehot`` at the values it reads) passes them unchanged in meaning."""

_PROGRAM_LOSS_OPS = ("log_softmax", "nll_loss", "cross_entropy")
"""Op-name fragments that ``loss_parallel`` would re-route inside the model's own program (the handlers are
process-wide while the step runs): a stage program holding one keeps the gathered path."""


def is_vocab_shard(t: Any) -> bool:
    """A floating DTensor split on its last dim over a one-dimensional mesh (a column-split head's output).

    Example:
        >>> is_vocab_shard(torch.zeros(2, 3))
        False
    """
    from torch.distributed.tensor import DTensor, Shard

    return (isinstance(t, DTensor) and t.is_floating_point() and t.dim() >= 1
            and tuple(t.placements) == (Shard(t.dim() - 1),))


@contextlib.contextmanager
def maybe_loss_parallel(enabled: bool) -> Iterator[None]:
    """``torch.distributed.tensor.parallel.loss_parallel()`` when ``enabled`` (its handlers are process-wide)."""
    if not enabled:
        yield
        return
    from torch.distributed.tensor.parallel import loss_parallel

    context = loss_parallel()  # torch's generator has no try/finally: an error would leave its handlers on
    context.__enter__()
    try:
        yield
    finally:
        context.__exit__(None, None, None)


def gather(tree: Any) -> Any:
    """Every DTensor leaf of ``tree`` as a full plain tensor (differentiably): a replicated one without a
    collective, a split or partial one gathered or reduced."""
    from torch.distributed.tensor import DTensor
    from torch.utils._pytree import tree_map

    return tree_map(lambda t: t.full_tensor() if isinstance(t, DTensor) else t, tree)


def program_runs_own_loss(modules: Iterable[torch.nn.Module]) -> str | None:
    """The first op of the stage programs that ``loss_parallel`` would re-route (None: none).

    Example:
        >>> program_runs_own_loss([torch.nn.Linear(2, 2)]) is None
        True
    """
    import torch.fx as fx

    for module in modules:
        for sub in module.modules():
            graph = getattr(sub, "graph", None)
            if not isinstance(graph, fx.Graph):
                continue
            for node in graph.nodes:
                if node.op == "call_function" and any(k in str(node.target) for k in _PROGRAM_LOSS_OPS):
                    return str(node.target)
    return None


def _loss_graph(loss: torch.Tensor, stop: set[Any]) -> dict[Any, list[Any]]:
    """Node → its consumers, over the autograd graph from ``loss`` down to (not into) the ``stop`` nodes."""
    consumers: dict[Any, list[Any]] = {}
    todo, seen = [loss.grad_fn], {loss.grad_fn}
    while todo:
        node = todo.pop()
        consumers.setdefault(node, [])
        if node in stop:
            continue
        for child, _ in node.next_functions:
            if child is None:
                continue
            consumers.setdefault(child, []).append(node)
            if child not in seen:
                seen.add(child)
                todo.append(child)
    return consumers


def _name(node: Any) -> str:
    return type(node).__name__


def parallel_loss_is_exact(loss: torch.Tensor, logits: Iterable[torch.Tensor]) -> bool:
    """Whether ``loss_parallel``'s fused backward gives ``loss``'s true gradient (see the module docstring).

    Every ``log_softmax`` node must feed only ``nll_loss`` nodes and every ``nll_loss``
    must read a ``log_softmax`` node, each through re-indexing nodes (``_PASS_THROUGH``) only.
    """
    if loss.grad_fn is None:
        return True
    consumers = _loss_graph(loss, {t.grad_fn for t in logits if t.grad_fn is not None})

    def feeds_only_nll(node: Any) -> bool:
        users = consumers.get(node, [])
        return bool(users) and all(_name(u) in _NLL or (_name(u) in _PASS_THROUGH and feeds_only_nll(u))
                                   for u in users)

    def reads_log_softmax(node: Any) -> bool:
        child = node.next_functions[0][0] if node.next_functions else None
        while child is not None and _name(child) in _PASS_THROUGH:
            child = child.next_functions[0][0]
        return child is not None and _name(child) in _LOG_SOFTMAX

    for node in consumers:
        if _name(node) in _LOG_SOFTMAX and not feeds_only_nll(node):
            return False
        if _name(node) in _NLL and not reads_log_softmax(node):
            return False
    return True


class VocabParallelLoss:
    """``loss_fn(output, target)`` on the vocabulary-split output: under ``loss_parallel`` where exact."""

    def __init__(self) -> None:
        self._warned: set[str] = set()

    def __call__(self, fn: Callable[[Any, torch.Tensor], torch.Tensor], output: Any, target: torch.Tensor, *,
                 parallel: bool) -> torch.Tensor:
        """The loss as a plain tensor; ``parallel``: ``loss_parallel()`` is active and may be used."""
        from torch.utils._pytree import tree_leaves

        shards = [t for t in tree_leaves(output) if is_vocab_shard(t)]
        if not shards or not parallel:
            return gather(fn(gather(output), target))
        try:
            loss = fn(output, target)
        except Exception as e:  # noqa: BLE001 - the gathered path below is exact for any loss; it re-raises its own
            self._warn(fn, f"it raised on the vocabulary-split logits ({type(e).__name__}: {e})")
            return gather(fn(gather(output), target))
        if not isinstance(loss, torch.Tensor) or not parallel_loss_is_exact(loss, shards):
            self._warn(fn, "its log_softmax output reaches the loss other than through nll_loss alone "
                           "(label smoothing, a sum of log-probabilities), where loss_parallel's fused backward "
                           "would be wrong")
            return gather(fn(gather(output), target))
        return gather(loss)

    def _warn(self, fn: Callable[..., Any], why: str) -> None:
        key = getattr(fn, "__qualname__", repr(fn))
        if key not in self._warned:
            self._warned.add(key)
            logger.warning("loss %s runs on the gathered logits (full vocabulary on every tensor-parallel rank): "
                           "%s. Write it as F.cross_entropy on the logits to keep the vocabulary split, or pass "
                           "loss_parallel=False to ParallelModel.step to skip this attempt", key, why)

