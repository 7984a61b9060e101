"""The collectives a tensor-parallel program issues per step, against the ones its plan prices.

    python bench/tp_collectives.py                 # plan_regret's GPT and Llama, tp=2 with and without SP
    python bench/tp_collectives.py --cluster dgx-h100
    python bench/tp_collectives.py --cluster-dir bench/out/plan_regret  # plan_regret's cluster and op tables
    python bench/tp_collectives.py --data-parallel  # GPT at dp2 tp1, ZeRO 0/2/3, 2 micro-batches: DP's collectives

Plans each ``plan_regret.MODELS`` model pinned to dp=1 tp=2 pp=1 (fp32, one micro-batch of the
bench's global batch), runs one training step of each on 2 gloo ranks under a dispatch mode that
logs every c10d collective (kind, bytes of its tensors, forward or backward, and where: the
innermost module in forward, the autograd node in backward), and prints per (phase, kind) the
count and bytes issued next to what the pricing charges: the sharding ILP's collectives of each
layer (``LayerPricer``'s ``LayerShardingResult``) times its layers, at the micro-batch's size.
Counts are load-independent: this is the mechanism behind plan_regret's TP timings.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import plan_regret  # noqa: E402
import regret_worker  # noqa: E402

KINDS = {  # c10d op (eager and functional) -> the pricing's collective kind
    "allreduce_": "all_reduce", "all_reduce": "all_reduce", "allreduce_coalesced_": "all_reduce",
    "allgather_": "all_gather", "_allgather_base_": "all_gather", "allgather_into_tensor_coalesced_": "all_gather",
    "all_gather_into_tensor": "all_gather", "all_gather_into_tensor_coalesced": "all_gather",
    "reduce_scatter_": "reduce_scatter", "_reduce_scatter_base_": "reduce_scatter",
    "reduce_scatter_tensor": "reduce_scatter", "reduce_scatter_tensor_coalesced": "reduce_scatter",
    "broadcast_": "broadcast", "broadcast": "broadcast", "alltoall_": "all_to_all", "alltoall_base_": "all_to_all",
    "all_to_all_single": "all_to_all", "send": "p2p", "recv_": "p2p", "barrier": "barrier",
}


def _nbytes(kind: str, args: tuple[Any, ...], out: Any) -> int:
    """NCCL "size" (comm.py's convention): the full buffer for all-gather/reduce-scatter, the tensor otherwise."""
    def tensors(x: Any) -> list[torch.Tensor]:
        if isinstance(x, torch.Tensor):
            return [x]
        if isinstance(x, (list, tuple)):
            return [t for y in x for t in tensors(y)]
        return []

    ins = tensors(args[0]) if args else []
    size = sum(t.numel() * t.element_size() for t in ins)
    if kind == "all_gather":
        outs = tensors(out) or tensors(args[1] if len(args) > 1 else [])
        size = max(size, sum(t.numel() * t.element_size() for t in outs))
    return size


class CollectiveLog(TorchDispatchMode):
    """Every c10d collective dispatched while active: (phase, kind, bytes, where)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, str, int, str]] = []
        self.module_stack: list[str] = []
        self.unknown: Counter[str] = Counter()  # c10d ops that are not collectives KINDS names (waits, ...)
        self.phase: str | None = None  # set around the optimizer step and the loss
        self.in_alltoall = False  # inside DTensor's shard_dim_alltoall: on gloo an all-gather stands in for it

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        from torch.distributed.tensor import DTensor

        if isinstance(func, torch._ops.HigherOrderOperator):
            return func(*args, **(kwargs or {}))
        if any(issubclass(t, DTensor) for t in types):
            # modes run before subclasses: let DTensor desugar the op first, so the collectives its sharding
            # propagation inserts reach this mode (as torch's CommDebugMode does); a mode that ran the DTensor
            # op itself would miss them (it is off the stack inside its own handler)
            return NotImplemented
        out = func(*args, **(kwargs or {}))
        ns, name = func.namespace, func.overloadpacket.__name__
        if ns in ("c10d", "_c10d_functional") and name in KINDS:
            node = torch._C._current_autograd_node()
            phase = self.phase or ("backward" if node is not None else "forward")
            where = node.name() if node is not None else (self.module_stack[-1] if self.module_stack else "-")
            kind = "all_to_all" if self.in_alltoall and KINDS[name] == "all_gather" else KINDS[name]
            self.calls.append((phase, kind, _nbytes(kind, args, out), where))
        elif ns in ("c10d", "_c10d_functional"):
            self.unknown[name] += 1
        return out

    def hook(self, module: torch.nn.Module) -> None:
        def enter(path: str) -> None:
            self.module_stack.append(path)

        def leave() -> None:  # a forward hook that returned a value would replace the module's output
            self.module_stack.pop()

        for path, sub in module.named_modules():
            sub.register_forward_pre_hook(lambda m, a, p=path or "<root>": enter(p))
            sub.register_forward_hook(lambda m, a, o: leave())


def run_rank(rank: int, world: int, port: int, cases: list[tuple[str, str]], queue: Any) -> None:
    """One training step of each (model, plan JSON) under the log; rank 0 puts its calls on ``queue``."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from autopar.emit.parallelize import parallelize
    from autopar.plan import Plan

    try:
        for name, text in cases:
            plan = Plan.from_json(text)
            try:
                calls: Any = _one_step(name, plan, parallelize)
            except Exception as e:  # a layout the emitter refuses or fails on is reported, not fatal
                calls = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            if rank == 0:
                queue.put((name, plan.layout.describe(), calls))
            dist.barrier()
    finally:
        dist.destroy_process_group()


def _sequence_numbers() -> dict[Any, int]:
    """Collectives each process group of more than one rank has issued so far (its sequence number)."""
    from torch.distributed import distributed_c10d as c10d

    return {group: group._get_sequence_number_for_group() for group in c10d._world.pg_map if group.size() > 1}


def _one_step(name: str, plan: Any, parallelize: Any) -> list[tuple[str, str, int, str]]:
    """The collectives of one training step (forward, backward, optimizer), after a warm-up step."""
    spec = plan_regret.MODELS[name]
    pm = parallelize(regret_worker.build_model(spec), (torch.zeros(2, spec["seq_len"], dtype=torch.long),),
                     plan=plan, seed=0)
    opt = pm.optimizer(torch.optim.AdamW, lr=1e-4)
    x = torch.randint(0, spec["vocab"], (plan.layout.global_batch_size, spec["seq_len"]))
    pm.step(x, x, regret_worker.loss_fn)  # warm-up: lazy init of FSDP/DTensor state
    opt.step()
    opt.zero_grad()  # as a training loop does: the logged step's gradients do not accumulate into these
    log = CollectiveLog()
    for part in pm.parts:
        log.hook(part)
    before = _sequence_numbers()
    with _labelled(log), log:
        pm.step(x, x, _in_phase(log, "loss", regret_worker.loss_fn))
        log.phase = "optimizer"
        opt.step()
    opt.zero_grad()
    issued_total = sum(after - before.get(group, 0) for group, after in _sequence_numbers().items())
    if issued_total != len(log.calls):  # the process groups' own count: the log missed (or invented) some
        raise RuntimeError(f"logged {len(log.calls)} collectives but the process groups issued {issued_total}")
    if log.unknown:
        print(f"{name} {plan.layout.describe()}: other c10d ops {dict(log.unknown)}", flush=True)
    return log.calls


def _in_phase(log: CollectiveLog, phase: str, fn: Any) -> Any:
    """``fn`` with its collectives logged under ``phase``."""
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        log.phase = phase
        try:
            return fn(*args, **kwargs)
        finally:
            log.phase = None
    return wrapped


@contextlib.contextmanager
def _labelled(log: CollectiveLog) -> Iterator[None]:
    """Label two kinds of collectives by what they are, not by how they are issued:

    - the runtime's gradient sync after backward (``autopar.emit.grads.reduce_grads``): phase ``grads``;
    - DTensor's Shard(i) -> Shard(j): an all-to-all on NCCL; gloo has none, and torch runs an all-gather +
      chunk instead ("CPU process group does not support alltoall yet"). Logged as the all-to-all it stands
      for, at the all-to-all's size (the local shard), as the pricing counts it.
    """
    import torch.distributed.tensor.placement_types as placement_types

    import autopar.emit.grads as grads

    real_reduce, real_alltoall = grads.reduce_grads, placement_types.shard_dim_alltoall

    def alltoall(*args: Any, **kwargs: Any) -> Any:
        log.in_alltoall = True
        try:
            return real_alltoall(*args, **kwargs)
        finally:
            log.in_alltoall = False

    grads.reduce_grads, placement_types.shard_dim_alltoall = _in_phase(log, "grads", real_reduce), alltoall
    try:
        yield
    finally:
        grads.reduce_grads, placement_types.shard_dim_alltoall = real_reduce, real_alltoall


def priced(graph: Any, plan: Any, cluster: Any) -> dict[tuple[str, str], tuple[int, float]]:
    """(phase, kind) -> (count, bytes) the pricing charges per step for ``plan``'s TP collectives."""
    from autopar.layout import Recompute
    from autopar.pricing import LayerPricer

    lay = plan.layout
    pricing = LayerPricer(graph, cluster, dtype=plan.dtype)
    scale = lay.micro_batch_size / graph.batch_size * lay.num_micro_batches
    out: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0, 0.0])
    in_plan = {sh.layer_kind: sh.forward_collectives for st in plan.stages for sh in st.sharding}
    for layer in graph.layers:
        result = pricing._sharding(layer.kind, lay.tp, lay.sequence_parallel)
        if in_plan.get(layer.kind, ()) != result.forward_collectives:
            raise RuntimeError(f"layer {layer.index}: the plan's collectives {in_plan.get(layer.kind)} are not the "
                               f"pricing's {result.forward_collectives}: planned on another cluster?")
        calls = [("forward", c) for c in result.forward_collectives] + [
            ("backward", c) for c in result.backward_collectives]
        if lay.recompute is Recompute.FULL:
            calls += [("backward", c) for c in result.forward_collectives]
        for phase, (kind, nbytes) in calls:
            out[(phase, kind)][0] += lay.num_micro_batches
            out[(phase, kind)][1] += nbytes * scale
    return {k: (int(v[0]), v[1]) for k, v in out.items()}


