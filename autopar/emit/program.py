"""The program that runs: the model's exported graph, cut into the plan's pipeline stages.

autopar prices the ATen program of ``model.forward``; the emitter runs that same
program rather than a hand-written copy of a model family's forward (which is
how a sliding-window mask or a logit soft-cap gets lost). ``build_program``

1. exports the model at one micro-batch's shapes with ``torch.export``
   (non-strict, the path capture falls back to for Hugging Face models; static
   shapes mean only tensors cross stage boundaries, never Python ints);
2. assigns every graph node to a stage from its ``nn_module_stack``: a stage
   begins at the first node of its first block (``model.layers.3``), or, when it
   begins with a non-block layer (a final norm and head), right after the last
   node of the previous stage's last block;
3. inserts ``pipe_split`` markers there and lets ``torch.distributed.pipelining``
   split the graph (``pipeline(split_policy=...)``): each stage is a
   ``GraphModule`` whose submodules are outlined at their original paths, so
   parameters keep their fully-qualified names and the per-layer submodules the
   plan names exist for FSDP and activation checkpointing.

Values that cross several stages (T5's encoder output, attention masks,
position ids, model inputs that later stages read) are cloned in every stage
they pass through, so each stage reads only what the previous one sends: the
interleaved schedule's runtime sends to adjacent stages only, and torch has no
backward for a value sent to several. Parameters that several stages read (tied
embeddings) are copied into each stage; ``autopar.emit.tied`` sums their
gradients.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from autopar.errors import PlanValidationError, UserInputError
from autopar.graph.layers import MAX_RECOMPUTED_NODES, block_prefix  # the planner prices the same rule
from autopar.plan import Plan

# torch 2.13's own pytree code copies LeafSpec objects through a deprecated isinstance check when an exported
# program is split; the warning is about torch's internals, not the user's code, and would otherwise reach every
# rank's stderr once per process (it broke the "one line per failure" contract of autopar's launch errors).
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)

if TYPE_CHECKING:
    import torch.fx as fx
    from torch.distributed.pipelining import Pipe
    from torch.utils._pytree import TreeSpec

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class TiedGroup:
    """One tensor that the model reads under several parameter names."""

    names: tuple[str, ...]
    """Its parameter names."""
    shape: tuple[int, ...]
    """Its (global) shape."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Program:
    """The exported program of a model, split into the plan's stages."""

    pipe: Pipe
    """``torch.distributed.pipelining``'s split program (``pipe.get_stage_module(i)``: stage ``i``)."""
    out_spec: TreeSpec
    """How the last stage's flat outputs nest into what ``model.forward`` returns (a ``ModelOutput``, dict…)."""
    output_order: tuple[int, ...]
    """For each flat model output, its position among the last stage's outputs."""
    input_names: tuple[str, ...]
    """Keyword names of the model inputs, in the order stage 0 takes them."""
    block_paths: tuple[tuple[str, ...], ...]
    """Per stage, module paths of the repeated blocks it runs (its FSDP and checkpointing units)."""
    tied: tuple[TiedGroup, ...]
    """Parameters that are one tensor under several names (e.g. embedding and LM head)."""

    def stage_module(self, index: int) -> nn.Module:
        """Stage ``index``'s module (parameters under their original names)."""
        return self.pipe.get_stage_module(index)


