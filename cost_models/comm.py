"""Collective communication costs: alpha-beta, ring and tree, over groups that may span nodes.

Conventions follow NCCL's performance tests (nccl-tests ``doc/PERFORMANCE.md``):
``nbytes`` is the logical buffer size S ("size": the full, unsharded tensor for
all-gather and reduce-scatter), the algorithm bandwidth is S / t, and the bus
bandwidth busbw = algbw · factor with factor = 2(n−1)/n for all-reduce, (n−1)/n
for all-gather, reduce-scatter and all-to-all, 1 for broadcast and send/recv.
busbw is what a link must carry, so it is compared with the link's bandwidth.

The time model is NCCL's own tuning model (``NVIDIA/nccl src/graph/tuning.cc``,
``ncclTopoTuneModel``/``ncclTopoGetAlgoTime``), reduced to alpha-beta form:

    t = base_latency + Σ_steps hop_latency + S · factor / bus_bandwidth

with ring all-reduce taking 2(n−1) steps, of which 2(k−1) cross nodes (k = nodes
spanned), and tree all-reduce 2·((n/k − 1) intra-node + ⌈log2 k⌉ inter-node) hops at
bandwidth 2·S / (0.9 · busbw). Latencies are those of the low-latency protocol and
bandwidth that of the bulk protocol, i.e. the envelope of NCCL's protocol choice.

A group of n ranks over k nodes (n/k per node, each GPU with its own share of the
node's NICs) is bounded by its slowest link: inside one node it runs on NVLink/PCIe;
across nodes the node-crossing traffic of the ring is spread over the n/k GPUs' NIC
shares (NCCL runs one ring per NIC), so busbw = min(intra, (n/k) · inter per GPU).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from autopar._compat import StrEnum
from autopar.cost_models.cluster import Cluster, GPUSpec
from autopar.layout import Collective, CommBreakdown

RING_BASE_LATENCY_S = 3.6e-6
"""Fixed cost of one ring collective: NCCL tuning.cc ``baseLat[RING][LL]`` = 3.6 µs."""
TREE_BASE_LATENCY_S = 4.4e-6
"""Fixed cost of one tree all-reduce: NCCL tuning.cc ``baseLat[TREE][LL]`` = 4.4 µs."""
TREE_BANDWIDTH_FACTOR = 0.9
"""Trees reach 0.9 of the ring's bus bandwidth: tuning.cc ``if (a == NCCL_ALGO_TREE) busBw = busBw*.9``."""


class Algorithm(StrEnum):
    """Collective algorithm; ``auto`` takes the faster one NCCL offers for that collective."""

    RING = "ring"
    TREE = "tree"
    AUTO = "auto"


TREE_COLLECTIVES = frozenset({Collective.ALL_REDUCE})
"""NCCL implements only all-reduce with (double binary) trees; the others run as rings or p2p."""


def bus_bandwidth_factor(kind: Collective, group_size: int) -> float:
    """busbw / algbw for ``kind`` over ``group_size`` ranks (nccl-tests PERFORMANCE.md).

    Example:
        >>> bus_bandwidth_factor(Collective.ALL_REDUCE, 8)
        1.75
        >>> bus_bandwidth_factor(Collective.ALL_GATHER, 4)
        0.75
    """
    n = group_size
    match Collective(kind):
        case Collective.ALL_REDUCE:
            return 2.0 * (n - 1) / n
        case Collective.ALL_GATHER | Collective.REDUCE_SCATTER | Collective.ALL_TO_ALL:
            return (n - 1) / n
        case Collective.BROADCAST | Collective.SEND_RECV:
            return 1.0
        case _:
            raise ValueError(f"no bus-bandwidth rule for collective {kind!r}")


def wire_bytes(kind: Collective, nbytes: float, group_size: int) -> float:
    """Bytes each rank sends for a collective of logical size ``nbytes`` (ring algorithms).

    Example:
        >>> wire_bytes(Collective.ALL_REDUCE, 1000, 4)  # 2(n-1)/n · S
        1500.0
    """
    if group_size == 1:
        return 0.0
    return bus_bandwidth_factor(kind, group_size) * nbytes


