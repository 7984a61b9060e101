"""Code that runs on every rank of the multi-process tests (see ``harness.run_spmd``).

Each check builds the tiny GPT and Llama, runs a reference single-process
training on the full module (every rank computes it; it is tiny), runs the same
steps through ``autopar.parallelize`` under a hand-written plan, and returns plain
numbers for the test process to compare.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Callable, Iterator
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


def loss_fn(out: Any, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of one (micro-)batch; ``out`` is logits or a ``ModelOutput`` with them."""
    logits = out.logits if hasattr(out, "logits") else out
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


def reference(family: str, data: list[tuple[torch.Tensor, torch.Tensor]], *,
              fresh_optimizer_at: int | None = None) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Single-process training of the original module: losses per step and the final parameters.

    With ``fresh_optimizer_at=k`` the optimizer restarts (momentum lost) before step ``k``: what a
    resume that dropped the optimizer state would compute.
    """
    model = build_model(family)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    losses = []
    for step, (x, y) in enumerate(data):
        if step == fresh_optimizer_at:
            opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
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


class RecordingLoss:
    """``loss_fn`` that also records what its logits were on this rank: (type, placements, local shape)."""

    def __init__(self) -> None:
        self.seen: set[tuple[str, str, tuple[int, ...]]] = set()

    def __call__(self, out: Any, targets: torch.Tensor) -> torch.Tensor:
        from torch.distributed.tensor import DTensor

        logits = out.logits if hasattr(out, "logits") else out
        local = logits.to_local() if isinstance(logits, DTensor) else logits
        self.seen.add((type(logits).__name__, str(getattr(logits, "placements", "")), tuple(local.shape)))
        return loss_fn(out, targets)


def train(pm: Any, data: list[tuple[torch.Tensor, torch.Tensor]], opt: torch.optim.Optimizer,
          loss: Callable[[Any, torch.Tensor], torch.Tensor] = loss_fn) -> list[float]:
    """Run ``pm.step`` and the optimizer over ``data``; the loss per step."""
    losses = []
    for x, y in data:
        losses.append(pm.step(x, y, loss).item())
        opt.step()
        opt.zero_grad()
    return losses


def _parallelize(family: str, *, seed: int = 7, **kwargs: Any) -> Any:
    from autopar.api import parallelize

    example = (torch.zeros(2, SEQ_LEN, dtype=torch.long),)
    return parallelize(build_model(family, meta=True), example, seed=seed, **kwargs)


def _parallel(family: str, plan_kwargs: dict[str, Any], data: list[tuple[torch.Tensor, torch.Tensor]],
              init: dict[str, torch.Tensor]) -> tuple[list[float], Any, torch.optim.Optimizer]:
    pm = _parallelize(family, plan=make_plan(layer_paths(family), family=family, **plan_kwargs))
    pm.load_state_dict(init)
    opt = pm.optimizer(torch.optim.SGD, lr=LR, momentum=MOMENTUM)
    return train(pm, data, opt), pm, opt


def _compare(family: str, pm: Any, steps: int) -> dict[str, Any]:
    """Train ``pm`` from the reference weights and compare with the single-process run."""
    data = batches(steps, pm.plan.layout.global_batch_size)
    ref_losses, ref_state = reference(family, data)
    init = build_model(family).state_dict()
    pm.load_state_dict(init)
    recorder = RecordingLoss()
    with _counting_unshards() as unshards:
        losses = train(pm, data, pm.optimizer(torch.optim.SGD, lr=LR, momentum=MOMENTUM), recorder)
    state = full_local_state(pm)
    return {
        "loss_inputs": sorted(recorder.seen),
        "ref_losses": ref_losses, "losses": losses,
        "max_diff": max((state[k] - ref_state[k]).abs().max().item() for k in state),
        "moved": max((ref_state[k] - init[k]).abs().max().item() for k in state),
        "total_numel": sum(v.numel() for v in init.values()),
        "keys": sorted(state), "ref_keys": sorted(k for k in ref_state if k in init),
        "unshards_per_step": unshards[0] / steps,
        **describe(pm),
    }


@contextlib.contextmanager
def _counting_unshards() -> Iterator[list[int]]:
    """Count FSDP2 unshards that do work (gather or copy-out; not the no-ops of an unsharded group)."""
    from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup

    count, original = [0], FSDPParamGroup.unshard

    def unshard(self: Any, *args: Any, **kwargs: Any) -> Any:
        count[0] += self._all_gather_result is None and not self.is_unsharded
        return original(self, *args, **kwargs)

    FSDPParamGroup.unshard = unshard
    try:
        yield count
    finally:
        FSDPParamGroup.unshard = original


def check_equivalence(plan_kwargs: dict[str, Any], steps: int = 3, loss_variants: bool = False) -> dict[str, Any]:
    """Losses and parameters of ``parallelize`` under a hand-written plan vs. the original module, per family
    (and, with ``loss_variants``, ``check_loss_variants`` in the same process group).

    Under TP without SP or PP, also ``llama_o_replicated``: Llama with ``o_proj`` kept whole (what the ILP
    chooses for plan_regret's Llama at tp2), with the per-rank shapes its attention and MLP ran at.
    """
    out = {family: _compare(family, _parallelize(family, plan=make_plan(layer_paths(family), family=family,
                                                                          **plan_kwargs)), steps)
           for family in FAMILIES}
    if plan_kwargs.get("tp", 1) > 1 and not plan_kwargs.get("sequence_parallel") and plan_kwargs.get("pp", 1) == 1:
        out["llama_o_replicated"] = _compare_local_shapes(plan_kwargs, steps)
    return {**out, "loss_variants": check_loss_variants()} if loss_variants else out


LOCAL_SHAPE_OPS = ("aten.silu.default", "aten._softmax.default")
"""The ops whose per-rank output shapes ``_compare_local_shapes`` records: the MLP's activation (its
intermediate width) and the eager attention's softmax (its heads on dim 1)."""