def issued(calls: list[tuple[str, str, int, str]]) -> dict[tuple[str, str], tuple[int, float]]:
    out: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0, 0.0])
    for phase, kind, nbytes, _ in calls:
        out[(phase, kind)][0] += 1
        out[(phase, kind)][1] += nbytes
    return {k: (int(v[0]), v[1]) for k, v in out.items()}


def plans_for(cluster: Any, measure: bool, cluster_dir: Path | None = None,
              ) -> tuple[dict[str, Any], list[tuple[str, Any]], dict[str, Any]]:
    """Per model: its graph, its tp=2 plans with and without SP, and the cluster they were planned on
    (``cluster``, or with ``measure`` this machine's 2 gloo ranks and the model's op table, as plan_regret;
    with ``cluster_dir``, the cluster and op-calibration table a plan_regret run saved there, so the plans
    are the ones plan_regret measured)."""
    import autopar
    from autopar.cost_models.cluster import Cluster
    from autopar.cost_models.profiling.calibration import CalibrationTable
    from autopar.cost_models.profiling.local_cluster import cluster_yaml, measure_local_cluster

    graphs, plans, clusters = {}, [], {}
    for name, spec in plan_regret.MODELS.items():
        model = regret_worker.build_model(spec)
        example = (torch.zeros(2, spec["seq_len"], dtype=torch.long),)
        graphs[name] = autopar.capture(model, example)
        path = Path(f"bench/out/tp_collectives/{name}_local2.yaml")
        if measure and not path.exists():  # the ILP's choice depends on the measured collectives: measured once
            measured = measure_local_cluster(2, graph=graphs[name])
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(cluster_yaml(measured, name="local2"))
        if measure:
            cluster = Cluster.from_yaml(path)
        calibration = None
        if cluster_dir is not None:
            cluster = Cluster.from_yaml(cluster_dir / "local2.yaml")
            calibration = CalibrationTable.load(cluster_dir / f"{name}_local2_calib.json")
        clusters[name] = cluster
        for sp in (False, True):
            plans.append((name, autopar.plan(model, example, cluster=cluster, global_batch_size=plan_regret.GLOBAL_BATCH,
                                             dtype="float32", calibration=calibration, constraints=dict(
                                                 dp=1, tp=2, pp=1, micro_batch_size=plan_regret.GLOBAL_BATCH,
                                                 sequence_parallel=sp, recompute="none"))))
    return graphs, plans, clusters


