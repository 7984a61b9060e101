"""Code that runs on every rank of the multi-process tests (see ``harness.run_spmd``).

Each check builds the tiny GPT and Llama, runs a reference single-process
training on the full module (every rank computes it; it is tiny), runs the same
steps through ``autopar.parallelize`` under a hand-written plan, and returns plain
numbers for the test process to compare.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tests.emit.plans import gpt_layer_paths, llama_layer_paths, make_plan

SEQ_LEN = 16
VOCAB = 128
N_LAYER = 4
LR = 0.1
MOMENTUM = 0.9
FAMILIES = ("gpt", "llama")


def build_model(family: str, *, meta: bool = False, seed: int = 1234) -> nn.Module:
    """The tiny model of a family: GPT (n_layer 4, n_embd 32, 4 heads) or Llama (hidden 32, 4 layers, 4 heads)."""
    torch.manual_seed(seed)
    device = torch.device("meta") if meta else torch.device("cpu")
    with device:
        if family == "gpt":
            from autopar.examples.gpt import GPT, GPTConfig

            cfg = GPTConfig(n_layer=N_LAYER, n_embd=32, n_head=4, vocab_size=VOCAB, block_size=SEQ_LEN, dropout=0.0)
            return GPT(cfg)
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=N_LAYER, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=SEQ_LEN,
                             attn_implementation="eager", use_cache=False)
        return LlamaForCausalLM(config)


def layer_paths(family: str) -> tuple[str, ...]:
    """The family's layer paths (as capture names them)."""
    return gpt_layer_paths(N_LAYER) if family == "gpt" else llama_layer_paths(N_LAYER)


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of one (micro-)batch."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def batches(steps: int, global_batch: int, *, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Random token ids and targets, the same on every rank."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        x = torch.randint(0, VOCAB, (global_batch, SEQ_LEN), generator=g)
        y = torch.randint(0, VOCAB, (global_batch, SEQ_LEN), generator=g)
        out.append((x, y))
    return out


def _logits(family: str, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x) if family == "gpt" else model(input_ids=x).logits


def reference(family: str, data: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Single-process training of the original module: losses per step and the final parameters."""
    model = build_model(family)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    losses = []
    for x, y in data:
        loss = loss_fn(_logits(family, model, x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def full_local_state(pm: Any) -> dict[str, torch.Tensor]:
    """This rank's parameters, gathered to full tensors over TP/FSDP (collective within the stage)."""
    from torch.distributed.tensor import DTensor

    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone() for k, v in pm.state_dict().items()}


def train(pm: Any, data: list[tuple[torch.Tensor, torch.Tensor]], opt: torch.optim.Optimizer) -> list[float]:
    """Run ``pm.step`` and the optimizer over ``data``; the loss per step."""
    losses = []
    for x, y in data:
        losses.append(pm.step(x, y, loss_fn).item())
        opt.step()
        opt.zero_grad()
    return losses


def _parallel(family: str, plan_kwargs: dict[str, Any], data: list[tuple[torch.Tensor, torch.Tensor]],
              init: dict[str, torch.Tensor]) -> tuple[list[float], Any, torch.optim.Optimizer]:
    from autopar.emit.parallelize import parallelize

    plan = make_plan(layer_paths(family), family=family, **plan_kwargs)
    example = (torch.zeros(2, SEQ_LEN, dtype=torch.long),)
    pm = parallelize(build_model(family, meta=True), example, plan=plan, seed=7)
    pm.load_state_dict(init)
    opt = pm.optimizer(torch.optim.SGD, lr=LR, momentum=MOMENTUM)
    return train(pm, data, opt), pm, opt


def check_equivalence(plan_kwargs: dict[str, Any], steps: int = 3) -> dict[str, Any]:
    """Losses and parameter differences of ``parallelize`` vs. the original module, per family."""
    out: dict[str, Any] = {}
    for family in FAMILIES:
        plan = make_plan(layer_paths(family), family=family, **plan_kwargs)
        data = batches(steps, plan.layout.global_batch_size)
        ref_losses, ref_state = reference(family, data)
        init = {k: v for k, v in build_model(family).state_dict().items()}
        losses, pm, _ = _parallel(family, plan_kwargs, data, init)
        state = full_local_state(pm)
        diffs = {k: (state[k] - ref_state[k]).abs().max().item() for k in state}
        moved = max((ref_state[k] - init[k]).abs().max().item() for k in state)
        out[family] = {
            "ref_losses": ref_losses, "losses": losses, "max_diff": max(diffs.values()), "moved": moved,
            "keys": sorted(state), "ref_keys": sorted(k for k in ref_state if k in init),
            "param_types": sorted({type(p).__name__ for p in pm.parameters()}),
        }
    return out


def check_resume(first: dict[str, Any], second: dict[str, Any], steps: tuple[int, int] = (2, 2)) -> dict[str, Any]:
    """Train under plan ``first``, save, load under plan ``second`` (fresh model), continue; compare."""
    import torch.distributed as dist

    out: dict[str, Any] = {}
    for family in FAMILIES:
        plan = make_plan(layer_paths(family), family=family, **first)
        data = batches(sum(steps), plan.layout.global_batch_size, seed=5)
        ref_losses, _ = reference(family, data)
        init = build_model(family).state_dict()
        losses, pm, opt = _parallel(family, first, data[: steps[0]], init)
        path = _shared_tempdir()
        pm.save(path, opt)
        losses_a = _continue(family, second, path, data[steps[0]:])
        dist.barrier()
        out[family] = {"ref_losses": ref_losses, "losses": losses + losses_a}
    return out


def _continue(family: str, plan_kwargs: dict[str, Any], path: str, data: list[Any]) -> list[float]:
    from autopar.emit.parallelize import parallelize

    plan = make_plan(layer_paths(family), family=family, **plan_kwargs)
    example = (torch.zeros(2, SEQ_LEN, dtype=torch.long),)
    pm = parallelize(build_model(family, meta=True), example, plan=plan, seed=99)
    opt = pm.optimizer(torch.optim.SGD, lr=LR, momentum=MOMENTUM)
    pm.load(path, opt)
    return train(pm, data, opt)


def _shared_tempdir() -> str:
    import torch.distributed as dist

    box: list[Any] = [tempfile.mkdtemp(prefix="autopar-ckpt-") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return str(box[0])


CHECKS: dict[str, Callable[..., dict[str, Any]]] = {"equivalence": check_equivalence, "resume": check_resume}
"""Entry points the tests call by name."""