def _compare_local_shapes(plan_kwargs: dict[str, Any], steps: int) -> dict[str, Any]:
    """``_compare`` for Llama with ``self_attn.o_proj`` replicated, recording the per-rank (local) output shapes
    of ``LOCAL_SHAPE_OPS`` as DTensor computed them."""
    from torch.distributed.tensor import DTensor
    from torch.utils._python_dispatch import TorchDispatchMode

    from autopar.plan import ShardingPlan
    from tests.emit.plans import LLAMA_BLOCK, LLAMA_EMBED, LLAMA_HEAD, REP

    shapes: dict[str, set[tuple[int, ...]]] = {op: set() for op in LOCAL_SHAPE_OPS}

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
            out = func(*args, **(kwargs or {}))
            if str(func) in shapes and isinstance(out, DTensor):  # the emitted program's (not the reference's)
                shapes[str(func)].add(tuple(out.to_local().shape))
            return out

    block = {**LLAMA_BLOCK, "self_attn.o_proj": REP}
    sharding = tuple(ShardingPlan(layer_kind=kind, modules=mods, ops={})
                     for kind, mods in (("block", block), ("embed", LLAMA_EMBED), ("head", LLAMA_HEAD)))
    pm = _parallelize("llama", plan=make_plan(layer_paths("llama"), family="llama", sharding=sharding, **plan_kwargs))
    with Record():
        got = _compare("llama", pm, steps)
    config = build_model("llama", meta=True).config
    return {**got, "local_shapes": {op: sorted(v) for op, v in shapes.items()},
            "ffn": config.intermediate_size, "heads": config.num_attention_heads}


def check_planned_equivalence(constraints: dict[str, Any], global_batch_size: int, steps: int = 3,
                              sp_families: tuple[str, ...] = ()) -> dict[str, Any]:
    """As ``check_equivalence``, with the plan made by autopar's planner on rank 0 (``plan=None``).

    ``sp_families`` are planned and run a second time with sequence parallelism pinned (key ``FAMILY_sp``).
    """
    out: dict[str, Any] = {}
    runs = [(f, f, constraints) for f in FAMILIES]
    runs += [(f"{f}_sp", f, {**constraints, "sequence_parallel": True}) for f in sp_families]
    for key, family, pins in runs:
        pm = _parallelize(family, cluster="dgx-h100", global_batch_size=global_batch_size, constraints=pins,
                          dtype="float32")
        out[key] = {**_compare(family, pm, steps), "plan": pm.plan.layout.describe(),
                    "sharded_kinds": len({s.layer_kind for st in pm.plan.stages for s in st.sharding}),
                    "split_modules": sum(v.value != "replicate" for st in pm.plan.stages for s in st.sharding
                                         for v in s.modules.values())}
    return out


