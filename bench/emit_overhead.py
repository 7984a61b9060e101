"""Step time of ``autopar.parallelize`` against the same layout written by hand in torch.distributed.

    python bench/emit_overhead.py                       # DP2 × TP2 (ZeRO-3) on 4 CPU ranks (gloo)
    python bench/emit_overhead.py --dp 2 --tp 1 --steps 20

Both versions train the same GPT with the same layout and micro-batching: the
hand-written one calls ``parallelize_module`` and ``fully_shard`` directly, as a
torchtitan-style script would; the other goes through a ``Plan`` and
``autopar.parallelize``. Rounds alternate between the two (A B, B A, ...) so that
machine noise hits both alike; the script prints the median step times and the speed ratio
(autopar's speed / hand-written speed; the goal is >= 0.95).
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.emit.plans when run from a checkout

logger = logging.getLogger("emit_overhead")


@dataclass(frozen=True, slots=True, kw_only=True)
class BenchConfig:
    """What to run."""

    dp: int = 2
    """Data-parallel size."""
    tp: int = 2
    """Tensor-parallel size."""
    zero_stage: int = 3
    """ZeRO stage of the data-parallel axis (0 = replicate)."""
    n_layer: int = 4
    """GPT blocks."""
    n_embd: int = 256
    """Hidden size."""
    seq_len: int = 128
    """Tokens per sample."""
    vocab_size: int = 2048
    """Vocabulary."""
    micro_batch_size: int = 4
    """Samples per micro-batch."""
    num_micro_batches: int = 2
    """Micro-batches per step."""
    steps: int = 5
    """Timed steps per version per round."""
    rounds: int = 4
    """Alternating rounds."""


def _gpt_config(cfg: BenchConfig) -> object:
    from autopar.examples.gpt import GPTConfig

    return GPTConfig(n_layer=cfg.n_layer, n_embd=cfg.n_embd, n_head=8, vocab_size=cfg.vocab_size,
                     block_size=cfg.seq_len, dropout=0.0)


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of one micro-batch."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def build_autopar(cfg: BenchConfig) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """One training step through a hand-written ``Plan`` and ``autopar.parallelize``."""
    from autopar.emit.parallelize import parallelize
    from autopar.examples.gpt import GPT
    from tests.emit.plans import gpt_layer_paths, make_plan

    with torch.device("meta"):
        model = GPT(_gpt_config(cfg))
    plan = make_plan(gpt_layer_paths(cfg.n_layer), dp=cfg.dp, tp=cfg.tp, zero_stage=cfg.zero_stage,
                     micro_batch_size=cfg.micro_batch_size, num_micro_batches=cfg.num_micro_batches,
                     seq_len=cfg.seq_len)
    example = (torch.zeros(cfg.micro_batch_size, cfg.seq_len, dtype=torch.long),)
    pm = parallelize(model, example, plan=plan)
    opt = pm.optimizer(torch.optim.AdamW, lr=1e-4)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        pm.step(x, y, loss_fn)
        opt.step()
        opt.zero_grad()

    return step


def _tp_by_hand(model: torch.nn.Module, tp_mesh: object) -> None:
    """Megatron's GPT split, as a torchtitan-style script writes it."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    parallelize_module(model, tp_mesh, {
        "tok_emb": RowwiseParallel(input_layouts=Replicate()),
        "pos_emb": RowwiseParallel(input_layouts=Replicate()),
        "lm_head": ColwiseParallel(output_layouts=Replicate()),
    })
    for block in model.blocks:
        parallelize_module(block, tp_mesh, {
            "attn.q_proj": ColwiseParallel(), "attn.k_proj": ColwiseParallel(), "attn.v_proj": ColwiseParallel(),
            "attn.c_proj": RowwiseParallel(), "mlp.c_fc": ColwiseParallel(), "mlp.c_proj": RowwiseParallel(),
        })