def example_micro_batch(inputs: Mapping[str, torch.Tensor], micro_batch_size: int,
                        device: torch.device) -> dict[str, torch.Tensor]:
    """Inputs shaped like one micro-batch, on ``device``: the examples' first rows, repeated as needed.

    Example:
        >>> mb = example_micro_batch({"input_ids": torch.tensor([[1, 2], [3, 4]])}, 3, torch.device("cpu"))
        >>> mb["input_ids"].tolist()
        [[1, 2], [3, 4], [1, 2]]
    """
    out: dict[str, torch.Tensor] = {}
    for name, x in inputs.items():
        reps = -(-micro_batch_size // x.shape[0])
        rows = x.repeat(reps, *([1] * (x.dim() - 1)))[:micro_batch_size]
        out[name] = rows.to(device) if device.type != "meta" or x.device.type == "meta" else torch.zeros(
            rows.shape, dtype=rows.dtype, device=device)
    return out


def build_program(model: nn.Module, inputs: Mapping[str, torch.Tensor], plan: Plan) -> Program:
    """Export ``model`` at one micro-batch's shapes and split it at the plan's stage boundaries.

    Args:
        model: The model (meta or real); not modified.
        inputs: Keyword example inputs (batch dim first, any batch size).
        plan: The plan; its stages name layers by module path.

    Raises:
        UserInputError: The model cannot be exported.
        PlanValidationError: A stage boundary cannot be placed (the plan's layers
            are not this model's, or a block is called in two stages).
    """
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    mb = example_micro_batch(inputs, plan.layout.micro_batch_size, device)
    stage_blocks = _stage_blocks(plan)
    was_training = model.training
    model.train()
    try:
        exported = torch.export.export(model, (), mb, strict=False)
        pipe = _split(model, exported, lambda gm: _insert_splits(gm, plan, stage_blocks))
    except PlanValidationError:
        raise
    except Exception as e:  # export and split failures are diverse; all end in one autopar error
        raise UserInputError(
            f"cannot export {type(model).__name__} for emission ({type(e).__name__}: {str(e)[:400]}); "
            f"autopar runs the exported program, so the model must pass torch.export(strict=False)"
        ) from e
    finally:
        model.train(was_training)
    if pipe.num_stages != len(plan.stages):
        raise PlanValidationError(
            f"the plan has {len(plan.stages)} stages but the model's program split into {pipe.num_stages}; "
            f"was the plan made for this model?"
        )
    _restore_non_persistent(pipe, model)
    run_generated_code(pipe.split_gm)
    return Program(pipe=pipe, out_spec=exported.call_spec.out_spec, output_order=_output_order(pipe),
                   input_names=tuple(mb),
                   block_paths=stage_blocks, tied=tied_groups(model))


def run_generated_code(root: nn.Module) -> int:
    """Make every ``InterpreterModule`` under ``root`` run its graph's generated Python code; returns how many.

    ``torch.export.unflatten`` (which the pipeline split uses) builds them to run through ``fx.Interpreter``,
    for stack traces: a Python call per node, and a progress bar built per call, about as much host time
    as a small layer's kernels on a CPU. The generated code computes the same graph (torch runs it so under
    Dynamo); every pass here that edits a graph recompiles its ``graph_module`` (``retarget_device``,
    ``dtensor_rules.keep_fused_splits_sharded``). A graph with a value named ``self`` (the output of a
    submodule called ``self``, as BERT's attention has) keeps the interpreter: its generated code would
    rebind the module's own ``self``.
    """
    count = 0
    for module in root.modules():
        if getattr(module, "_run_with_interpreter", False) and all(n.name != "self" for n in module.graph.nodes):
            module._run_with_interpreter = False
            count += 1
    return count


def _split(model: nn.Module, exported: Any, policy: Any) -> Pipe:
    """``pipeline(...)`` on an existing export: ``Pipe.from_tracing`` without its second export.

    Parameters read by several stages are copied into each (``REPLICATE``), and
    stage 0 takes the model's keyword inputs, as ``Pipe.from_tracing`` arranges.
    """
    import copy

    from torch.distributed.pipelining._IR import MultiUseParameterConfig, Pipe

    pipe = Pipe._from_traced(model, exported, MultiUseParameterConfig.REPLICATE, split_policy=policy)
    first = pipe.get_stage_module(0)
    traced = exported.module(check_guards=False)
    _order_inputs_as(first.graph, traced.graph)
    first.graph._codegen = copy.deepcopy(traced.graph._codegen)
    first.graph._codegen.pytree_info = first.graph._codegen.pytree_info._replace(out_spec=None)
    first.recompile()
    return pipe


def _order_inputs_as(graph: fx.Graph, model_graph: fx.Graph) -> None:
    """Stage 0 takes the model's inputs in the model's order.

    The split orders a stage's inputs by first use, but stage 0 is called with the model's keyword
    inputs through the model's own pytree codegen, which passes them in the model's order: with the
    orders differing (an attention mask read before the token ids), inputs would silently swap.

    Raises:
        PlanValidationError: Stage 0 does not take every model input.
    """
    mine = {n.target: n for n in graph.nodes if n.op == "placeholder"}
    order = [n.target for n in model_graph.nodes if n.op == "placeholder"]
    if sorted(mine) != sorted(order):
        raise PlanValidationError(f"stage 0 takes inputs {sorted(mine)}, the model {order}; pin pp=1")
    anchor = next(n for n in graph.nodes if n.op != "placeholder")
    for name in order:
        anchor.prepend(mine[name])


def _output_order(pipe: Pipe) -> tuple[int, ...]:
    """Where each model output sits among the last stage's outputs (split_module numbers them its own way)."""
    import operator

    import torch.fx as fx
    from torch.utils._pytree import tree_flatten

    graph = pipe.split_gm.graph
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    leaves, _ = tree_flatten(output.args[0])
    order = []
    for leaf in leaves:
        if isinstance(leaf, fx.Node) and leaf.op == "call_function" and leaf.target is operator.getitem:
            order.append(int(leaf.args[1]))
        else:
            order.append(0)
    return tuple(order)


def tied_groups(model: nn.Module) -> tuple[TiedGroup, ...]:
    """Parameters that share one tensor under several names (only groups of two or more)."""
    owners: dict[int, list[str]] = {}
    shapes: dict[int, tuple[int, ...]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name)
        shapes[id(param)] = tuple(param.shape)
    return tuple(TiedGroup(names=tuple(names), shape=shapes[key]) for key, names in owners.items() if len(names) > 1)


def _stage_blocks(plan: Plan) -> tuple[tuple[str, ...], ...]:
    """Per stage, the plan's layers that are repeated blocks (``block_prefix(path) == path``)."""
    return tuple(tuple(p for p in stage.module_paths if block_prefix(p) == p) for stage in plan.stages)


def _node_block(node: fx.Node) -> str | None:
    """The innermost block (``model.layers.3``) whose module issued ``node``, if any."""
    stack = node.meta.get("nn_module_stack") or {}
    for path, _ in reversed(list(stack.values())):
        prefix = block_prefix(_strip(path))
        if prefix is not None:
            return prefix
    return None


def _strip(path: str) -> str:
    """Module path as ``named_modules`` spells it (export writes ``L['self'].model.layers[0]`` in some versions)."""
    return path.replace("L['self'].", "").replace("[", ".").replace("]", "")


def _insert_splits(gm: fx.GraphModule, plan: Plan, stage_blocks: Sequence[tuple[str, ...]]) -> fx.GraphModule:
    """Put ``pipe_split`` before each stage's first node; route inputs that later stages read through stage 0."""
    from torch.distributed.pipelining._IR import aten_pipe_split_alias

    for n in list(gm.graph.nodes):  # export-time dtype/device assertions: the device changes, DTensor has no rule
        if n.op == "call_function" and n.target is torch.ops.aten._assert_tensor_metadata.default:
            gm.graph.erase_node(n)
    nodes = list(gm.graph.nodes)
    block_of = {n: _node_block(n) for n in nodes}
    owner = {b: i for i, blocks in enumerate(stage_blocks) for b in blocks}
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    for pos, n in enumerate(nodes):
        b = block_of[n]
        if b is not None:
            first.setdefault(b, pos)
            last[b] = pos
    missing = [b for b in owner if b not in first]
    if missing:
        raise PlanValidationError(f"the plan's blocks {missing} are not modules this program calls; "
                                  f"was the plan made for this model?")
    starts = [_stage_start(s, plan, stage_blocks, first, last) for s in range(1, len(stage_blocks))]
    for s, (a, b) in enumerate(zip(starts, starts[1:]), start=1):
        if not a < b:
            raise PlanValidationError(f"stage {s} of the plan holds no node of the program")
    _check_blocks_whole(nodes, block_of, owner, starts)
    splits = []
    for pos in starts:
        with gm.graph.inserting_before(nodes[pos]):
            splits.append(gm.graph.call_function(aten_pipe_split_alias, (), {}))
    _recompute_input_only_values(gm, splits)
    _relay_stage_by_stage(gm, splits)
    gm.recompile()
    return gm


def _stage_start(s: int, plan: Plan, stage_blocks: Sequence[tuple[str, ...]], first: Mapping[str, int],
                 last: Mapping[str, int]) -> int:
    paths = plan.stages[s].module_paths
    if block_prefix(paths[0]) == paths[0]:
        return first[paths[0]]
    earlier = [b for blocks in stage_blocks[:s] for b in blocks]
    if not earlier:
        later = [b for blocks in stage_blocks[s:] for b in blocks]
        if not later:
            raise PlanValidationError("the plan's stages hold no repeated block to place a boundary at")
        raise PlanValidationError(
            f"stage {s} begins with the non-block layer {paths[0]!r} and no earlier stage holds a block; "
            f"move the boundary to a block (e.g. {later[0]!r})")
    return last[earlier[-1]] + 1


def _check_blocks_whole(nodes: Sequence[fx.Node], block_of: Mapping[fx.Node, str | None],
                        owner: Mapping[str, int], starts: Sequence[int]) -> None:
    """Every node of a block lies in the stage the plan gave the block."""
    bounds = [0, *starts, len(nodes)]
    for s in range(len(bounds) - 1):
        for n in nodes[bounds[s]:bounds[s + 1]]:
            b = block_of[n]
            if b is not None and b in owner and owner[b] != s:
                raise PlanValidationError(
                    f"node {n.name} of block {b!r} runs in stage {s} but the plan puts {b!r} in stage "
                    f"{owner[b]} (the block is called more than once, or out of order); pin pp=1")


def _stages(gm: fx.GraphModule, splits: Sequence[fx.Node]) -> tuple[dict[fx.Node, int], list[fx.Node]]:
    """Each node's stage (inputs: −1, the output: one past the last stage), and each stage's first node."""
    stage_of = {}
    stage = 0
    for n in gm.graph.nodes:
        if n in splits:
            stage += 1
        stage_of[n] = -1 if n.op == "placeholder" else len(splits) + 1 if n.op == "output" else stage
    return stage_of, [next(n for n in gm.graph.nodes if n.op != "placeholder"), *(s.next for s in splits)]


def _recompute_input_only_values(gm: fx.GraphModule, splits: Sequence[fx.Node]) -> None:
    """A value computed from the model's inputs and buffers alone (an attention mask, a rotary table) is
    recomputed in each later stage that reads it instead of being sent there.

    A ``(micro_batch, 1, seq, seq)`` fp32 mask would otherwise cross every stage boundary: at 8K tokens,
    256 MiB per micro-batch, more than the hidden state. The inputs it is made from (token ids, positions)
    are small and travel instead (``_relay_stage_by_stage``). Subgraphs with a parameter, a random op
    (dropout) or more than ``MAX_RECOMPUTED_NODES`` nodes are sent as before.
    """
    import torch.fx as fx

    stage_of, starts = _stages(gm, splits)
    root = _root_module_stack(gm)
    params = {name for name, _ in gm.named_parameters()}
    per_stage: dict[int, dict[fx.Node, fx.Node]] = {}  # a stage copies a shared step (rotary positions) once
    for v in [n for n in gm.graph.nodes if n.op == "call_function" and isinstance(n.meta.get("val"), torch.Tensor)]:
        later = sorted({stage_of[u] for u in v.users if stage_of[u] > stage_of[v] and u.op != "output"})
        recipe = _input_only_subgraph(v, params) if later else None
        if recipe is None:
            continue
        for t in later:
            copies = per_stage.setdefault(t, {})
            with gm.graph.inserting_before(starts[t]):
                for node in (n for n in recipe if n not in copies):
                    copies[node] = gm.graph.node_copy(node, lambda a: copies.get(a, a))
                    copies[node].meta["nn_module_stack"] = root
            for u in [u for u in v.users if stage_of.get(u) == t]:
                u.replace_input_with(v, copies[v])


def _input_only_subgraph(v: fx.Node, params: set[str]) -> list[fx.Node] | None:
    """The nodes that compute ``v`` from inputs, buffers and constants, in graph order; None if ``v`` needs
    a parameter, a random op or more than ``MAX_RECOMPUTED_NODES`` nodes."""
    seen: set[fx.Node] = set()
    todo = [v]
    while todo:
        n = todo.pop()
        if n in seen or n.op == "placeholder":
            continue
        if n.op == "get_attr":
            if n.target in params:
                return None
            continue
        tags = getattr(n.target, "tags", ())
        if n.op != "call_function" or torch.Tag.nondeterministic_seeded in tags or len(seen) >= MAX_RECOMPUTED_NODES:
            return None
        seen.add(n)
        todo.extend(n.all_input_nodes)
    order = {n: i for i, n in enumerate(v.graph.nodes)}
    return sorted(seen, key=order.__getitem__)


def _relay_stage_by_stage(gm: fx.GraphModule, splits: Sequence[fx.Node]) -> None:
    """Every tensor crosses one stage boundary at a time: a value that stage ``t`` reads from stage ``s < t − 1``
    is cloned in each stage between, and ``t`` reads the last clone.

    Model inputs count as made before stage 0 and model outputs as read after the last stage, so inputs that
    later stages read travel from stage 0 and the last stage returns the whole output (an encoder's hidden
    state). torch.distributed.pipelining has no backward for a value sent to several stages, and its
    multi-stage (interleaved) schedules send only to the adjacent stage; relayed, a value's gradient flows
    back stage by stage like any activation's. Non-tensor values are left as they are (static shapes: none
    cross a boundary).
    """
    import torch.fx as fx

    stage_of, starts = _stages(gm, splits)
    root = _root_module_stack(gm)
    for v in [n for n in gm.graph.nodes if n.op in ("placeholder", "call_function", "call_method", "call_module")]:
        made = stage_of[v]
        far = sorted({stage_of[u] for u in v.users if stage_of[u] > made + 1})
        if not far or not isinstance(v.meta.get("val"), torch.Tensor):
            continue
        relays: dict[int, fx.Node] = {}
        prev = v
        for k in range(made + 1, far[-1]):
            with gm.graph.inserting_before(starts[k]):
                prev = relays[k] = gm.graph.call_function(torch.ops.aten.clone.default, (prev,))
            prev.meta = {**v.meta, "nn_module_stack": root}  # a relay belongs to the stage, not to a block
        for u in [u for u in v.users if u not in relays.values() and stage_of[u] > made + 1]:
            u.replace_input_with(v, relays[stage_of[u] - 1])


def _root_module_stack(gm: fx.GraphModule) -> dict[str, Any]:
    """The ``nn_module_stack`` of an op of the model's own ``forward`` (outside every submodule)."""
    for n in gm.graph.nodes:
        for key, (path, ty) in n.meta.get("nn_module_stack", {}).items():
            if path == "":
                return {key: (path, ty)}
    raise PlanValidationError("the exported program names no root module; pin pp=1")


def _restore_non_persistent(pipe: Pipe, model: nn.Module) -> None:
    """Buffers the model does not save (rotary ``inv_freq``) stay out of the stages' state dicts too."""
    saved = set(model.state_dict())
    for i in range(pipe.num_stages):
        stage = pipe.get_stage_module(i)
        for name, _ in list(stage.named_buffers()):
            if name not in saved:
                parent, _, leaf = name.rpartition(".")
                stage.get_submodule(parent)._non_persistent_buffers_set.add(leaf)


def retarget_device(stage_module: nn.Module, device: torch.device) -> int:
    """Point the program's factory and copy ops (``arange``, ``to(device=...)``) at ``device``.

    The export ran on the model's device (often ``meta``), and the graph records
    it as a constant argument. Returns the number of arguments changed.
    """
    import torch.fx as fx

    def fix(a: Any) -> Any:
        return device if isinstance(a, torch.device) and a != device else a

    changed = 0
    for module in stage_module.modules():
        graph = getattr(module, "graph", None)
        if not isinstance(graph, fx.Graph):
            continue
        for node in graph.nodes:
            if node.op != "call_function":
                continue
            args, kwargs = fx.node.map_aggregate(node.args, fix), fx.node.map_aggregate(node.kwargs, fix)
            if args != node.args or kwargs != node.kwargs:
                node.args, node.kwargs = args, kwargs
                changed += 1
        for owner in (module, getattr(module, "graph_module", None)):
            if isinstance(owner, fx.GraphModule) and owner.graph is graph:
                owner.recompile()
    return changed


def flat_outputs(output: Any) -> list[Any]:
    """The last stage's output as a list of leaves."""
    return list(output) if isinstance(output, (tuple, list)) else [output]


def unflatten_output(output: Any, out_spec: TreeSpec, order: Sequence[int] | None = None) -> Any:
    """Nest the last stage's flat outputs (taken in ``order``) back into what ``model.forward`` returns."""
    from torch.utils._pytree import tree_unflatten

    flat = flat_outputs(output)
    if order is not None and len(flat) > 1:
        flat = [flat[i] for i in order]
    return tree_unflatten(flat, out_spec)