def describe(pm: Any) -> dict[str, Any]:
    """What was applied on this rank: wrappers, shard sizes, schedule (for the tests' assertions)."""
    from torch.distributed._composable.replicate_with_fsdp import ReplicateModule
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    modules = [m for part in pm.parts for m in part.modules()]
    params = list(pm.parameters())
    return {
        "param_types": sorted({type(p).__name__ for p in params}),
        "local_numel": sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params),
        "checkpointed": sum("CheckpointWrapper" in type(m).__name__ for m in modules),
        "fsdp_units": sum(isinstance(m, FSDPModule) and not isinstance(m, ReplicateModule) for m in modules),
        "replicate_units": sum(isinstance(m, ReplicateModule) for m in modules),
        "schedule": type(pm.schedule).__name__ if pm.schedule is not None else None,
        "num_parts": len(pm.parts),
        "blocks": sorted(p for p in pm.state_dict() if p.endswith(("q_proj.weight",))),
        "received": received_shapes(pm),
    }


def received_shapes(pm: Any) -> list[list[Any]]:
    """Per local pipeline stage, (shape, dtype) of each activation receive buffer and each gradient receive
    buffer its schedule ran with (empty without a pipeline)."""
    schedule = pm.schedule
    if schedule is None:
        return []
    stages = getattr(schedule, "_stages", None) or [schedule._stage]
    out = []
    for stage in stages:
        infos = [*stage.args_recv_info.get(0, ()), *(stage.grad_recv_info.get(0, ()) or ())]
        out.append([[list(i.buffer.shape), str(i.buffer.dtype)] for i in infos
                    if getattr(i, "buffer", None) is not None])
    return out


def check_resume(first: dict[str, Any], second: dict[str, Any], steps: tuple[int, int] = (2, 2)) -> dict[str, Any]:
    """Train under plan ``first``, save, load under plan ``second`` into a fresh model, continue.

    The fresh model first loads the weights alone and trains from there: a control that must
    give the single-process run with its optimizer restarted at the resume (``fresh_losses``),
    whose losses differ from the uninterrupted run's, or the comparison would prove nothing about
    the optimizer state (momentum) that the checkpoint carries. Then it loads the whole checkpoint
    again, weights and optimizer, over what the control changed, and continues.
    """
    import torch.distributed as dist

    out: dict[str, Any] = {}
    for family in FAMILIES:
        plan = make_plan(layer_paths(family), family=family, **first)
        data = batches(sum(steps), plan.layout.global_batch_size, seed=5)
        ref_losses, ref_state = reference(family, data)
        losses, pm, opt = _parallel(family, first, data[: steps[0]], build_model(family).state_dict())
        path = _shared_tempdir()
        pm.save(path, opt)
        control, resumed, state = _continue(family, second, path, data[steps[0]:])
        fresh_losses, _ = reference(family, data, fresh_optimizer_at=steps[0])
        dist.barrier()
        if dist.get_rank() == 0:
            shutil.rmtree(path)
        out[family] = {
            "ref_losses": ref_losses, "losses": losses + resumed, "control_losses": losses + control,
            "fresh_losses": fresh_losses,
            "max_diff": max((state[k] - ref_state[k]).abs().max().item() for k in state), "keys": sorted(state),
        }
    return out


def _continue(family: str, plan_kwargs: dict[str, Any], path: str,
              data: list[Any]) -> tuple[list[float], list[float], dict[str, torch.Tensor]]:
    """Losses from the weights alone, then from the whole checkpoint reloaded; the final state."""
    from autopar.emit.parallelize import parallelize

    plan = make_plan(layer_paths(family), family=family, **plan_kwargs)
    example = (torch.zeros(2, SEQ_LEN, dtype=torch.long),)
    pm = parallelize(build_model(family, meta=True), example, plan=plan, seed=99)
    opt = pm.optimizer(torch.optim.SGD, lr=LR, momentum=MOMENTUM)
    pm.load(path)
    control = train(pm, data, opt)
    pm.load(path, opt)
    losses = train(pm, data, opt)
    return control, losses, full_local_state(pm)


