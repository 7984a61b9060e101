"""Train the GPT example for a few steps under any plan: build, plan, print, emit, train.

    autopar plan examples/train_gpt.py:build --cluster dgx-h100 --global-batch 8 --pin dp=2 --pin tp=2 \
        --dtype float32 --out plan.json
    torchrun --nproc-per-node 4 examples/train_gpt.py --plan plan.json
    torchrun --nproc-per-node 4 examples/train_gpt.py --dp 2 --tp 2            # rank 0 plans, layout pinned
    torchrun --nproc-per-node 4 examples/train_gpt.py --dp 2 --pp 2 --hand-written --schedule gpipe
    python examples/train_gpt.py --steps 3                                     # one process, no parallelism

Runs on CPU (gloo) or CUDA (NCCL). The model is built on the meta device and
each rank materialises only its shards. The data is a synthetic corpus with a
learnable pattern (each token determines the next), so the loss visibly falls.

``--save DIR`` writes a checkpoint to ``DIR/step_NNNNNNNN`` after the last step
(and every ``--save-every`` steps); ``--resume DIR`` continues from the newest one
in ``DIR``: the same step, data position, learning-rate schedule and RNG states, so
the loss curve continues exactly. A run can resume under another plan, on another
number of ranks; it keeps the checkpoint's global batch (``--num-micro-batches`` is
derived from it, and a ``--plan`` with another global batch is refused). Sample ``i``
of the data is a function of the seed and ``i`` alone, so a resumed run sees the very
samples the uninterrupted run would have, however the batch is split over ranks.

Losing a node and carrying on with the ones left (here 4 one-rank "nodes" on CPU,
``examples/gloo-4x1.yaml``; on GPUs, the same with your cluster and ``--nnodes``)::

    autopar plan examples/train_gpt.py:build --cluster examples/gloo-4x1.yaml --global-batch 12 \
        --pin dp=4 --pin micro_batch_size=1 --dtype float32 --out plan.json
    torchrun --nproc-per-node 4 examples/train_gpt.py --plan plan.json --steps 8 --save ckpt --save-every 2
    # rank 2 dies: torchrun's agent names it and ends the job; when no agent sees the death (a lost
    # node), rank 0's watchdog prints "error: rank 2 (...) sent no heartbeat ..." and exits with 124
    autopar replan plan.json --lost-nodes 1 --cluster examples/gloo-4x1.yaml --out plan-3.json
    torchrun --nproc-per-node 3 examples/train_gpt.py --plan plan-3.json --steps 8 --resume ckpt

The re-plan keeps the global batch (12 = dp 3 × 4 micro-batches of 1) and says what changed
(``autopar show plan-3.json``); the resumed run continues the loss curve of the run that
failed (``tests/reliability/test_training_faults.py`` runs this drill). ``autopar plan
--contingency 1`` stores that re-plan in ``plan.json``, so ``autopar replan`` answers at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from autopar.examples.gpt import GPT
    from autopar.plan import Plan

logger = logging.getLogger("train_gpt")


@dataclass(frozen=True, slots=True, kw_only=True)
class TrainConfig:
    """Everything the script takes from the command line."""

    size: str = "tiny"
    """GPT size name (``GPTConfig.from_name``)."""
    n_layer: int = 4
    """Transformer blocks (overrides the size's)."""
    seq_len: int = 32
    """Tokens per sample."""
    vocab_size: int = 128
    """Vocabulary size (small, so the synthetic pattern is learnt in a few steps)."""
    steps: int = 5
    """Optimizer steps."""
    lr: float = 3e-3
    """AdamW learning rate."""
    seed: int = 0
    """Seed for weights and data."""
    plan: str | None = None
    """Plan file (``autopar plan ... -o plan.json``); overrides the layout pins."""
    hand_written: bool = False
    """Build the plan from the pins by hand instead of calling the planner."""
    cluster: str = "dgx-h100"
    """Cluster preset the planner prices against (the layout is pinned to this job's size)."""
    dp: int = 1
    """Data-parallel size."""
    tp: int = 1
    """Tensor-parallel size."""
    pp: int = 1
    """Pipeline stages (ranks)."""
    micro_batch_size: int = 2
    """Samples per micro-batch."""
    num_micro_batches: int = 2
    """Micro-batches per step per data-parallel rank."""
    zero_stage: int = 0
    """ZeRO stage over dp."""
    recompute: str = "none"
    """Activation recomputation: none, selective, full."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (needs tp > 1)."""
    schedule: str = "1f1b"
    """Pipeline schedule: gpipe, 1f1b, interleaved-1f1b."""
    virtual_stages: int = 1
    """Model chunks per pipeline rank (interleaved 1F1B)."""
    dtype: str = "float32"
    """Training precision: float32 or bfloat16."""
    warmup_steps: int = 3
    """Linear learning-rate warm-up (a scheduler whose state the checkpoint carries)."""
    save: str | None = None
    """Directory to save checkpoints in (``step_NNNNNNNN`` after the last step)."""
    save_every: int = 0
    """Also save every this many steps (0: only after the last)."""
    resume: str | None = None
    """A checkpoint, or a directory of them (the newest is used), to continue from."""
    loss_log: str | None = None
    """Rank 0 appends ``{"step": k, "loss": x}`` lines here (exact floats, for comparing runs)."""


def parse_args(argv: Sequence[str] | None = None) -> TrainConfig:
    """Command line → ``TrainConfig`` (one flag per field, dashes for underscores)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            parser.add_argument(flag, action="store_true", help=f.name)
        else:
            kind = {"int": int, "float": float}.get(str(f.type), str)
            parser.add_argument(flag, type=kind, default=f.default, help=f.name)
    return TrainConfig(**vars(parser.parse_args(argv)))


def build_model(cfg: TrainConfig) -> GPT:
    """The GPT on the meta device (no rank ever allocates all of it)."""
    from autopar.examples.gpt import GPT, GPTConfig

    config = GPTConfig.from_name(cfg.size, n_layer=cfg.n_layer, block_size=cfg.seq_len, vocab_size=cfg.vocab_size,
                                 dropout=0.0)
    with torch.device("meta"):
        return GPT(config)


def build(batch_size: int = 2, seq_len: int | None = None) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    """The model this script trains by default, for ``autopar plan examples/train_gpt.py:build``."""
    cfg = TrainConfig() if seq_len is None else TrainConfig(seq_len=seq_len)
    return build_model(cfg), (torch.zeros(batch_size, cfg.seq_len, dtype=torch.long),)


class SyntheticCorpus:
    """Sequences t, t+s, t+2s, ... (mod vocab), random start t and stride s ∈ {1, 2, 3}: learnable.

    Sample ``i`` is a function of ``(seed, i)`` alone (its own ``random.Random``, seeded with the
    string ``"seed:i"``, which Python hashes with SHA-512), the same on every rank whatever the
    layout; each step takes the next global batch of samples. ``samples_drawn`` is the data
    position a checkpoint keeps, so a run resumed on any number of ranks, under any plan that
    keeps the global batch, sees exactly the samples the uninterrupted run would have seen.
    """

    def __init__(self, *, seed: int, seq_len: int, vocab: int) -> None:
        self.samples_drawn = 0
        """Samples handed out so far (the next batch starts at this index)."""
        self._seed, self._seq_len, self._vocab = seed, seq_len, vocab

    def sample(self, index: int) -> torch.Tensor:
        """Sample ``index`` of the stream: ``seq_len + 1`` tokens."""
        rng = random.Random(f"{self._seed}:{index}")  # not torch's CPU generator: it keeps 32 bits of its seed
        start, stride = rng.randrange(self._vocab), rng.randrange(1, 4)
        return (start + stride * torch.arange(self._seq_len + 1)) % self._vocab

    def next_batch(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The next ``batch`` samples: (inputs, targets), each (batch, seq_len)."""
        first = self.samples_drawn
        tokens = torch.stack([self.sample(i) for i in range(first, first + batch)])
        self.samples_drawn += batch
        return tokens[:, :-1], tokens[:, 1:]


def resume_point(cfg: TrainConfig) -> tuple[TrainConfig, Path | None, dict[str, Any]]:
    """The checkpoint to resume from, its run state, and ``cfg`` with the checkpoint's global batch kept.

    Raises:
        UserInputError: The checkpoint's global batch cannot be split over this layout's
            ``dp · micro_batch_size``.
    """
    from autopar.emit.checkpoint import read_train_state
    from autopar.emit.manifest import latest_checkpoint
    from autopar.errors import UserInputError

    if cfg.resume is None:
        return cfg, None, {}
    checkpoint = latest_checkpoint(cfg.resume)
    state = read_train_state(checkpoint)
    batch, per_step = int(state["global_batch_size"]), cfg.dp * cfg.micro_batch_size
    if cfg.plan is None:
        if batch % per_step:
            raise UserInputError(f"the checkpoint's global batch {batch} is not a multiple of dp {cfg.dp} × "
                                 f"micro-batch {cfg.micro_batch_size}; pick sizes that divide it")
        cfg = dataclasses.replace(cfg, num_micro_batches=batch // per_step)
    return cfg, checkpoint, state


def planning_args(cfg: TrainConfig) -> dict[str, Any]:
    """What ``parallelize`` needs to plan on rank 0: the cluster, the batch and the layout pins."""
    pins = {"dp": cfg.dp, "tp": cfg.tp, "pp": cfg.pp, "micro_batch_size": cfg.micro_batch_size,
            "zero_stage": cfg.zero_stage, "recompute": cfg.recompute, "sequence_parallel": cfg.sequence_parallel,
            "schedule": cfg.schedule, "virtual_stages": cfg.virtual_stages}
    return {"cluster": cfg.cluster, "global_batch_size": cfg.dp * cfg.micro_batch_size * cfg.num_micro_batches,
            "constraints": pins, "dtype": cfg.dtype}


def given_plan(cfg: TrainConfig, model: torch.nn.Module, example: tuple[torch.Tensor, ...]) -> Plan | None:
    """The plan from a file or written by hand; None to let rank 0 run the planner with the pins."""
    from autopar.plan import Plan

    if cfg.plan is not None:
        import autopar

        plan = Plan.load(cfg.plan)
        plan.validate_for(autopar.capture(model, example).fingerprint())  # refuse a plan made for another model
        return plan
    if cfg.hand_written:
        return hand_written_plan(cfg, model, example)
    return None


def hand_written_plan(cfg: TrainConfig, model: torch.nn.Module, example: tuple[torch.Tensor, ...]) -> Plan:
    """A plan written by hand from the pins: layers split evenly over stages, Megatron's GPT styles."""
    import autopar
    from autopar.plan import (
        CommBreakdown, Layout, MemoryBreakdown, Plan, Predicted, Recompute, Schedule, ShardingPlan, StagePlan, TPStyle,
    )

    col, row = TPStyle.COLWISE, TPStyle.ROWWISE
    graph = autopar.capture(model, example)
    paths = [layer.module_path for layer in graph.layers]
    styles = ({"attn.q_proj": col, "attn.k_proj": col, "attn.v_proj": col, "attn.c_proj": row,
               "mlp.c_fc": col, "mlp.c_proj": row}, {"tok_emb": row, "pos_emb": row}, {"lm_head": col})
    sharding = tuple(ShardingPlan(layer_kind=k, modules=m, ops={}) for k, m in zip(("block", "embed", "head"), styles))
    layout = Layout(dp=cfg.dp, tp=cfg.tp, pp=cfg.pp, micro_batch_size=cfg.micro_batch_size,
                    num_micro_batches=cfg.num_micro_batches, zero_stage=cfg.zero_stage,
                    recompute=Recompute(cfg.recompute), sequence_parallel=cfg.sequence_parallel,
                    schedule=Schedule(cfg.schedule), virtual_stages=cfg.virtual_stages)
    n = cfg.pp * cfg.virtual_stages
    bounds = [round(i * len(paths) / n) for i in range(n + 1)]
    stages = tuple(StagePlan(index=i, pp_rank=i % cfg.pp, layer_start=a, layer_end=b, module_paths=tuple(paths[a:b]),
                             recompute=layout.recompute, sharding=sharding if cfg.tp > 1 else ())
                   for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])))
    memory = tuple(MemoryBreakdown(params=0, grads=0, optimizer=0, activations=0, buffers=0, capacity=1)
                   for _ in range(cfg.pp))
    predicted = Predicted(step_time_s=1.0, model_tflops_per_gpu=0.0, hardware_tflops_per_gpu=0.0, mfu=0.0,
                          tokens_per_s=0.0, bubble_fraction=0.0, communication=CommBreakdown(), memory=memory)
    return Plan(graph_fingerprint=graph.fingerprint(), model_name=f"gpt:{cfg.size}", cluster_name="hand-written",
                num_gpus_available=layout.num_gpus, gpus_per_node=layout.num_gpus, seq_len=cfg.seq_len,
                dtype=cfg.dtype, layout=layout, stages=stages, predicted=predicted, num_layers=len(paths),
                explanation=("written by hand from the command-line pins",))


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of one micro-batch."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def main(argv: Sequence[str] | None = None) -> list[float]:
    """Train; returns the loss of every step run here (the same on every rank)."""
    import torch.distributed as dist

    from autopar.api import parallelize  # plans on rank 0 when no plan is given
    from autopar.emit.checkpoint import load_checkpoint

    cfg, checkpoint, state = resume_point(parse_args(argv))
    model = build_model(cfg)
    example = (torch.zeros(cfg.micro_batch_size, cfg.seq_len, dtype=torch.long),)
    plan = given_plan(cfg, model, example)
    if plan is None:  # rank 0 plans with the pins and broadcasts the plan
        pm = parallelize(model, example, seed=cfg.seed, **planning_args(cfg))
    else:
        pm = parallelize(model, example, plan=plan, seed=cfg.seed)
    lead = dist.get_rank() == 0
    logging.basicConfig(level=logging.INFO if lead else logging.WARNING, stream=sys.stdout, format="%(message)s")
    if lead:
        logger.info("%s", pm.plan.explain())
    opt = pm.optimizer(torch.optim.AdamW, lr=cfg.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup_steps))
    corpus = SyntheticCorpus(seed=cfg.seed, seq_len=cfg.seq_len, vocab=model.config.vocab_size)
    batch = pm.plan.layout.global_batch_size
    if checkpoint is not None:
        _check_batch(batch, state, pm.plan.layout.describe())
        state = load_checkpoint(pm, checkpoint, opt, scheduler=scheduler)
        corpus.samples_drawn = int(state["samples_seen"])
        logger.info("resumed from %s at step %d", checkpoint, state["step"])
    losses = []
    for step in range(int(state.get("step", 0)), cfg.steps):
        x, y = corpus.next_batch(batch)
        loss = pm.step(x, y, loss_fn)
        opt.step()
        scheduler.step()
        opt.zero_grad()
        losses.append(loss.item())
        if lead:
            logger.info("step %d loss %.4f", step, losses[-1])
            _log_loss(cfg.loss_log, step, losses[-1])
        if cfg.save and (step + 1 == cfg.steps or (cfg.save_every and (step + 1) % cfg.save_every == 0)):
            _save(pm, cfg, opt, scheduler, corpus, step + 1)
    return losses