def report(graphs: dict[str, Any], plans: list[tuple[str, Any]], runs: list[Any], clusters: dict[str, Any]) -> None:
    by_layout = {(name, layout): calls for name, layout, calls in runs}
    for name, plan in plans:
        calls = by_layout.get((name, plan.layout.describe()), [])
        if isinstance(calls, str):
            print(f"\n== {name}: {plan.layout.describe()}: not run: {calls}")
            continue
        have, want = issued(calls), priced(graphs[name], plan, clusters[name])
        print(f"\n== {name}: {plan.layout.describe()}   (issued per step on rank 0 | priced per step)")
        for key in sorted(set(have) | set(want)):
            (n, b), (pn, pb) = have.get(key, (0, 0.0)), want.get(key, (0, 0.0))
            print(f"  {key[0]:8s} {key[1]:14s} issued {n:4d} x, {b / 1e6:8.3f} MB | priced {pn:4d} x, {pb / 1e6:8.3f} MB")
        where = Counter((phase, kind, w) for phase, kind, _, w in calls)
        print("  issued, by where (forward: innermost module; backward: autograd node):")
        for (phase, kind, w), n in sorted(where.items()):
            print(f"    {phase:8s} {kind:14s} {n:3d} x  {w}")


def dp_plans(cluster: Any) -> list[tuple[str, Any]]:
    """GPT at dp2 tp1 pp1 with 2 micro-batches of 2, ZeRO 0, 2 and 3: how often FSDP2 gathers and reduces."""
    import autopar

    spec = plan_regret.MODELS["gpt"]
    model = regret_worker.build_model(spec)
    example = (torch.zeros(2, spec["seq_len"], dtype=torch.long),)
    return [("gpt", autopar.plan(model, example, cluster=cluster, global_batch_size=plan_regret.GLOBAL_BATCH,
                                 dtype="float32", constraints=dict(dp=2, tp=1, pp=1, micro_batch_size=2, zero_stage=z,
                                                                   recompute="none")))
            for z in (0, 2, 3)]