def group_bus_bandwidth(cluster: Cluster, group_size: int, nodes_spanned: int) -> float:
    """Achievable bus bandwidth (bytes/s per rank) of a group: its slowest link bounds it.

    Example:
        >>> c = Cluster.preset("dgx-a100-80gb", nodes=2)
        >>> group_bus_bandwidth(c, 8, 1) / 1e9   # NVSwitch, 300 GB/s · 0.78
        234.0
        >>> group_bus_bandwidth(c, 2, 2) / 1e9   # one rank per node: its NIC share, 25 GB/s · 0.92
        23.0
    """
    _check_group(cluster, group_size, nodes_spanned)
    intra = cluster.intra_node.achievable_bytes_per_s
    if nodes_spanned == 1:
        return intra
    per_node = group_size // nodes_spanned
    fabric = per_node * cluster.inter_node.achievable_bytes_per_s
    return min(intra, fabric) if per_node > 1 else fabric


def estimate_collective_time(kind: Collective, nbytes: float, group_size: int, *, cluster: Cluster,
                             nodes_spanned: int = 1, algorithm: str = "auto") -> float:
    """Seconds for one collective of logical size ``nbytes`` over ``group_size`` ranks.

    Args:
        kind: the collective (``Collective`` or its value).
        nbytes: NCCL "size": the full buffer (the gathered output of an all-gather, the input of a
            reduce-scatter, the message of a send/recv).
        group_size: ranks in the group (2 for send/recv).
        cluster: the hardware.
        nodes_spanned: nodes the group's ranks sit on (1: all in one node, priced on NVLink/PCIe).
        algorithm: ``"ring"``, ``"tree"`` (all-reduce only, as in NCCL) or ``"auto"`` (the faster).

    Returns:
        Seconds; 0 for a group of one rank or an empty buffer.

    Raises:
        ValueError: a group that does not fit the cluster, negative bytes, or tree for a collective
            NCCL runs only as a ring.

    Example:
        >>> c = Cluster.preset("dgx-h100")
        >>> t = estimate_collective_time(Collective.ALL_REDUCE, 2**30, 8, cluster=c, algorithm="ring")
        >>> round(2**30 * 2 * 7 / 8 / t / 1e9)  # busbw in GB/s: 450 GB/s NVLink · 0.78
        350
    """
    kind, algo = Collective(kind), Algorithm(algorithm)
    _check_group(cluster, group_size, nodes_spanned)
    if nbytes < 0:
        raise ValueError(f"collective {kind.value}: nbytes must be >= 0, got {nbytes}")
    if kind is Collective.SEND_RECV and group_size not in (1, 2):
        raise ValueError(f"send/recv is between 2 ranks, got group_size={group_size}")
    if group_size == 1 or nbytes == 0:
        return 0.0
    if algo is Algorithm.TREE and kind not in TREE_COLLECTIVES:
        raise ValueError(f"NCCL runs {kind.value} only as a ring; tree is available for all_reduce only")
    measured = cluster.measured_collective(kind.value, group_size) if nodes_spanned == 1 else None
    if measured is not None:  # this machine's own fit for the kind and size (autopar profile --ranks)
        return measured[0] + measured[1] * nbytes
    if kind is Collective.ALL_TO_ALL:
        return _all_to_all_time(nbytes, group_size, nodes_spanned, cluster)
    if kind is Collective.SEND_RECV:
        return _p2p_time(nbytes, nodes_spanned, cluster)
    ring = _ring_time(kind, nbytes, group_size, nodes_spanned, cluster)
    if algo is Algorithm.RING or kind not in TREE_COLLECTIVES:
        return ring
    tree = _tree_all_reduce_time(nbytes, group_size, nodes_spanned, cluster)
    return tree if algo is Algorithm.TREE else min(ring, tree)


