"""Tensor (and sequence) parallelism: the plan's shardings as DTensor placements on the stage's parameters.

The ILP decides, per layer kind, which parameterised modules are split and how
(``ShardingPlan.modules``: ``colwise``, ``rowwise``, ``replicate``; ``ShardingPlan.params``
for splits no style says: an MoE's stacked expert weights, and a fused projection
strided over its parts, e.g. gate/up, so each part is split alike). Every
parameter of the stage becomes a DTensor on the ``tp`` axis with the placement
that decision implies, and the stage's exported program then runs on DTensors:
DTensor's sharding propagation computes every op (views with global shapes,
attention on head shards, slices of fused projections) exactly, inserting the
collectives where an op's operands disagree. So whatever the plan shards, the
program computes the original function; no head count is rewritten and no
family's forward is restated.

Which weight dim a style splits depends on how the module stores its weight,
the one piece of module knowledge here (``WEIGHT_DIMS``): a Linear keeps
(out, in), an Embedding (vocab, dim), Hugging Face's ``Conv1D`` (GPT-2) (in, out).

With sequence parallelism the residual stream between blocks is kept sharded
along the sequence (``Shard(1)``): each block's outputs are redistributed to
``Shard(1)`` (a reduce-scatter of the row-parallel partial sums), and each
block's attention / MLP gathers its input once (``Replicate``), Megatron's
pattern written as explicit redistributes. Without it, the attention / MLP
input passes through Megatron's *f*, so the column-parallel modules' partial
input gradients are all-reduced once there. Gradients that still end in another
placement than their parameter's are moved once per step after backward
(``autopar.emit.grads``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from autopar.errors import PlanValidationError
from autopar.plan import StagePlan, TPStyle

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import Placement

logger = logging.getLogger(__name__)

WEIGHT_DIMS: Mapping[str, Mapping[TPStyle, int]] = {
    "Linear": {TPStyle.COLWISE: 0, TPStyle.ROWWISE: 1},
    "Embedding": {TPStyle.COLWISE: 1, TPStyle.ROWWISE: 0},
    "Conv1D": {TPStyle.COLWISE: 1, TPStyle.ROWWISE: 0},
}
"""Weight layout → the dim each style splits. ``Linear`` also covers its subclasses
(e.g. Falcon's ``FalconLinear``) and other modules with a 2-D weight that ``F.linear``
reads (an MoE router), the layout the planner assumes for them
(``solvers/layer_result._style``); ``Conv1D`` is ``transformers.pytorch_utils.Conv1D``,
whose weight is stored transposed (``x @ W + b``)."""


def weight_kind(module: nn.Module) -> str | None:
    """The ``WEIGHT_DIMS`` key for ``module``, or None for modules whose weight no style splits.

    Example:
        >>> weight_kind(nn.Linear(2, 3)), weight_kind(nn.Embedding(4, 2)), weight_kind(nn.LayerNorm(2))
        ('Linear', 'Embedding', None)
    """
    if isinstance(module, nn.Linear):
        return "Linear"
    if isinstance(module, nn.Embedding):
        return "Embedding"
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return None
    if type(module).__name__ == "Conv1D":
        return "Conv1D"
    return "Linear"  # any other 2-D weight (e.g. an MoE router's) is read as F.linear reads it: (out, in)


def _join(root: str, rel: str) -> str:
    return ".".join(p for p in (root, rel) if p)


def resolve_styles(model: nn.Module, stage: StagePlan) -> dict[str, TPStyle]:
    """Absolute module path → style for every module the stage's sharding plans name.

    A ``ShardingPlan`` applies to a layer of the stage when all of its relative
    paths exist under the layer's module (a layer whose path is not a module, such
    as ``model.norm+lm_head``, is rooted at the model itself). This applies a plan
    to every repeated layer of its kind.

    A module two layers read (a tied embedding also used as the LM head) may get
    two styles. One tensor has one placement, and DTensor computes both uses
    exactly under either, so the split style wins over ``replicate`` (the planner
    counted its memory split) and, between two splits, the first layer's.
    """
    names = {name for name, _ in model.named_modules()}
    styles: dict[str, TPStyle] = {}
    for layer_path in stage.module_paths:
        root = layer_path if layer_path in names else ""
        for sharding in stage.sharding:
            targets = {_join(root, rel): style for rel, style in sharding.modules.items()}
            if not targets or not all(t in names for t in targets):
                continue
            for path, style in targets.items():
                if styles.get(path, TPStyle.REPLICATE) is TPStyle.REPLICATE:
                    styles[path] = style
                elif style not in (styles[path], TPStyle.REPLICATE):
                    logger.info("stage %d: module %r is %s in one sharding plan and %s in %r; keeping %s",
                                stage.index, path, styles[path].value, style.value, sharding.layer_kind,
                                styles[path].value)
    return styles


def resolve_param_splits(model: nn.Module, stage: StagePlan) -> dict[str, str]:
    """Absolute parameter name → split (``"S(1,sf=2)"``) from the stage's ``ShardingPlan.params``.

    These are the splits no module style says: weights of more than two dims (an
    MoE's stacked experts) and strided shards (a fused projection split at its
    seams). They are matched to layers as ``resolve_styles`` matches styles.
    """
    modules = {name for name, _ in model.named_modules()}
    params = {name: p.dim() for name, p in model.named_parameters(remove_duplicate=False)}
    splits: dict[str, str] = {}
    for layer_path in stage.module_paths:
        root = layer_path if layer_path in modules else ""
        for sharding in stage.sharding:
            targets = {_join(root, rel): text for rel, text in sharding.params.items()}
            if targets and all(t in params for t in targets):
                for name, text in targets.items():
                    if split_placement(text).dim >= params[name]:
                        raise PlanValidationError(f"parameter {name!r} has {params[name]} dims; the plan splits it "
                                                  f"{text}; pin tp=1")
                    splits.setdefault(name, text)
    return splits


def split_placement(text: str) -> Placement:
    """DTensor placement of a split text: ``"S(2)"`` → ``Shard(2)``, ``"S(1,sf=2)"`` → ``_StridedShard(1, 2)``
    (each of the 2 blocks of dim 1 split over the ranks: DTensor's strided shard, the solver's ``S(d,sf=k)``)."""
    import re

    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    match = re.fullmatch(r"S\((\d+)(?:,sf=(\d+))?\)", text)
    if match is None:
        raise PlanValidationError(f"parameter split {text!r} must read S(d) or S(d,sf=k)")
    dim, sf = int(match.group(1)), int(match.group(2) or 1)
    return Shard(dim) if sf == 1 else _StridedShard(dim, split_factor=sf)


def param_placements(model: nn.Module, styles: Mapping[str, TPStyle], names: Sequence[str]) -> dict[str, int | None]:
    """Parameter name → the dim it is sharded on over ``tp`` (None: replicated).

    A split module's weight is sharded on the dim its style names; a column-split
    module's bias follows its output features; everything else is replicated.

    Raises:
        PlanValidationError: A style names a module whose weight layout is unknown.
    """
    dims: dict[str, int | None] = {}
    for name in names:
        module_path, _, leaf = name.rpartition(".")
        style = styles.get(module_path, TPStyle.REPLICATE)
        dims[name] = None
        if style is TPStyle.REPLICATE:
            continue
        kind = weight_kind(model.get_submodule(module_path))
        if kind is None:
            raise PlanValidationError(
                f"module {module_path!r} ({type(model.get_submodule(module_path)).__name__}) is {style.value} "
                f"in the plan, but it has no 2-D weight to split ({sorted(WEIGHT_DIMS)} layouts); pin tp=1"
            )
        if leaf == "weight":
            dims[name] = WEIGHT_DIMS[kind][style]
        elif leaf == "bias" and style is TPStyle.COLWISE:
            dims[name] = 0
    return dims


def apply_tp(stage_module: nn.Module, model: nn.Module, tp_mesh: DeviceMesh, stage: StagePlan, *,
             sequence_parallel: bool, block_paths: Sequence[str], keep_vocab_shards: bool = False,
             receives: bool = False, sends: bool = False) -> dict[str, int | None]:
    """Make every parameter of the stage a DTensor on ``tp`` and run the stage on DTensors (in place).

    Args:
        stage_module: The stage's module (from ``autopar.emit.program``), before AC and FSDP.
        model: The original model (module types, for weight layouts).
        tp_mesh: The one-dimensional ``tp`` sub-mesh.
        stage: The plan's stage.
        sequence_parallel: Keep the residual stream sharded on the sequence between blocks.
        block_paths: The stage's blocks.
        keep_vocab_shards: The stage is the model's last: outputs split on their last dim (a column-split
            LM head's logits) leave as ``Shard(-1)`` DTensors, for the vocabulary-parallel loss
            (``autopar.emit.loss``); every other output leaves whole.
        receives: The stage's inputs come from the previous pipeline stage (not the model's inputs).
        sends: The stage's outputs go to the next pipeline stage (not to the loss).
            Under sequence parallelism, what crosses between two such stages travels as this rank's
            sequence shard (``sequence_boundaries``).

    Returns:
        Parameter name → sharded dim (None: replicated), for logging and tests.
    """
    import torch.fx as fx

    from autopar.emit.dtensor_rules import (
        keep_fused_splits_sharded,
        register_program_rules,
        register_rules,
        replicate_unruled_ops,
    )

    register_rules()
    graphs = [m for m in stage_module.modules() if isinstance(getattr(m, "graph", None), fx.Graph)]
    register_program_rules(graphs)
    replicated = replicate_unruled_ops(graphs)
    if replicated:
        logger.info("stage %d: ops without a DTensor rule run replicated: %s", stage.index, replicated)
    keep_fused_splits_sharded(graphs)
    styles = resolve_styles(model, stage)
    names = [n for n, _ in stage_module.named_parameters(remove_duplicate=False)]
    dims = param_placements(model, styles, names)
    splits = {name: split_placement(text) for name, text in resolve_param_splits(model, stage).items()
              if name in dims}
    dims.update({name: p.dim for name, p in splits.items()})
    _distribute(stage_module, tp_mesh, dims, splits)
    tp = tp_mesh.size()
    received, sent = sequence_boundaries(stage_module, tp, received=sequence_parallel and receives,
                                         sent=sequence_parallel and sends)
    stage_module.register_forward_pre_hook(_inputs_to_dtensor(tp_mesh, received), with_kwargs=True)
    stage_module.register_forward_hook(_outputs_to_local(tp_mesh, keep_vocab_shards, sent))
    _reduce_row_outputs(stage_module, styles, sequence_parallel, block_paths)
    _prepare_block_inputs(stage_module, styles, block_paths, sequence_parallel)
    split = sum(d is not None for d in dims.values())
    logger.info("stage %d: tensor parallel over %d ranks, %d of %d parameters sharded%s%s", stage.index,
                tp, split, len(dims), " with sequence parallelism" if sequence_parallel else "",
                f"; {sum(s is not None for s in received)} received and {len(sent)} sent as sequence shards"
                if received or sent else "")
    return dims


def sequence_shardable(val: Any, tp: int) -> bool:
    """A stage boundary value that sequence parallelism sends as its sequence shard: a floating
    ``[batch, seq, ...]`` activation whose sequence divides over ``tp`` (the residual stream that the
    blocks hand on as ``Shard(1)``; what the program recomputes per stage, masks and rotary tables, does
    not cross: ``autopar.graph.layers.input_only_sources``).

    Example:
        >>> sequence_shardable(torch.zeros(2, 16, 8), 2), sequence_shardable(torch.zeros(2, 1, 16, 16), 2)
        (True, False)
    """
    return (isinstance(val, torch.Tensor) and val.is_floating_point() and val.dim() >= 3
            and val.shape[1] % tp == 0)


def sequence_boundaries(stage_module: nn.Module, tp: int, *, received: bool, sent: bool
                        ) -> tuple[list[torch.Size | None], frozenset[int]]:
    """Make the stage's pipeline boundaries carry sequence shards, as Megatron and torchtitan send them: each
    ``sequence_shardable`` value crosses as this rank's ``seq/tp`` slice, ``tp`` times fewer bytes and no
    gather before the send (the blocks hand on ``Shard(1)`` already).

    torch's traced ``_PipelineStage`` sizes its receive buffers (activations forward, gradients backward)
    from the stage graph's placeholder and output metadata, so each such value's metadata becomes the shard's
    shape; the sender and the receiver read the same value's metadata, so both sides agree.

    Returns:
        Per placeholder, the global shape a received shard is wrapped at (None: received whole), and the
        positions (in the flattened outputs) of the outputs sent as shards.
    """
    from torch.utils._pytree import tree_flatten

    graph = stage_module.graph  # type: ignore[union-attr]
    shapes: list[torch.Size | None] = []
    for node in (n for n in graph.nodes if n.op == "placeholder"):
        val = node.meta.get("val")
        shard = received and sequence_shardable(val, tp)
        shapes.append(val.shape if shard else None)
        if shard:
            node.meta["val"] = _sequence_slice(val, tp)
    positions: set[int] = set()
    if sent:
        output = next(n for n in reversed(graph.nodes) if n.op == "output")
        flat, _ = tree_flatten(output.args[0])
        for i, node in enumerate(flat):
            val = getattr(node, "meta", {}).get("val")
            if sequence_shardable(val, tp):
                node.meta["val"] = _sequence_slice(val, tp)
                positions.add(i)
    return shapes, frozenset(positions)


def _sequence_slice(val: torch.Tensor, tp: int) -> torch.Tensor:
    """Metadata of one rank's sequence shard of ``val`` (contiguous, as it is sent)."""
    return val.narrow(1, 0, val.shape[1] // tp).contiguous()


def _distribute(stage_module: nn.Module, mesh: DeviceMesh, dims: Mapping[str, int | None],
                splits: Mapping[str, Placement]) -> None:
    """Replace each parameter by a DTensor parameter (``splits`` first, else ``Shard(dims[name])``); a tensor
    under several names stays one tensor."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    done: dict[int, nn.Parameter] = {}
    for name, param in list(stage_module.named_parameters(remove_duplicate=False)):
        if id(param) not in done:
            dim = dims[name]
            placement: Placement = splits.get(name) or (Replicate() if dim is None else Shard(dim))
            data = distribute_tensor(param.detach(), mesh, [placement], src_data_rank=None)
            done[id(param)] = nn.Parameter(data, requires_grad=param.requires_grad)
        parent, _, leaf = name.rpartition(".")
        setattr(stage_module.get_submodule(parent), leaf, done[id(param)])


def _inputs_to_dtensor(mesh: DeviceMesh, shards: Sequence[torch.Size | None]) -> Any:
    """Stage inputs become DTensors (differentiably): a full tensor (the same on every tp rank) replicated, and
    a positional input with a global shape in ``shards`` (``sequence_boundaries``) as the ``Shard(1)`` it was
    sent as."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    def wrap(x: Any, shape: torch.Size | None = None) -> Any:
        if not isinstance(x, torch.Tensor) or isinstance(x, DTensor):
            return x
        if shape is None:
            return DTensor.from_local(x, mesh, [Replicate()], run_check=False)
        return DTensor.from_local(x, mesh, [Shard(1)], run_check=False, shape=shape,
                                  stride=torch.empty(shape, device="meta").stride())

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return (tuple(wrap(a, shards[i] if i < len(shards) else None) for i, a in enumerate(args)),
                {k: wrap(v) for k, v in kwargs.items()})

    return hook


def _outputs_to_local(mesh: DeviceMesh, keep_vocab_shards: bool, sequence_shards: frozenset[int] = frozenset()
                      ) -> Any:
    """A forward hook: stage outputs leave as plain tensors (what the next stage receives): whole, except, with
    ``keep_vocab_shards``, the last stage's vocabulary-split logits, which the loss reads at V/t per rank, and
    the outputs at ``sequence_shards`` (flattened positions), which leave as this rank's ``Shard(1)`` slice."""
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.utils._pytree import tree_flatten

    from autopar.emit.loss import gather, is_vocab_shard

    def sequence_shard(t: Any) -> Any:
        if not isinstance(t, DTensor):  # a plain tensor is the same on every tp rank
            t = DTensor.from_local(t, mesh, [Replicate()], run_check=False)
        # contiguous for the send with every other output (``pipeline._typed_boundaries``)
        return t.redistribute(placements=[Shard(1)]).to_local(grad_placements=[Shard(1)])

    def local(i: int, t: Any) -> Any:
        if i in sequence_shards:
            return sequence_shard(t)
        return t if keep_vocab_shards and is_vocab_shard(t) else gather(t)

    def hook(module: nn.Module, args: tuple, output: Any) -> Any:
        leaves, spec = tree_flatten(output)
        return spec.unflatten([local(i, t) for i, t in enumerate(leaves)])

    return hook


def _reduce_row_outputs(stage_module: nn.Module, styles: Mapping[str, TPStyle], sequence_parallel: bool,
                        block_paths: Sequence[str]) -> None:
    """Row-split modules reduce their partial sums on the way out: all-reduce, or under SP, inside a block,
    reduce-scatter to the sequence shard the block hands on (outside the blocks, e.g. an LM head whose output
    leaves the stage whole, an all-reduce: one collective where a reduce-scatter and a gather would be two).

    A vocabulary-split embedding must: its masked partial result carries the
    mask only until the next op.
    """
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.utils._pytree import tree_map

    def reduce(t: Any, in_block: bool) -> Any:
        if not isinstance(t, DTensor) or not any(p.is_partial() for p in t.placements):
            return t
        target = [Shard(1) if sequence_parallel and in_block and _carries_sequence(t) else Replicate()]
        # through a local tensor, so the gradient arrives in ``target`` (DTensor cannot turn a partial
        # gradient into the embedding's masked-partial layout)
        return DTensor.from_local(t.redistribute(placements=target).to_local(), t.device_mesh, target,
                                  run_check=False, shape=t.shape, stride=t.stride())

    names = {name for name, _ in stage_module.named_modules()}
    for path, style in styles.items():
        if style is TPStyle.ROWWISE and path in names:
            in_block = any(path.startswith(f"{block}.") for block in block_paths)
            stage_module.get_submodule(path).register_forward_hook(
                lambda m, a, out, b=in_block: tree_map(lambda t: reduce(t, b), out))


def _carries_sequence(t: Any) -> bool:
    """Whether a block's activation ``t`` can be the sequence shard: ``[batch, seq, ...]`` with at least one
    row per tp rank on dim 1. A latent a block views as one head (DeepSeek's MLA: ``kv_nope.view(b, 1, s, r)``,
    row-split through ``kv_b_proj``) has a singleton there: split, every later view of it fails, so its partial
    sums are all-reduced instead, as the sharding ILP prices them (``P = P`` → ``R``)."""
    return t.dim() >= 3 and t.shape[1] >= t.device_mesh.size()


def _reduce_grad_here(t: Any) -> Any:
    """Megatron's *f*: ``t`` unchanged, and in backward its gradient brought to ``t``'s own placement here.

    ``to_local`` → ``from_local`` is the identity forward. In backward,
    ``_FromTorchTensor`` redistributes the incoming gradient to the forward
    placement (a ``Partial`` one becomes ``Replicate``: one all-reduce) and
    ``_ToTorchTensor`` hands it on under that placement.
    """
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(t.to_local(), t.device_mesh, t.placements, run_check=False, shape=t.shape,
                              stride=t.stride())


def _prepare_block_inputs(stage_module: nn.Module, styles: Mapping[str, TPStyle], block_paths: Sequence[str],
                          sequence_parallel: bool) -> None:
    """Each block child that holds weights (attention, MLP) takes its input whole, and reduces its gradient once.

    Under SP, blocks take and hand on ``Shard(1)`` hidden states (a block's
    input is moved there first: from the embedding's hidden-dim shard, an
    all-to-all), and each such child (whether the plan splits it or not:
    attention cannot run on a sequence shard) gathers its input once, however
    many column-split modules read it (torchtitan's ``PrepareModuleInput``;
    Megatron's one all-gather per sub-layer); the gather's backward
    reduce-scatters the gradient.

    Every other differentiable input passes through Megatron's *f*
    (``_reduce_grad_here``): the column-split modules' input gradients are
    ``Partial`` sums, all-reduced once at the child's input instead of reaching
    the norm's backward, where DTensor's rules for RMSNorm's ``pow``/``mul``
    reduce-scatter and re-gather them. Split modules outside the blocks (an LM
    head) prepare their own input alike; a row-split one under SP takes its
    sequence-sharded input on the hidden dim it splits (an all-to-all).
    """
    from torch.distributed.tensor import Replicate, Shard

    def hidden(t: Any) -> Any:
        return Shard(t.dim() - 1)

    sequence, whole = _to_placement(lambda t: Shard(1), sequence_parallel), _to_placement(
        lambda t: Replicate(), sequence_parallel)
    residual = _to_placement(lambda t: Shard(1) if t.requires_grad else None, sequence_parallel)
    names = {name for name, _ in stage_module.named_modules()}
    prepared: set[str] = set()  # modules whose input is already prepared at their block child's input
    for path in block_paths:
        if path not in names:
            continue
        block = stage_module.get_submodule(path)
        if sequence_parallel:  # the residual stream (the inputs that carry gradients: not masks, not rotary tables)
            block.register_forward_pre_hook(lambda m, args, kwargs: (residual(args), residual(kwargs)),
                                            with_kwargs=True)
            block.register_forward_hook(lambda m, args, out: sequence(out))
        for child_name, child in block.named_children():
            inner = {_join(_join(path, child_name), n): m for n, m in child.named_modules()}
            if any(weight_kind(m) for m in inner.values()):
                child.register_forward_pre_hook(lambda m, args, kwargs: (whole(args), whole(kwargs)),
                                                with_kwargs=True)
                prepared |= set(inner)
    row_in = _to_placement(hidden, sequence_parallel)
    for path, style in styles.items():  # a row-split one too: its input gradient is a shard, gathered here once
        if style is not TPStyle.REPLICATE and path in names and path not in prepared:
            convert = row_in if style is TPStyle.ROWWISE and sequence_parallel else whole
            stage_module.get_submodule(path).register_forward_pre_hook(lambda m, args, c=convert: c(args))
    if not sequence_parallel:
        _gather_replicated_inputs(stage_module, styles)


def _gather_replicated_inputs(stage_module: nn.Module, styles: Mapping[str, TPStyle]) -> None:
    """A module the plan keeps whole (``replicate``, with a weight) takes its inputs whole: the ILP's
    ``mm R = R x R`` after an all-gather (or all-reduce) of a split input.

    Left to DTensor, a replicated weight meeting an input split on the dim it contracts (e.g. a Llama
    ``o_proj`` after head-split attention) is sliced locally and the output is ``Partial``: no module
    reduces it (only row-split ones do), so the residual stream, the next norm and the column-split
    modules after it run on whole-width partial sums (the MLP's gate/up weights gathered, its
    intermediate ``ffn`` wide on every rank) where the plan prices them split. Without SP only; under
    SP the block's output is redistributed to the sequence shard, a reduce-scatter either way.
    """
    from torch.distributed.tensor import Replicate

    gather = _to_placement(lambda t: Replicate(), False)
    names = {name for name, _ in stage_module.named_modules()}
    for path, style in styles.items():
        if style is TPStyle.REPLICATE and path in names and weight_kind(stage_module.get_submodule(path)):
            stage_module.get_submodule(path).register_forward_pre_hook(lambda m, args: gather(args))


def _to_placement(target: Any, sequence_parallel: bool) -> Any:
    """A function mapping a pytree's floating DTensors to ``target(t)`` (None: left as they are): redistributed
    there (under SP, activations of 3 or more dims; without SP, to ``Replicate`` only: a partial or split input
    made whole); one already replicated passes through Megatron's *f*."""
    from torch.distributed.tensor import DTensor, Replicate
    from torch.utils._pytree import tree_map

    def convert(t: Any) -> Any:
        if not isinstance(t, DTensor) or not t.is_floating_point():
            return t
        placement = target(t)
        if placement is None:
            return t
        if t.placements != (placement,) and (t.dim() >= 3 if sequence_parallel else placement == Replicate()):
            return t.redistribute(placements=[placement])  # without SP: a split or partial input made whole
        return _reduce_grad_here(t) if t.requires_grad and placement == Replicate() else t

    return lambda tree: tree_map(convert, tree)
