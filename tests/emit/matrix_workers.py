"""Rank code of the architecture × layout matrix (``test_matrix.py``).

One 4-rank process group runs every layout for one architecture: rank 0
captures the model once and plans each layout with autopar's planner on the
slow-compute test cluster (``slow_compute.yaml``), every rank receives the
plans, then each layout is emitted from the same real weights, trained for three
SGD steps and compared with a single-process run of the original module.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from tests.emit.zoo import ARCHS, Arch, batch

CLUSTER = str(Path(__file__).with_name("slow_compute.yaml"))
GLOBAL_BATCH = 4
STEPS = 3
LR = 0.1
MOMENTUM = 0.9

LAYOUTS: dict[str, dict[str, Any]] = {
    "tp2_pp2_1f1b": {"dp": 1, "tp": 2, "pp": 2, "schedule": "1f1b", "micro_batch_size": 1, "zero_stage": 0,
                     "sequence_parallel": False, "recompute": "none"},
    "tp2_pp2_sp": {"dp": 1, "tp": 2, "pp": 2, "schedule": "1f1b", "micro_batch_size": 1, "zero_stage": 0,
                   "sequence_parallel": True, "recompute": "none"},
    "dp2_tp2_sp": {"dp": 2, "tp": 2, "pp": 1, "micro_batch_size": 2, "zero_stage": 0, "sequence_parallel": True,
                   "recompute": "none"},
    "zero3_dp2_pp2": {"dp": 2, "tp": 1, "pp": 2, "schedule": "1f1b", "micro_batch_size": 1, "zero_stage": 3,
                      "sequence_parallel": False, "recompute": "none"},
}
"""The layouts of the matrix, as pins for the planner (it chooses the stage split and the shardings)."""


def build(arch: Arch, *, seed: int = 1234, dropout: bool = False) -> torch.nn.Module:
    """The architecture's tiny model with weights fixed by ``seed`` (the same on every rank)."""
    torch.manual_seed(seed)
    return arch.build(dropout)


def plans_for(arch: Arch, layouts: dict[str, dict[str, Any]], *, dropout: bool = False) -> dict[str, str]:
    """Layout name → plan JSON (or ``"error:<class>:<message>"``), planned once on rank 0 and shared."""
    import autopar
    from autopar.api import plan_graph
    from autopar.emit.parallelize import share_from_rank0
    from autopar.errors import AutoparError

    def make() -> str:
        inputs, _ = batch(arch, 2)
        graph = autopar.capture(build(arch, dropout=dropout), inputs)
        out = {}
        for name, pins in layouts.items():
            try:
                out[name] = plan_graph(graph, cluster=CLUSTER, global_batch_size=GLOBAL_BATCH, constraints=pins,
                                       dtype="float32").to_json()
            except AutoparError as e:
                out[name] = f"error:{type(e).__name__}:{e}"
        return json.dumps(out)

    return json.loads(share_from_rank0(make))