def build_by_hand(cfg: BenchConfig) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """The same layout written directly with DeviceMesh, parallelize_module and fully_shard."""
    import torch.distributed as dist
    from torch.distributed._composable.replicate_with_fsdp import replicate
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from autopar.examples.gpt import GPT

    mesh = init_device_mesh("cpu", (cfg.dp, cfg.tp), mesh_dim_names=("dp", "tp"))
    with torch.device("meta"):
        model = GPT(_gpt_config(cfg))
    if cfg.tp > 1:
        _tp_by_hand(model, mesh["tp"])
    if cfg.zero_stage == 0:
        replicate(model, mesh=mesh["dp"])
    else:
        for block in model.blocks:
            fully_shard(block, mesh=mesh["dp"], reshard_after_forward=cfg.zero_stage == 3)
        fully_shard(model, mesh=mesh["dp"], reshard_after_forward=cfg.zero_stage == 3)
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.init_weights()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    local = cfg.micro_batch_size * cfg.num_micro_batches
    dp_rank = mesh["dp"].get_local_rank()

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = x[dp_rank * local:(dp_rank + 1) * local], y[dp_rank * local:(dp_rank + 1) * local]
        total = torch.zeros(())
        for i, (xm, ym) in enumerate(zip(x.chunk(cfg.num_micro_batches), y.chunk(cfg.num_micro_batches))):
            model.set_requires_gradient_sync(i == cfg.num_micro_batches - 1)
            loss = loss_fn(model(xm), ym)
            (loss / cfg.num_micro_batches).backward()
            total += loss.detach()
        dist.all_reduce(total)  # the loss every rank reports, as autopar's step returns
        opt.step()
        opt.zero_grad()

    return step


def _time(step: Callable[[torch.Tensor, torch.Tensor], None], batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[float]:
    import torch.distributed as dist

    times = []
    for x, y in batches:
        dist.barrier()
        start = time.perf_counter()
        step(x, y)
        times.append(time.perf_counter() - start)
    return times


def worker(rank: int, world: int, port: int, cfg: BenchConfig) -> None:
    """One rank: build both versions, alternate timed rounds, report from rank 0."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, stream=sys.stdout, format="%(message)s")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    g = torch.Generator().manual_seed(0)
    batch = cfg.dp * cfg.micro_batch_size * cfg.num_micro_batches
    data = [(torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len), generator=g),
             torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len), generator=g)) for _ in range(cfg.steps)]
    versions = {"autopar": build_autopar(cfg), "by hand": build_by_hand(cfg)}
    for step in versions.values():  # warm-up
        _time(step, data[:2])
    times: dict[str, list[float]] = {name: [] for name in versions}
    order = list(versions)
    for _ in range(cfg.rounds):
        for name in order:
            times[name] += _time(versions[name], data)
        order.reverse()  # A B, B A, ...: drift in the machine's speed hits both alike
    if rank == 0:
        med = {name: statistics.median(t) for name, t in times.items()}
        logger.warning("layout dp%d tp%d zero%d, GPT %d×%d, seq %d, %d ranks on %s", cfg.dp, cfg.tp, cfg.zero_stage,
                    cfg.n_layer, cfg.n_embd, cfg.seq_len, world, "cpu/gloo")
        for name, t in med.items():
            logger.warning("  %-8s median step %.1f ms over %d steps", name, 1e3 * t, len(times[name]))
        logger.warning("speed ratio (autopar / by hand): %.3f (goal >= 0.95)", med["by hand"] / med["autopar"])
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    """Parse flags and run ``dp · tp`` ranks on this machine."""
    import torch.multiprocessing as mp

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = BenchConfig()
    for name in ("dp", "tp", "zero_stage", "n_layer", "n_embd", "seq_len", "steps", "rounds"):
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(defaults, name))
    cfg = BenchConfig(**vars(parser.parse_args(argv)))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    world = cfg.dp * cfg.tp
    mp.spawn(worker, args=(world, port, cfg), nprocs=world, join=True)


if __name__ == "__main__":
    main()