def _check_batch(batch: int, state: dict[str, Any], layout: str) -> None:
    from autopar.errors import CheckpointError

    if batch != int(state["global_batch_size"]):
        raise CheckpointError(f"the checkpoint was trained with global batch {state['global_batch_size']} but "
                              f"the plan ({layout}) has {batch}; resuming would change the run: use a plan "
                              f"with global batch {state['global_batch_size']}")


def _save(pm: Any, cfg: TrainConfig, opt: torch.optim.Optimizer, scheduler: Any, corpus: SyntheticCorpus,
          step: int) -> None:
    from autopar.emit.checkpoint import save_checkpoint

    assert cfg.save is not None
    state = {"step": step, "samples_seen": corpus.samples_drawn, "global_batch_size": pm.plan.layout.global_batch_size,
             "seed": cfg.seed}
    path = save_checkpoint(pm, Path(cfg.save) / f"step_{step:08d}", opt, scheduler=scheduler, train_state=state)
    logger.info("checkpoint %s", path)


def _log_loss(path: str | None, step: int, loss: float) -> None:
    if path is not None:
        with open(path, "a") as handle:  # a log, appended line by line: a killed run keeps every finished step
            handle.write(json.dumps({"step": step, "loss": loss}) + "\n")


if __name__ == "__main__":
    from autopar.emit.launch import run_main

    sys.exit(run_main(main))