def reference(arch: Arch, data: list[tuple[dict[str, torch.Tensor], torch.Tensor]]) -> tuple[list[float], dict]:
    """Single-process training of the original module: losses and final parameters."""
    model = build(arch)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    losses = []
    for x, y in data:
        loss = arch.loss(model(**x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, {k: v.detach().clone() for k, v in model.named_parameters(remove_duplicate=False)}


def run_layout(arch: Arch, plan_json: str, ref: tuple[list[float], dict] | None = None,
               groups: list[list[str]] | None = None) -> dict[str, Any]:
    """Emit ``plan_json`` on this rank, train, and compare with the reference (computed here unless given:
    it depends on the architecture only, so ``check_arch`` computes it once for all layouts)."""
    from torch.distributed.tensor import DTensor

    import autopar
    from autopar.plan import Plan
    from tests.emit.workers import received_shapes

    plan = Plan.from_json(plan_json)
    data = [batch(arch, GLOBAL_BATCH, seed=10 + i) for i in range(STEPS)]
    ref_losses, ref_state = ref or reference(arch, data)
    pm = autopar.parallelize(build(arch), batch(arch, 2)[0], plan=plan)
    opt = pm.optimizer(torch.optim.SGD, lr=LR, momentum=MOMENTUM)
    losses = []
    for x, y in data:
        losses.append(pm.step(x, y, arch.loss).item())
        opt.step()
        opt.zero_grad()
    full = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach() for k, v in pm.state_dict().items()}
    return {
        "losses": losses, "ref_losses": ref_losses,
        "max_diff": max(_relative_diff(full[k], ref_state[k]) for k in full if k in ref_state),
        "keys": sorted(k for k in full if k in ref_state), "ref_groups": groups or _alias_groups(arch),
        "tp_sharded": sorted(_tp_sharded(pm)), "plan": plan.layout.describe(),
        "stages": [list(s.module_paths) for s in plan.stages],
        "received": received_shapes(pm),
    }


def _relative_diff(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest ``|got - ref| / max(1, |ref|)``: absolute for values up to 1, relative above, so a weight a
    family's dynamics drive large (GLM-4's ``v_proj.bias`` reaches 5e7 in three steps at lr 0.1, behind its
    post-attention norm) is held to its float32 rounding, as every other weight is to 1e-5."""
    return ((got - ref).abs() / ref.abs().clamp(min=1.0)).max().item()


def _alias_groups(arch: Arch) -> list[list[str]]:
    """The parameters the forward pass reads, as groups of names (a tied tensor is one group of several names).

    A parameter no op reads (BERT's ``cls.predictions.bias``, superseded by the decoder's bias) is in
    no exported program, so no stage holds it.
    """
    model = build(arch)
    x, y = batch(arch, 2)
    arch.loss(model(**x), y).backward()
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if p.grad is not None:
            groups.setdefault(id(p), []).append(name)
    return list(groups.values())


def _tp_sharded(pm: Any) -> list[str]:
    """Parameters split over the ``tp`` mesh axis on this rank."""
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    out = []
    for name, p in pm.named_parameters():
        if isinstance(p, DTensor) and "tp" in (p.device_mesh.mesh_dim_names or ()):
            axis = p.device_mesh.mesh_dim_names.index("tp")
            if isinstance(p.placements[axis], (Shard, _StridedShard)):  # strided: a fused projection's parts
                out.append(name.replace("_checkpoint_wrapped_module.", ""))
    return out


def check_arch(name: str, layouts: list[str]) -> dict[str, Any]:
    """Every layout of ``layouts`` for one architecture: results, or the autopar error that refused it."""
    from autopar.errors import AutoparError

    arch = ARCHS[name]
    plans = plans_for(arch, {k: LAYOUTS[k] for k in layouts})
    out: dict[str, Any] = {}
    ref: tuple[list[float], dict] | None = None
    groups: list[list[str]] | None = None
    for layout, text in plans.items():
        if text.startswith("error:"):
            out[layout] = {"refused": text}
            continue
        try:
            if ref is None:
                ref = reference(arch, [batch(arch, GLOBAL_BATCH, seed=10 + i) for i in range(STEPS)])
                groups = _alias_groups(arch)
            out[layout] = run_layout(arch, text, ref, groups)
        except AutoparError as e:
            out[layout] = {"refused": f"error:{type(e).__name__}:{e}"}
    return out


def check_dropout(steps: int = 2) -> dict[str, Any]:
    """GPT-2 with dropout 0.1 under TP2 (planned): masks of replicated activations, and two seeded runs."""
    from torch.distributed.tensor import DTensor, Replicate

    import autopar
    from autopar.plan import Plan

    arch = ARCHS["gpt2"]
    pins = {"dp": 1, "tp": 2, "pp": 1, "micro_batch_size": 2, "zero_stage": 0, "sequence_parallel": False,
            "recompute": "none", "num_gpus": 2}
    plan = Plan.from_json(plans_for(arch, {"tp2": pins}, dropout=True)["tp2"])
    data = [batch(arch, GLOBAL_BATCH, seed=20 + i) for i in range(steps)]
    runs, masks = [], {}
    for run in range(2):
        pm = autopar.parallelize(build(arch, dropout=True), batch(arch, 2)[0], plan=plan, seed=5)
        if run == 0:
            for name, module in pm.parts[0].named_modules():
                if name.endswith(("drop", "dropout")):
                    module.register_forward_hook(lambda m, a, out, name=name: _keep_first(masks, name, out))
        opt = pm.optimizer(torch.optim.SGD, lr=LR)
        losses = []
        for x, y in data:
            losses.append(pm.step(x, y, arch.loss).item())
            opt.step()
            opt.zero_grad()
        runs.append(losses)
    replicated = {n: (t.to_local() == 0).flatten().tolist() for n, t in masks.items()
                  if all(isinstance(p, Replicate) for p in t.placements)}
    sharded = {n: (t.to_local() == 0).flatten().tolist() for n, t in masks.items() if n not in replicated}
    ref_no_dropout, _ = reference(arch, data)
    return {"runs": runs, "replicated_masks": replicated, "sharded_masks": sharded,
            "no_dropout_losses": ref_no_dropout, "sharded_weights": len(_tp_sharded(pm))}


def _keep_first(store: dict[str, Any], name: str, out: Any) -> None:
    """Forward hook body: remember a module's first DTensor output (returns None: the output is unchanged)."""
    from torch.distributed.tensor import DTensor

    if isinstance(out, DTensor):
        store.setdefault(name, out)


def check_tied_resume(first: str, second: str) -> dict[str, Any]:
    """GPT-2 (tied embedding and LM head): 2 steps under ``first``, checkpoint, 2 more under ``second``."""
    import shutil
    import tempfile

    import torch.distributed as dist

    import autopar
    from autopar.plan import Plan

    arch = ARCHS["gpt2"]
    plans = {k: Plan.from_json(v) for k, v in plans_for(arch, {first: LAYOUTS[first],
                                                             second: LAYOUTS[second]}).items()}
    data = [batch(arch, GLOBAL_BATCH, seed=30 + i) for i in range(4)]
    ref_losses, ref_state = reference(arch, data)
    pm = autopar.parallelize(build(arch), batch(arch, 2)[0], plan=plans[first])
    opt = pm.optimizer(torch.optim.SGD, lr=LR, momentum=MOMENTUM)
    losses = [_train_step(pm, opt, arch, x, y) for x, y in data[:2]]
    box: list[Any] = [tempfile.mkdtemp(prefix="autopar-tied-") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    pm.save(box[0], opt)
    fresh = autopar.parallelize(build(arch, seed=99), batch(arch, 2)[0], plan=plans[second])
    opt2 = fresh.optimizer(torch.optim.SGD, lr=LR, momentum=MOMENTUM)
    fresh.load(box[0], opt2)
    losses += [_train_step(fresh, opt2, arch, x, y) for x, y in data[2:]]
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(box[0])
    from torch.distributed.tensor import DTensor

    full = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach() for k, v in fresh.state_dict().items()}
    return {"losses": losses, "ref_losses": ref_losses,
            "max_diff": max((full[k] - ref_state[k]).abs().max().item() for k in full if k in ref_state),
            "plans": [plans[first].layout.describe(), plans[second].layout.describe()]}


def _train_step(pm: Any, opt: torch.optim.Optimizer, arch: Arch, x: Any, y: torch.Tensor) -> float:
    loss = pm.step(x, y, arch.loss).item()
    opt.step()
    opt.zero_grad()
    return loss
