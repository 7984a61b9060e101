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

from autopar.cost_models.cluster import Cluster

from autopar._compat import StrEnum

RING_BASE_LATENCY_S = 3.6e-6
"""Fixed cost of one ring collective: NCCL tuning.cc ``baseLat[RING][LL]`` = 3.6 µs."""
TREE_BASE_LATENCY_S = 4.4e-6
"""Fixed cost of one tree all-reduce: NCCL tuning.cc ``baseLat[TREE][LL]`` = 4.4 µs."""
TREE_BANDWIDTH_FACTOR = 0.9
"""Trees reach 0.9 of the ring's bus bandwidth: tuning.cc ``if (a == NCCL_ALGO_TREE) busBw = busBw*.9``."""


class Collective(StrEnum):
    """Collective operations the planner issues."""

    ALL_REDUCE = "all_reduce"
    ALL_GATHER = "all_gather"
    REDUCE_SCATTER = "reduce_scatter"
    ALL_TO_ALL = "all_to_all"
    BROADCAST = "broadcast"
    SEND_RECV = "p2p"


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


def estimate_exposed_comm_time(comm_s: float, overlappable_compute_s: float, *, overlap: bool,
                               num_buckets: int = 1) -> float:
    """Communication time left on the critical path when it may overlap with compute.

    Gradient reduction in DDP/FSDP is bucketed and each bucket is reduced while the
    backward pass computes earlier layers' gradients (Li et al. 2020, "PyTorch
    Distributed", VLDB §3.2.3). With overlap, what remains exposed is the excess of
    communication over the compute it hides behind, and at least the last bucket,
    which can only start after the backward pass ends. Without overlap, all of it.

    Args:
        comm_s: total communication time of the reduction.
        overlappable_compute_s: compute running concurrently (the backward pass).
        overlap: whether overlap is modelled (a plan option, not an assumption).
        num_buckets: gradient buckets; 1 means the reduction starts after backward.

    Example:
        >>> estimate_exposed_comm_time(0.4, 1.0, overlap=True, num_buckets=4)
        0.1
        >>> estimate_exposed_comm_time(0.4, 1.0, overlap=False)
        0.4
    """
    if comm_s < 0 or overlappable_compute_s < 0 or num_buckets < 1:
        raise ValueError(f"bad overlap inputs: comm_s={comm_s}, compute_s={overlappable_compute_s}, "
                         f"num_buckets={num_buckets}")
    if not overlap:
        return comm_s
    return max(comm_s - overlappable_compute_s, comm_s / num_buckets)


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
    "estimate_exposed_comm_time",
    "group_bus_bandwidth",
    "wire_bytes",
]