def _ring_steps(kind: Collective, group_size: int, nodes_spanned: int) -> tuple[int, int]:
    """(steps, of which node-crossing) of a ring collective: tuning.cc ``nsteps``/``nInterSteps``."""
    n, k = group_size, nodes_spanned
    if kind is Collective.ALL_REDUCE:
        return 2 * (n - 1), 2 * (k - 1)
    return n - 1, k - 1  # all-gather, reduce-scatter; broadcast is a pipelined chain of n−1 hops


def _ring_time(kind: Collective, nbytes: float, group_size: int, nodes_spanned: int, cluster: Cluster) -> float:
    steps, inter_steps = _ring_steps(kind, group_size, nodes_spanned)
    latency = (RING_BASE_LATENCY_S + (steps - inter_steps) * cluster.intra_node.latency_s
               + inter_steps * cluster.inter_node.latency_s)
    bandwidth = group_bus_bandwidth(cluster, group_size, nodes_spanned)
    return latency + wire_bytes(kind, nbytes, group_size) / bandwidth


def _tree_all_reduce_time(nbytes: float, group_size: int, nodes_spanned: int, cluster: Cluster) -> float:
    """NCCL tree all-reduce: a chain inside each node, a double binary tree across nodes (reduce + broadcast)."""
    per_node = group_size // nodes_spanned
    hops = ((per_node - 1) * cluster.intra_node.latency_s
            + math.ceil(math.log2(nodes_spanned)) * cluster.inter_node.latency_s)
    latency = TREE_BASE_LATENCY_S + 2 * hops
    bandwidth = TREE_BANDWIDTH_FACTOR * group_bus_bandwidth(cluster, group_size, nodes_spanned)
    return latency + 2.0 * nbytes / bandwidth


def _all_to_all_time(nbytes: float, group_size: int, nodes_spanned: int, cluster: Cluster) -> float:
    """Each rank sends S/n to every peer at once: intra-node shares on NVLink, the rest on its NIC share."""
    n, per_node = group_size, group_size // nodes_spanned
    intra_bytes = nbytes * (per_node - 1) / n
    inter_bytes = nbytes * (n - per_node) / n
    time = intra_bytes / cluster.intra_node.achievable_bytes_per_s
    if inter_bytes > 0:
        time = max(time, inter_bytes / cluster.inter_node.achievable_bytes_per_s)
    slowest = cluster.inter_node if nodes_spanned > 1 else cluster.intra_node
    return RING_BASE_LATENCY_S + (n - 1) * slowest.latency_s + time


def _p2p_time(nbytes: float, nodes_spanned: int, cluster: Cluster) -> float:
    link = cluster.intra_node if nodes_spanned == 1 else cluster.inter_node
    return RING_BASE_LATENCY_S + link.latency_s + nbytes / link.achievable_bytes_per_s


COMPUTE_PER_FORWARD = 3
"""A micro-batch's forward + backward compute in forward passes (backward ≈ 2 × forward: Kaplan et al. 2020
§2.1; Narayanan et al. 2021 eq. 3). ZeRO 1/2's gather of updated parameters hides behind the next step's first
forward pass, a ``1 / COMPUTE_PER_FORWARD`` share of one micro-batch's compute."""