def _shared_tempdir() -> str:
    import torch.distributed as dist

    box: list[Any] = [tempfile.mkdtemp(prefix="autopar-ckpt-") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return str(box[0])


CHECKS: dict[str, Callable[..., dict[str, Any]]] = {"equivalence": check_equivalence, "resume": check_resume}
"""Entry points the tests call by name."""


def check_outside_torchrun() -> dict[str, Any]:
    """In a plain process: a multi-GPU plan is refused; a one-GPU plan runs here and matches the reference."""
    import os

    from autopar.emit.parallelize import parallelize
    from autopar.errors import UserInputError

    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(name, None)
    example = (torch.zeros(2, SEQ_LEN, dtype=torch.long),)
    out: dict[str, Any] = {}
    try:
        parallelize(build_model("gpt", meta=True), example, plan=make_plan(layer_paths("gpt"), dp=2))
    except UserInputError as e:
        out["refused"] = str(e)
    single = {"num_micro_batches": 4, "recompute": "full"}
    out["equivalence"] = check_equivalence(single)
    pm = parallelize(build_model("gpt", meta=True), example, plan=make_plan(layer_paths("gpt"), **single))
    try:
        pm.step(torch.zeros(3, SEQ_LEN, dtype=torch.long), torch.zeros(3, SEQ_LEN, dtype=torch.long), loss_fn)
    except UserInputError as e:
        out["bad_batch"] = str(e)
    out["meta_init"] = {family: _meta_init_summary(family) for family in FAMILIES}
    return out


def _meta_init_summary(family: str) -> dict[str, Any]:
    """Weights of a meta-built model materialised by ``parallelize`` (no state loaded), against a real build."""
    pm = _parallelize(family, plan=make_plan(layer_paths(family), family=family), seed=3)
    real = build_model(family)
    x, y = batches(1, 4)[0]
    with torch.no_grad():
        mb = pm.plan.layout.micro_batch_size
        loss = loss_fn(pm.forward(x[:mb]), y[:mb]).item()
    stds = {name: p.std().item() for name, p in pm.named_parameters() if p.dim() == 2}
    real_stds = {name: p.std().item() for name, p in real.named_parameters() if p.dim() == 2}
    buffers = {n: (b, dict(real.named_buffers())[n]) for n, b in pm.module.named_buffers()}
    return {
        "loss": loss,
        "std_ratio": max(abs(stds[n] / real_stds[n] - 1) for n in stds),
        "buffers_equal": all(torch.equal(a, b) for a, b in buffers.values()),
        "num_buffers": len(buffers),
    }


def run_train_gpt(argv: list[str]) -> list[float]:
    """``examples/train_gpt.py`` on this rank; its losses."""
    from autopar.examples import train_gpt

    return train_gpt.main(argv)


def check_plan_on_rank0() -> dict[str, Any]:
    """``parallelize`` without a plan: rank 0 plans (a stand-in planner here), every rank gets its plan."""
    import torch.distributed as dist

    import autopar.api
    from autopar.api import parallelize
    from autopar.errors import InfeasiblePlanError

    calls: list[int] = []

    def stand_in(model: nn.Module, example_inputs: Any, *, cluster: Any, global_batch_size: int, **kw: Any) -> Any:
        calls.append(dist.get_rank())
        pins = kw["constraints"]  # a typed Pins value, with the job's world size filled in
        assert pins.num_gpus == dist.get_world_size()
        return make_plan(layer_paths("gpt"), dp=2, zero_stage=pins.zero_stage,
                         micro_batch_size=global_batch_size // 4, num_micro_batches=2)

    def infeasible(*args: Any, **kwargs: Any) -> Any:
        raise InfeasiblePlanError("nothing fits in 80 GiB; 3 nodes would")

    example = (torch.zeros(2, SEQ_LEN, dtype=torch.long),)
    autopar.api.plan = stand_in  # this process only: it is a forked test worker
    pm = parallelize(build_model("gpt", meta=True), example, cluster="dgx-h100", global_batch_size=8,
                     constraints={"zero_stage": 3})
    x, y = batches(1, 8)[0]
    out: dict[str, Any] = {"calls": calls, "plan": pm.plan.to_json(), "loss": pm.step(x, y, loss_fn).item()}
    autopar.api.plan = infeasible
    try:
        parallelize(build_model("gpt", meta=True), example, cluster="dgx-h100", global_batch_size=8)
    except InfeasiblePlanError as e:  # rank 0's error class reaches every rank
        out["error"] = str(e)
    return out


def check_bf16(layouts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """bfloat16 plans, one after the other: compute in bf16 (FSDP mixed precision), fp32 master weights."""
    return [_check_bf16(kwargs) for kwargs in layouts]


def _check_bf16(plan_kwargs: dict[str, Any], steps: int = 3) -> dict[str, Any]:
    from autopar.emit.parallelize import parallelize

    plan = make_plan(layer_paths("gpt"), dtype="bfloat16", **plan_kwargs)
    data = batches(steps, plan.layout.global_batch_size)
    ref_losses, _ = reference("gpt", data)
    pm = parallelize(build_model("gpt", meta=True), (torch.zeros(2, SEQ_LEN, dtype=torch.long),), plan=plan)
    pm.load_state_dict(build_model("gpt").state_dict())
    seen: set[torch.dtype] = set()
    linears = (m for part in pm.parts for n, m in part.named_modules() if n.endswith((".q_proj", ".c_fc", "lm_head")))
    for module in linears:  # the program's outlined copies of the model's Linear modules
        module.register_forward_hook(lambda mod, inp, out: seen.add(out.dtype))
    opt = pm.optimizer(torch.optim.SGD, lr=LR, momentum=MOMENTUM)
    return {"ref_losses": ref_losses, "losses": train(pm, data, opt),
            "compute_dtypes": sorted(str(d) for d in seen),
            "param_dtypes": sorted({str(p.dtype) for p in pm.parameters()})}


def _variant_losses() -> dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    """Losses on (batch, seq, vocab) logits: those loss_parallel runs exactly, and those it must not run."""
    def flat(lg: torch.Tensor) -> torch.Tensor:
        return lg.flatten(0, 1)

    def numpy_weighted(lg: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        scale = float(lg.detach().numpy().std())  # a loss that leaves torch: DTensor cannot run it
        return F.cross_entropy(flat(lg), y.flatten()) * scale

    def manual_smoothing(lg: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logp = F.log_softmax(flat(lg), dim=-1)  # runs on DTensors: loss_parallel would fuse its backward wrongly
        return 0.9 * F.nll_loss(logp, y.flatten()) - 0.1 * logp.mean()

    return {
        "ce": lambda lg, y: F.cross_entropy(flat(lg), y.flatten()),
        "ce_ignore_sum": lambda lg, y: F.cross_entropy(flat(lg), y.flatten(), ignore_index=-100, reduction="sum"),
        "ce_class_dim_1": lambda lg, y: F.cross_entropy(lg.transpose(1, 2), y),
        "label_smoothing": lambda lg, y: F.cross_entropy(flat(lg), y.flatten(), label_smoothing=0.1),
        "manual_smoothing": manual_smoothing,
        "nll_of_softmax_log": lambda lg, y: F.nll_loss(flat(lg).softmax(-1).log(), y.flatten()),
        "numpy_weighted": numpy_weighted,
        "squares": lambda lg, y: lg.pow(2).mean(),
    }


def check_loss_variants() -> dict[str, Any]:
    """Each variant on 2 tp ranks through ``VocabParallelLoss`` under ``loss_parallel``, against the full logits.

    Returns, per variant, the loss and gradient errors and whether the parallel path was kept (the loss
    function saw only DTensors); and the gradient error of the hand-written label smoothing run under
    ``loss_parallel`` unguarded (what the guard prevents).
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor.experimental import implicit_replication

    from autopar.emit.loss import VocabParallelLoss, maybe_loss_parallel

    mesh, rank = init_device_mesh("cpu", (dist.get_world_size(),)), dist.get_rank()
    g = torch.Generator().manual_seed(3)
    full = torch.randn(2, 5, 16, generator=g)
    y = torch.randint(0, 16, (2, 5), generator=g)
    y[0, 1] = -100

    def sharded(leaf: torch.Tensor) -> DTensor:
        return DTensor.from_local(leaf.chunk(2, -1)[rank], mesh, [Shard(2)], run_check=False)

    out: dict[str, Any] = {}
    for name, fn in _variant_losses().items():
        ref_leaf = full.clone().requires_grad_()
        ref = fn(ref_leaf, y.clamp(min=0) if name != "ce_ignore_sum" else y)
        ref.backward()
        kinds: list[str] = []

        def seen(lg: torch.Tensor, t: torch.Tensor, fn: Any = fn, kinds: list[str] = kinds) -> torch.Tensor:
            kinds.append(type(lg).__name__)
            return fn(lg, t)

        leaf = full.clone().requires_grad_()
        with maybe_loss_parallel(True), implicit_replication():  # as ParallelModel.step runs the loss
            loss = VocabParallelLoss()(seen, sharded(leaf), y.clamp(min=0) if name != "ce_ignore_sum" else y,
                                       parallel=True)
            loss.backward()
        mine = slice(rank * 8, rank * 8 + 8)
        out[name] = {"loss_err": abs(loss.item() - ref.item()), "plain": type(loss).__name__ == "Tensor",
                     "grad_err": (leaf.grad[..., mine] - ref_leaf.grad[..., mine]).abs().max().item(),
                     "parallel_kept": kinds == ["DTensor"]}
    leaf, ref_leaf = full.clone().requires_grad_(), full.clone().requires_grad_()
    _variant_losses()["manual_smoothing"](ref_leaf, y.clamp(min=0)).backward()
    with maybe_loss_parallel(True), implicit_replication():
        _variant_losses()["manual_smoothing"](sharded(leaf), y.clamp(min=0)).full_tensor().backward()
    out["unguarded_smoothing_grad_err"] = (leaf.grad[..., mine] - ref_leaf.grad[..., mine]).abs().max().item()
    return out
