"""Materialise a meta-device stage: allocate this rank's shards and run the model's own initialiser on them.

The stage's modules are outlined copies (``autopar.emit.program``), not the
model's classes, so the initialiser runs on the original modules with the
stage's tensors swapped in for the duration of the call:

- Hugging Face models: ``PreTrainedModel._init_weights(module)`` for every module
  that owns a stage tensor (it also recomputes rotary ``inv_freq`` buffers);
- other models: ``module.reset_parameters()`` where a module defines it, or a
  model-level ``init_weights()`` (``autopar.examples.gpt.GPT``) applied to the
  same swapped-in tensors.

Random init of a DTensor shard draws from the local generator on CPU meshes;
the weights are deterministic for a plan and seed, which is all init needs
(load a checkpoint or a state dict for values that must match another run).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

import torch
from torch import nn

logger = logging.getLogger(__name__)


def materialize(stage_module: nn.Module, model: nn.Module, device: torch.device, *, seed: int) -> None:
    """Allocate a meta stage's (sharded) tensors on ``device`` and initialise them under ``seed``.

    The global RNG state is restored afterwards; ``model`` is left as it was.
    """
    stage_module.to_empty(device=device)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad(), warnings.catch_warnings(), \
            _swapped_in(stage_module, model) as owners:
        warnings.filterwarnings("ignore", message="DTensor random operators may not have complete support")
        torch.manual_seed(seed)
        _initialise(model, owners)


@contextlib.contextmanager
def _swapped_in(stage_module: nn.Module, model: nn.Module) -> Iterator[list[nn.Module]]:
    """The model's modules that own a stage tensor, holding the stage's tensors while the block runs."""
    saved: list[tuple[nn.Module, str, str, torch.Tensor | None]] = []
    owners: dict[str, nn.Module] = {}
    names = dict(model.named_modules())
    tensors = [("_parameters", n, t) for n, t in stage_module.named_parameters(remove_duplicate=False)]
    tensors += [("_buffers", n, t) for n, t in stage_module.named_buffers(remove_duplicate=False)]
    for slot, name, tensor in tensors:
        path, _, leaf = name.rpartition(".")
        if path not in names:
            continue
        owner = names[path]
        store = getattr(owner, slot)
        saved.append((owner, slot, leaf, store.get(leaf)))
        store[leaf] = tensor
        owners[path] = owner
    try:
        yield list(owners.values())
    finally:
        for owner, slot, leaf, original in reversed(saved):
            getattr(owner, slot)[leaf] = original


def _initialise(model: nn.Module, owners: list[nn.Module]) -> None:
    init_module = getattr(model, "_init_weights", None)  # Hugging Face PreTrainedModel
    if callable(init_module):
        for module in owners:
            init_module(module)
        return
    if callable(getattr(model, "init_weights", None)):
        model.init_weights()  # the owners hold the stage's tensors; the rest stays on meta
        return
    for module in owners:
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):
            reset()