def estimate_exposed_dp_comm(*, zero_stage: int, num_micro_batches: int, grad_reduce_s: float,
                             param_gather_s: float, rank_compute_s: float, last_backward_s: float,
                             overlap: bool, edge_gather_s: float = 0.0, edge_reduce_s: float = 0.0,
                             copy_out_s: float = 0.0, copy_in_s: float = 0.0) -> CommBreakdown:
    """Data-parallel communication one pipeline rank leaves on the critical path of a step, by ZeRO collective.

    ZeRO 0 all-reduces gradients; ZeRO 1/2 reduce-scatter gradients and all-gather the updated
    parameter shards (the volume of one all-reduce); ZeRO 3 (FSDP) also all-gathers parameters before
    the forward and the backward of every micro-batch (Rajbhandari et al. 2020, §5). With ``overlap``:

    - the gradient reduction hides behind the last micro-batch's backward (bucketed reduction,
      Li et al. 2020, "PyTorch Distributed", §3.2.3), so ``max(0, reduce − last_backward)`` is exposed;
    - ZeRO 1/2's gather hides behind the next step's first forward (Megatron-LM
      ``--overlap-param-gather``; ``1 / COMPUTE_PER_FORWARD`` of a micro-batch's compute);
    - ZeRO 3's two gathers per micro-batch hide behind that micro-batch's compute (prefetching),
      so ``m · max(0, 2·gather − compute / m)`` is exposed.

    Overlap has two edges nothing can hide (FSDP units, ``fsdp_edge_params``): a forward cannot start
    before its first units are gathered (``edge_gather_s``, once per micro-batch under ZeRO 3, whose
    units are resharded after backward; once per step under ZeRO 1/2), and the last units' reduction
    starts after the last backward kernel (``edge_reduce_s``), so each exposed term is at least its edge.
    FSDP2's copy kernels run on the compute stream (``estimate_fsdp_copy_time``): ``copy_out_s`` joins the
    all-gather term and ``copy_in_s`` the reduction term, exposed with or without overlap (under ZeRO 0,
    FSDP2's ``replicate`` gathers nothing, and the all-gather term is its copy-out alone).
    Without overlap all of it is exposed.

    Args:
        zero_stage: 0-3.
        num_micro_batches: m, micro-batches per step on the rank.
        grad_reduce_s: one all-reduce (ZeRO 0) or reduce-scatter (ZeRO 1-3) of the rank's gradients over dp.
        param_gather_s: one all-gather of the rank's parameters over dp (unused under ZeRO 0).
        rank_compute_s: forward + backward compute of all m micro-batches on the rank.
        last_backward_s: backward of one micro-batch on the rank.
        overlap: whether communication overlaps compute (a plan option).
        edge_gather_s: the all-gather of the units a forward needs first (unused under ZeRO 0).
        edge_reduce_s: the reduction of the units whose gradients are ready last.
        copy_out_s: FSDP2's all-gather copy-out kernels per step.
        copy_in_s: FSDP2's reduce copy-in kernels per step.

    Returns:
        The data-parallel fields of a ``CommBreakdown`` (the others are 0).

    Example:
        >>> estimate_exposed_dp_comm(zero_stage=0, num_micro_batches=4, grad_reduce_s=0.75, param_gather_s=0.0,
        ...                          rank_compute_s=4.0, last_backward_s=0.5, overlap=True).dp_all_reduce_s
        0.25
        >>> c = estimate_exposed_dp_comm(zero_stage=3, num_micro_batches=2, grad_reduce_s=0.1, param_gather_s=0.5,
        ...                              rank_compute_s=1.0, last_backward_s=0.3, overlap=True)
        >>> round(c.dp_all_gather_s, 9), c.dp_reduce_scatter_s
        (1.0, 0.0)
        >>> c = estimate_exposed_dp_comm(zero_stage=3, num_micro_batches=2, grad_reduce_s=0.1, param_gather_s=0.1,
        ...                              rank_compute_s=1.0, last_backward_s=0.3, overlap=True,
        ...                              edge_gather_s=0.02, edge_reduce_s=0.03)
        >>> round(c.dp_all_gather_s, 9), round(c.dp_reduce_scatter_s, 9)  # the edges, per micro-batch and once
        (0.04, 0.03)
    """
    if zero_stage not in (0, 1, 2, 3) or num_micro_batches < 1:
        raise ValueError(f"zero_stage={zero_stage} must be 0-3 and num_micro_batches={num_micro_batches} >= 1")
    m = num_micro_batches
    hide = last_backward_s if overlap else 0.0
    reduce = max(edge_reduce_s, grad_reduce_s - hide, 0.0) + copy_in_s
    if zero_stage == 0:  # replicate's unshard is its copy-out alone (``fsdp_gathers_per_step``)
        return CommBreakdown(dp_all_reduce_s=reduce, dp_all_gather_s=copy_out_s)
    if zero_stage < 3:
        first_forward = rank_compute_s / m / COMPUTE_PER_FORWARD if overlap else 0.0
        gather = max(edge_gather_s, param_gather_s - first_forward, 0.0)
        return CommBreakdown(dp_reduce_scatter_s=reduce, dp_all_gather_s=gather + copy_out_s)
    per_micro_batch = 2 * param_gather_s  # forward and backward gathers of every micro-batch
    exposed = m * max(edge_gather_s, per_micro_batch - (rank_compute_s / m if overlap else 0.0), 0.0)
    return CommBreakdown(dp_reduce_scatter_s=reduce, dp_all_gather_s=exposed + copy_out_s)