def report_dp(plans: list[tuple[str, Any]], runs: list[Any]) -> None:
    """Issued DP collectives by phase, kind and place; the planner prices, per FSDP unit and step: ZeRO 0 one
    all-reduce hidden behind the last backward, ZeRO 1/2 one gather and one reduce-scatter, ZeRO 3 2m gathers."""
    by_layout = {(name, layout): calls for name, layout, calls in runs}
    for name, plan in plans:
        calls = by_layout.get((name, plan.layout.describe()), [])
        print(f"\n== {name}: {plan.layout.describe()} ({plan.layout.num_micro_batches} micro-batches per rank)")
        if isinstance(calls, str):
            print(f"  not run: {calls}")
            continue
        for (phase, kind, where), n in sorted(Counter((ph, k, w) for ph, k, _, w in calls).items()):
            print(f"  {phase:9s} {kind:14s} {n:3d} x  {where}")


def main() -> None:
    import torch.multiprocessing as mp

    from autopar.cost_models.cluster import Cluster
    from autopar.cost_models.profiling.local_worker import free_port

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cluster", default="local",
                        help="preset or YAML the plans are made for; 'local': this machine's 2 gloo ranks (as plan_regret), "
                        "measured once into bench/out/tp_collectives/ (delete to measure again)")
    parser.add_argument("--data-parallel", action="store_true", help="GPT at dp2 tp1, ZeRO 0/2/3 instead of TP")
    parser.add_argument("--cluster-dir", type=Path, default=None,
                        help="plan on the cluster and op tables a plan_regret --ranks 2 run saved there (overrides "
                        "--cluster): the plans plan_regret measured")
    args = parser.parse_args()
    local = args.cluster == "local" and args.cluster_dir is None
    cluster = None if args.cluster == "local" else Cluster.from_yaml(args.cluster) if args.cluster.endswith(
        (".yaml", ".yml")) else Cluster.preset(args.cluster)
    graphs, plans, clusters = plans_for(cluster, local, args.cluster_dir)
    if args.data_parallel:
        plans = dp_plans(clusters["gpt"])
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    cases = [(name, p.to_json(indent=None)) for name, p in plans]
    mp.start_processes(run_rank, args=(2, free_port(), cases, queue), nprocs=2, join=True, start_method="spawn")
    runs = []
    while not queue.empty():
        runs.append(queue.get())
    if args.data_parallel:
        report_dp(plans, runs)
    else:
        report(graphs, plans, runs, clusters)


if __name__ == "__main__":
    main()
