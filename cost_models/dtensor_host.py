"""Host time of a tensor-parallel stage's DTensors, where the host runs the kernels (a CPU rank).

``autopar.emit.tp`` runs a stage with tp > 1 on DTensors. On a GPU the host's work overlaps the
kernels of the sizes planned; on a CPU rank it adds to them, in three places, each measured apart by
``profiling/dtensor_probe.py`` (``autopar profile --ranks``) and 0 on the GPU presets:

- every ATen op pays sharding propagation and wrapping (``dtensor_host_s``);
- every collective the stage issues goes through a DTensor redistribution (functional collectives and
  their wait), which takes longer than the direct gloo call the cluster's collective fits time
  (``dtensor_collective_host_s``);
- every Megatron *f* (``DTensor.from_local(x.to_local())``) costs a wrap forward and a redistribution
  check backward (``dtensor_hook_host_s``). The emitter places one at the input of each block child that
  holds a weight and of each split module outside the blocks (``tp_hook_sites``; without sequence
  parallelism: with it those inputs are redistributed instead), and one after each row-split module's
  reduction (one per forward reducing collective).
"""

from __future__ import annotations

from autopar.cost_models.cluster import GPUSpec
from autopar.graph.ir import Layer, OpClass

__all__ = [
    "REDUCING_COLLECTIVES", "dtensor_collective_host_s", "dtensor_hook_host_s", "dtensor_host_s", "tp_hook_sites",
    "weight_children",
]

REDUCING_COLLECTIVES = frozenset({"all_reduce", "reduce_scatter"})
"""Collective kinds (``Collective`` values) that end a row-split module's partial sums in forward: the emitter
follows each with an *f* (``emit/tp.py::_reduce_row_outputs``)."""


def dtensor_host_s(num_ops: int, gpu: GPUSpec) -> tuple[float, float]:
    """(forward, backward) seconds DTensor's dispatch adds to ``num_ops`` ops of a tensor-parallel stage.

    Measured per forward op and per forward op's backward on sharded weights
    (``GPUSpec.dtensor_op_s``, ``dtensor_backward_op_s``; 0 on GPUs).

    Example:
        >>> import dataclasses
        >>> from autopar.cost_models.cluster import Cluster
        >>> gpu = dataclasses.replace(Cluster.preset("dgx-h100").gpu, dtensor_op_s=1e-4, dtensor_backward_op_s=2e-4)
        >>> tuple(round(t, 6) for t in dtensor_host_s(38, gpu))
        (0.0038, 0.0076)
    """
    return num_ops * gpu.dtensor_op_s, num_ops * gpu.dtensor_backward_op_s


def dtensor_collective_host_s(num_collectives: int, gpu: GPUSpec) -> float:
    """Seconds DTensor's redistribution path adds to ``num_collectives`` collectives over their fitted time.

    Example:
        >>> import dataclasses
        >>> from autopar.cost_models.cluster import Cluster
        >>> gpu = dataclasses.replace(Cluster.preset("dgx-h100").gpu, dtensor_collective_s=7e-4)
        >>> round(dtensor_collective_host_s(3, gpu), 6), dtensor_collective_host_s(3, Cluster.preset("dgx-h100").gpu)
        (0.0021, 0.0)
    """
    return num_collectives * gpu.dtensor_collective_s


def dtensor_hook_host_s(num_hooks: int, gpu: GPUSpec) -> tuple[float, float]:
    """(forward, backward) seconds of ``num_hooks`` Megatron *f* wraps (``GPUSpec.dtensor_hook_s``).

    Example:
        >>> import dataclasses
        >>> from autopar.cost_models.cluster import Cluster
        >>> gpu = dataclasses.replace(Cluster.preset("dgx-h100").gpu, dtensor_hook_s=2e-4, dtensor_hook_backward_s=5e-4)
        >>> tuple(round(t, 6) for t in dtensor_hook_host_s(3, gpu))
        (0.0006, 0.0015)
    """
    return num_hooks * gpu.dtensor_hook_s, num_hooks * gpu.dtensor_hook_backward_s


def tp_hook_sites(layer: Layer) -> int:
    """Modules of ``layer`` whose input the emitter wraps in Megatron's *f* (``emit/tp.py::_prepare_block_inputs``).

    A layer of one module (a block) wraps each child that holds a matrix weight (a projection, read by a
    matmul op): the site is the op's module one level below the layer's. A layer of several modules
    (``"ln_f+lm_head"``: outside the blocks) wraps each module whose matrix weight a matmul reads.
    Embedding lookups read integer ids, which pass unwrapped.

    Example:
        >>> from autopar.graph.ir import Op, ParamInfo, TensorMeta
        >>> x = TensorMeta(shape=(2, 8), dtype="float32")
        >>> def mm(path):
        ...     return Op(name=path, target="aten.mm.default", op_class=OpClass.MATMUL, inputs=(x, x),
        ...               input_ops=("prev", None), input_params=(None, f"{path}.weight"), outputs=(x,), flops=1,
        ...               nbytes_moved=1, module_path=path)
        >>> params = tuple(ParamInfo(name=f"{p}.weight", shape=(8, 8), dtype="float32")
        ...                for p in ("b.0.attn.q", "b.0.attn.o", "b.0.mlp.up"))
        >>> ops = tuple(mm(p) for p in ("b.0.attn.q", "b.0.attn.o", "b.0.mlp.up"))
        >>> tp_hook_sites(Layer(index=1, module_path="b.0", kind="k", ops=ops, params=params))
        2
        >>> tp_hook_sites(Layer(index=1, module_path="ln_f+b.0", kind="k", ops=ops, params=params))
        3
    """
    return len(weight_children(layer))


def weight_children(layer: Layer) -> frozenset[str]:
    """``tp_hook_sites``'s modules: a block's children that hold a matrix weight (by name below the block), or, for
    a layer of several modules, the modules whose matrix weight a matmul reads (by path)."""
    matrices = {p.name for p in layer.params if len(p.shape) == 2 and not p.is_buffer}
    prefix = f"{layer.module_path}." if "+" not in layer.module_path else None
    sites = set()
    for op in layer.ops:
        if op.op_class is not OpClass.MATMUL or not any(p in matrices for p in op.input_params if p):
            continue
        if prefix is not None and op.module_path.startswith(prefix):
            sites.add(op.module_path[len(prefix):].split(".")[0])
        else:
            sites.add(op.module_path)
    return frozenset(sites)