def fsdp_units(unit_params: Sequence[float], is_block: Sequence[bool]) -> tuple[float, ...]:
    """Parameters of each FSDP unit of one stage module, the stage root first: the unit each collective moves.

    ``emit/dp.py`` makes each repeated block an FSDP unit and the stage root (embedding, final norm, head:
    every other layer) one more, and FSDP2 gathers and reduces each unit with collectives of its own, so
    every unit pays a collective's fixed cost. Units without parameters issue none and are left out.

    Example:
        >>> fsdp_units([5.0, 2.0, 2.0, 2.0, 6.0], [False, True, True, True, False])
        (11.0, 2.0, 2.0, 2.0)
        >>> fsdp_units([2.0, 0.0], [True, False])  # a middle pipeline stage without root parameters
        (2.0,)
    """
    if len(unit_params) != len(is_block):
        raise ValueError(f"{len(unit_params)} layers but {len(is_block)} block flags")
    root = math.fsum(p for p, block in zip(unit_params, is_block) if not block)
    return tuple(u for u in (root, *(p for p, block in zip(unit_params, is_block) if block)) if u > 0)


def fsdp_edge_units(unit_params: Sequence[float], is_block: Sequence[bool]) -> tuple[float, ...]:
    """The FSDP units a rank's forward gathers first and its backward reduces last (parameters of each).

    The forward waits for the stage root's all-gather and then the first block's (the embedding between
    them is too short to hide it), and the backward ends with the first block's reduce-scatter and then the
    root's, after the last kernel: root + first block, both ways (``fsdp_units``' first two).

    Example:
        >>> fsdp_edge_units([5.0, 2.0, 2.0, 2.0, 6.0], [False, True, True, True, False])
        (11.0, 2.0)
        >>> fsdp_edge_units([2.0, 2.0], [True, True])  # a middle pipeline stage: its first block
        (2.0,)
    """
    units = fsdp_units(unit_params, is_block)
    has_root = any(p > 0 for p, block in zip(unit_params, is_block) if not block)
    return units[:2] if has_root else units[:1]


def fsdp_edge_params(unit_params: Sequence[float], is_block: Sequence[bool]) -> float:
    """Parameters of the FSDP units a rank's forward gathers first and its backward reduces last
    (``fsdp_edge_units``, summed).

    Example:
        >>> fsdp_edge_params([5.0, 2.0, 2.0, 2.0, 6.0], [False, True, True, True, False])  # 5 + 6 + 2
        13.0
        >>> fsdp_edge_params([2.0, 2.0], [True, True])  # a middle pipeline stage: its first block
        2.0
    """
    return math.fsum(fsdp_edge_units(unit_params, is_block))


FSDP2_COPY_OUT_BYTES_PER_ELEMENT = 2
"""All-gather copy-out (``foreach_all_gather_copy_out``: ``split_with_sizes_copy`` from the gathered buffer into
each unsharded parameter) reads and writes every gathered element once: 2 × the parameter dtype's width."""


def fsdp_copy_bytes(num_params: float, *, gathers_per_step: int, param_bytes: int = 2, grad_bytes: int = 2,
                    reduce_bytes: int = 4) -> tuple[float, float]:
    """HBM bytes FSDP2's copy kernels move on the compute stream per step, for ``num_params`` unsharded
    parameters: (all-gather copy-out, reduce copy-in).

    torch ``distributed/fsdp/_fully_shard``: ``wait_for_unshard`` runs the all-gather copy-out on the current
    stream (``gathers_per_step`` times: forward and, with ``reshard_after_forward``, backward), and
    ``foreach_reduce`` runs the reduce-scatter copy-in (``_chunk_cat`` of the gradients into the
    ``reduce_dtype`` buffer: read ``grad_bytes``, write ``reduce_bytes``) on the current stream before
    the reduce-scatter stream waits on it. Both serialize with compute.

    Example:
        >>> [b / 1e9 for b in fsdp_copy_bytes(1e9, gathers_per_step=2)]  # 2 × (2 + 2), (2 + 4) bytes per parameter
        [8.0, 6.0]
    """
    copy_out = gathers_per_step * FSDP2_COPY_OUT_BYTES_PER_ELEMENT * param_bytes
    return float(num_params) * copy_out, float(num_params) * (grad_bytes + reduce_bytes)


def fsdp_gathers_per_step(zero_stage: int, num_micro_batches: int) -> int:
    """Unshards (all-gather and copy-out) of each FSDP unit per step: ZeRO 3 before every micro-batch's forward
    and backward (2m, resharded after each); ZeRO 0-2 once, kept from the first forward to the last backward
    (``emit/runtime.py``). ZeRO 0 runs FSDP2's ``replicate``, whose unshard gathers over a one-rank shard group:
    no communication (``_dp_comm`` prices no all-gather at ZeRO 0), but the copy-out of every parameter.

    Example:
        >>> [fsdp_gathers_per_step(z, 4) for z in (0, 1, 2, 3)]
        [1, 1, 1, 8]
    """
    return 2 * num_micro_batches if zero_stage == 3 else 1


def estimate_fsdp_copy_time(num_params: float, gpu: GPUSpec, *, gathers_per_step: int, param_bytes: int,
                            reduce_bytes: int) -> tuple[float, float]:
    """Seconds of FSDP2's copy kernels per step (``fsdp_copy_bytes``; gradients at the parameters' width) at
    the GPU's achievable bandwidth: (all-gather copy-out, reduce copy-in); (0, 0) without parameters.

    Example:
        >>> from autopar.cost_models.cluster import Cluster
        >>> gpu = Cluster.preset("dgx-h100").gpu
        >>> [round(t * 1e3, 2) for t in estimate_fsdp_copy_time(1e9, gpu, gathers_per_step=2, param_bytes=2,
        ...                                                      reduce_bytes=4)]
        [2.65, 1.99]
    """
    if num_params <= 0:
        return 0.0, 0.0
    out_bytes, in_bytes = fsdp_copy_bytes(num_params, gathers_per_step=gathers_per_step, param_bytes=param_bytes,
                                          grad_bytes=param_bytes, reduce_bytes=reduce_bytes)
    bw = gpu.achievable_mem_bytes_per_s
    return out_bytes / bw, in_bytes / bw


def _check_group(cluster: Cluster, group_size: int, nodes_spanned: int) -> None:
    if group_size < 1 or nodes_spanned < 1 or nodes_spanned > group_size:
        raise ValueError(f"group of {group_size} ranks cannot span {nodes_spanned} nodes")
    if nodes_spanned > cluster.nodes:
        raise ValueError(f"group spans {nodes_spanned} nodes but cluster {cluster.name!r} has {cluster.nodes}")
    if math.ceil(group_size / nodes_spanned) > cluster.gpus_per_node:
        raise ValueError(f"{group_size} ranks over {nodes_spanned} node(s) put "
                         f"{math.ceil(group_size / nodes_spanned)} on a node of {cluster.gpus_per_node} GPUs")


__all__ = [
    "Algorithm",
    "Collective",
    "RING_BASE_LATENCY_S",
    "TREE_BANDWIDTH_FACTOR",
    "TREE_BASE_LATENCY_S",
    "bus_bandwidth_factor",
    "estimate_collective_time",
    "COMPUTE_PER_FORWARD",
    "estimate_exposed_dp_comm",
    "FSDP2_COPY_OUT_BYTES_PER_ELEMENT",
    "estimate_fsdp_copy_time",
    "fsdp_gathers_per_step",
    "fsdp_copy_bytes",
    "fsdp_edge_params",
    "fsdp_edge_units",
    "fsdp_units",
    "group_bus_bandwidth",
    "wire_bytes",
]
