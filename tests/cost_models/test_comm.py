"""Collective costs: NCCL bus-bandwidth conventions, hierarchy, latency, ring vs tree."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autopar.cost_models.cluster import Cluster
from autopar.cost_models.comm import (
    RING_BASE_LATENCY_S,
    TREE_BANDWIDTH_FACTOR,
    Collective,
    bus_bandwidth_factor,
    estimate_collective_time,
    estimate_exposed_dp_comm,
    group_bus_bandwidth,
    wire_bytes,
)

GB = 1e9
A100 = Cluster.preset("dgx-a100-80gb", nodes=16)
H100 = Cluster.preset("dgx-h100", nodes=16)


@pytest.mark.parametrize("n", [2, 4, 8, 64])
def test_ring_all_reduce_puts_2_n_minus_1_over_n_of_the_buffer_on_the_wire(n: int) -> None:
    size = 1 << 30
    assert wire_bytes(Collective.ALL_REDUCE, size, n) == pytest.approx(2 * (n - 1) / n * size)
    assert wire_bytes(Collective.ALL_GATHER, size, n) == pytest.approx((n - 1) / n * size)
    assert wire_bytes(Collective.REDUCE_SCATTER, size, n) == pytest.approx((n - 1) / n * size)
    assert wire_bytes(Collective.ALL_TO_ALL, size, n) == pytest.approx((n - 1) / n * size)
    assert bus_bandwidth_factor(Collective.BROADCAST, n) == 1.0
    assert wire_bytes(Collective.ALL_REDUCE, size, 1) == 0.0


def test_large_all_reduce_inside_a_node_runs_at_nvlink_bus_bandwidth() -> None:
    n, size = 8, 4 << 30
    t = estimate_collective_time(Collective.ALL_REDUCE, size, n, cluster=H100, algorithm="ring")
    nvlink = H100.intra_node.bytes_per_s * H100.intra_node.efficiency
    latency = RING_BASE_LATENCY_S + 2 * (n - 1) * H100.intra_node.latency_s
    assert t == pytest.approx(latency + 2 * (n - 1) / n * size / nvlink, rel=1e-12)
    busbw = 2 * (n - 1) / n * size / t  # as nccl-tests reports it
    assert busbw == pytest.approx(nvlink, rel=1e-3)


def test_group_inside_a_node_is_priced_on_nvlink_and_across_nodes_on_the_fabric() -> None:
    size = 1 << 30
    inside = estimate_collective_time(Collective.ALL_REDUCE, size, 8, cluster=A100, nodes_spanned=1)
    across = estimate_collective_time(Collective.ALL_REDUCE, size, 8, cluster=A100, nodes_spanned=8)
    nvlink = A100.intra_node.bytes_per_s * A100.intra_node.efficiency
    fabric = A100.inter_node.bytes_per_s * A100.inter_node.efficiency
    assert group_bus_bandwidth(A100, 8, 1) == pytest.approx(nvlink)
    assert group_bus_bandwidth(A100, 8, 8) == pytest.approx(fabric)  # one rank per node: its NIC share
    assert across / inside == pytest.approx(nvlink / fabric, rel=0.01)


def test_a_group_spanning_nodes_is_bounded_by_its_slowest_link() -> None:
    # 16 ranks on 2 nodes: the node-crossing traffic uses all 8 GPUs' NIC shares (8 x 23 GB/s < 234 GB/s NVLink)
    nic = A100.inter_node.bytes_per_s * A100.inter_node.efficiency
    assert group_bus_bandwidth(A100, 16, 2) == pytest.approx(8 * nic)
    # 2 ranks per node on a fast fabric with a slow PCIe link: PCIe bounds it
    l40s = Cluster.preset("l40s-pcie", nodes=4)
    assert group_bus_bandwidth(l40s, 8, 4) == pytest.approx(
        min(l40s.intra_node.bytes_per_s * l40s.intra_node.efficiency,
            2 * l40s.inter_node.bytes_per_s * l40s.inter_node.efficiency))
    # on p3.16xlarge-like nodes the node's 25 Gb/s network (shared by its 8 GPUs) bounds a 2-node all-reduce
    v100 = Cluster.preset("v100-p3", nodes=2)
    ratio = (estimate_collective_time(Collective.ALL_REDUCE, 1 << 28, 16, cluster=v100, nodes_spanned=2)
             / estimate_collective_time(Collective.ALL_REDUCE, 1 << 28, 8, cluster=v100))
    nvlink = v100.intra_node.bytes_per_s * v100.intra_node.efficiency
    node_nic = 8 * v100.inter_node.bytes_per_s * v100.inter_node.efficiency
    assert ratio == pytest.approx(nvlink / node_nic * (2 * 15 / 16) / (2 * 7 / 8), rel=0.02)
    assert ratio > 30


def test_latency_dominates_tiny_messages() -> None:
    n = 8
    tiny = estimate_collective_time(Collective.ALL_REDUCE, 8, n, cluster=H100, algorithm="ring")
    latency = RING_BASE_LATENCY_S + 2 * (n - 1) * H100.intra_node.latency_s
    assert tiny == pytest.approx(latency, rel=1e-4)
    assert estimate_collective_time(Collective.ALL_REDUCE, 8 << 10, n, cluster=H100, algorithm="ring") < 1.01 * tiny
    # more ranks, more steps: ring latency grows linearly with the group
    big = estimate_collective_time(Collective.ALL_REDUCE, 8, 128, cluster=H100, nodes_spanned=16, algorithm="ring")
    assert big > 10 * tiny


def test_tree_beats_ring_on_small_messages_and_loses_on_large_ones() -> None:
    kw = dict(cluster=A100, nodes_spanned=16)
    small, large = 4 << 10, 1 << 30
    ring_small = estimate_collective_time(Collective.ALL_REDUCE, small, 128, algorithm="ring", **kw)
    tree_small = estimate_collective_time(Collective.ALL_REDUCE, small, 128, algorithm="tree", **kw)
    ring_large = estimate_collective_time(Collective.ALL_REDUCE, large, 128, algorithm="ring", **kw)
    tree_large = estimate_collective_time(Collective.ALL_REDUCE, large, 128, algorithm="tree", **kw)
    assert tree_small < ring_small and ring_large < tree_large
    # the crossover: bisect the size where they are equal; auto takes the faster side on each side
    lo, hi = small, large
    for _ in range(60):
        mid = (lo + hi) / 2
        ring = estimate_collective_time(Collective.ALL_REDUCE, mid, 128, algorithm="ring", **kw)
        tree = estimate_collective_time(Collective.ALL_REDUCE, mid, 128, algorithm="tree", **kw)
        lo, hi = (mid, hi) if tree < ring else (lo, mid)
    assert small < lo < large
    for size, faster in ((lo / 4, "tree"), (hi * 4, "ring")):
        auto = estimate_collective_time(Collective.ALL_REDUCE, size, 128, algorithm="auto", **kw)
        assert auto == estimate_collective_time(Collective.ALL_REDUCE, size, 128, algorithm=faster, **kw)
    # bandwidth term of the tree: 2·S / (0.9 · busbw)
    bus = group_bus_bandwidth(A100, 128, 16)
    assert tree_large == pytest.approx(2 * large / (TREE_BANDWIDTH_FACTOR * bus), rel=5e-3)


def test_all_gather_and_reduce_scatter_cost_half_an_all_reduce_on_large_buffers() -> None:
    size = 8 << 30
    ar = estimate_collective_time(Collective.ALL_REDUCE, size, 8, cluster=H100)
    ag = estimate_collective_time(Collective.ALL_GATHER, size, 8, cluster=H100)
    rs = estimate_collective_time(Collective.REDUCE_SCATTER, size, 8, cluster=H100)
    assert ag == rs == pytest.approx(ar / 2, rel=1e-3)


def test_broadcast_p2p_and_all_to_all() -> None:
    size = 1 << 30
    nvlink = H100.intra_node.bytes_per_s * H100.intra_node.efficiency
    fabric = H100.inter_node.bytes_per_s * H100.inter_node.efficiency
    broadcast = estimate_collective_time(Collective.BROADCAST, size, 8, cluster=H100)
    assert broadcast == pytest.approx(size / nvlink, rel=5e-3)
    assert estimate_collective_time(Collective.SEND_RECV, size, 2, cluster=H100) == pytest.approx(size / nvlink, 5e-3)
    assert estimate_collective_time(Collective.SEND_RECV, size, 2, cluster=H100, nodes_spanned=2) == pytest.approx(
        size / fabric, rel=1e-3)
    # all-to-all over 16 ranks on 2 nodes: half of each rank's data leaves the node through its NIC share
    a2a = estimate_collective_time(Collective.ALL_TO_ALL, size, 16, cluster=H100, nodes_spanned=2)
    assert a2a == pytest.approx(size * 8 / 16 / fabric, rel=5e-3)


def test_degenerate_and_invalid_groups() -> None:
    assert estimate_collective_time(Collective.ALL_REDUCE, 1 << 20, 1, cluster=H100) == 0.0
    assert estimate_collective_time(Collective.ALL_REDUCE, 0, 8, cluster=H100) == 0.0
    with pytest.raises(ValueError, match="only as a ring"):
        estimate_collective_time(Collective.ALL_GATHER, 1 << 20, 8, cluster=H100, algorithm="tree")
    with pytest.raises(ValueError, match="2 ranks"):
        estimate_collective_time(Collective.SEND_RECV, 1 << 20, 4, cluster=H100)
    with pytest.raises(ValueError, match="on a node of 8"):
        estimate_collective_time(Collective.ALL_REDUCE, 1 << 20, 16, cluster=H100, nodes_spanned=1)
    with pytest.raises(ValueError, match="cluster"):
        estimate_collective_time(Collective.ALL_REDUCE, 1 << 20, 64, cluster=H100.with_nodes(2), nodes_spanned=8)
    with pytest.raises(ValueError, match="nbytes"):
        estimate_collective_time(Collective.ALL_REDUCE, -1, 8, cluster=H100)
    with pytest.raises(ValueError):
        estimate_collective_time("gather", 1, 8, cluster=H100)  # type: ignore[arg-type]


def test_exposed_dp_comm_closed_forms() -> None:
    kw = dict(num_micro_batches=4, grad_reduce_s=0.5, param_gather_s=0.3, rank_compute_s=2.4, last_backward_s=0.2)
    zero0 = estimate_exposed_dp_comm(zero_stage=0, overlap=True, **kw)
    assert zero0.dp_all_reduce_s == pytest.approx(0.3) and zero0.dp_all_gather_s == 0.0  # 0.5 − last backward
    assert estimate_exposed_dp_comm(zero_stage=0, overlap=False, **kw).dp_all_reduce_s == 0.5
    zero1 = estimate_exposed_dp_comm(zero_stage=1, overlap=True, **kw)
    # reduce-scatter hides behind the last backward; the gather behind a third of one micro-batch (2.4/4/3 = 0.2)
    assert (zero1.dp_reduce_scatter_s, zero1.dp_all_gather_s) == (pytest.approx(0.3), pytest.approx(0.1))
    assert zero1.dp_all_reduce_s == 0.0 and zero1.dp_s == pytest.approx(0.4)
    zero3 = estimate_exposed_dp_comm(zero_stage=3, overlap=True, **kw)
    assert zero3.dp_all_gather_s == pytest.approx(0.0)  # 2 · 0.3 per micro-batch hides behind 0.6 of compute
    slow = estimate_exposed_dp_comm(zero_stage=3, overlap=True, **{**kw, "param_gather_s": 0.5})
    assert slow.dp_all_gather_s == pytest.approx(4 * (1.0 - 0.6))
    assert estimate_exposed_dp_comm(zero_stage=3, overlap=False, **kw).dp_all_gather_s == pytest.approx(4 * 0.6)
    with pytest.raises(ValueError):
        estimate_exposed_dp_comm(zero_stage=4, overlap=True, **kw)


@settings(max_examples=60, deadline=None)
@given(kind=st.sampled_from([Collective.ALL_REDUCE, Collective.ALL_GATHER, Collective.REDUCE_SCATTER,
                             Collective.BROADCAST, Collective.ALL_TO_ALL]),
       nbytes=st.integers(min_value=1, max_value=1 << 34), extra=st.integers(min_value=1, max_value=1 << 30),
       nodes=st.sampled_from([1, 2, 4, 16]))
def test_time_grows_with_the_buffer(kind: Collective, nbytes: int, extra: int, nodes: int) -> None:
    n = 8 * nodes
    t1 = estimate_collective_time(kind, nbytes, n, cluster=A100, nodes_spanned=nodes)
    t2 = estimate_collective_time(kind, nbytes + extra, n, cluster=A100, nodes_spanned=nodes)
    assert 0 < t1 < t2


def test_fsdp2_copy_kernels_move_copy_out_and_reduce_copy_in_bytes() -> None:
    from autopar.cost_models.comm import fsdp_copy_bytes

    # Llama 3 8B on one rank's compute stream, reshard after forward (2 gathers), bf16 params and grads,
    # fp32 reduce: copy-out 2 × (read 2 + write 2), copy-in (read 2 + write 4) = 8 + 6 B per parameter
    out, into = fsdp_copy_bytes(8.03e9, gathers_per_step=2)
    assert (out, into) == (pytest.approx(8.03e9 * 8), pytest.approx(8.03e9 * 6))
    # no reshard after forward (torchtitan under PP): one gather; fp32 grads reduced in fp32: 8, 8
    assert fsdp_copy_bytes(100, gathers_per_step=1, param_bytes=4, grad_bytes=4, reduce_bytes=4) == (800.0, 800.0)


def test_fsdp_copy_time_is_its_bytes_at_the_achievable_bandwidth() -> None:
    from autopar.cost_models.comm import estimate_fsdp_copy_time

    gpu = H100.gpu
    out_s, in_s = estimate_fsdp_copy_time(1e9, gpu, gathers_per_step=4, param_bytes=2, reduce_bytes=4)
    assert out_s == pytest.approx(16e9 / gpu.achievable_mem_bytes_per_s)  # 4 × (2 + 2) B
    assert in_s == pytest.approx(6e9 / gpu.achievable_mem_bytes_per_s)  # gradients at the params' width + fp32
    assert estimate_fsdp_copy_time(0, gpu, gathers_per_step=2, param_bytes=2, reduce_bytes=4) == (0.0, 0.0)


def test_fsdp_edges_are_the_root_and_the_first_block() -> None:
    from autopar.cost_models.comm import fsdp_edge_params

    # embedding 5, blocks of 2, head 6: root (5 + 6) + first block
    assert fsdp_edge_params([5.0, 2.0, 2.0, 6.0], [False, True, True, False]) == 13.0
    assert fsdp_edge_params([2.0, 3.0], [True, True]) == 2.0  # a middle stage: its first block, no root
    assert fsdp_edge_params([7.0], [False]) == 7.0  # one unit: all of it
    with pytest.raises(ValueError):
        fsdp_edge_params([1.0], [])


def test_exposed_dp_comm_is_at_least_its_edges_and_adds_the_copies() -> None:
    kw = dict(num_micro_batches=4, grad_reduce_s=0.5, param_gather_s=0.3, rank_compute_s=2.4, last_backward_s=0.6,
              overlap=True)
    hidden = estimate_exposed_dp_comm(zero_stage=3, **kw)
    assert hidden.dp_s == 0.0  # everything hides behind compute without edges
    edged = estimate_exposed_dp_comm(zero_stage=3, edge_gather_s=0.05, edge_reduce_s=0.07, **kw)
    # the first units' gather before each of the 4 forwards; the last units' reduce once
    assert (edged.dp_all_gather_s, edged.dp_reduce_scatter_s) == (pytest.approx(0.2), pytest.approx(0.07))
    zero1 = estimate_exposed_dp_comm(zero_stage=1, edge_gather_s=0.05, edge_reduce_s=0.07, **kw)
    assert (zero1.dp_all_gather_s, zero1.dp_reduce_scatter_s) == (pytest.approx(0.1), pytest.approx(0.07))
    # a larger exposed excess already contains the edge: not added twice
    slow = estimate_exposed_dp_comm(zero_stage=3, edge_gather_s=0.05, **{**kw, "param_gather_s": 0.5})
    assert slow.dp_all_gather_s == pytest.approx(4 * (1.0 - 0.6))
    copies = estimate_exposed_dp_comm(zero_stage=3, copy_out_s=0.01, copy_in_s=0.02, **kw)
    assert (copies.dp_all_gather_s, copies.dp_reduce_scatter_s) == (0.01, 0.02)
    zero0 = estimate_exposed_dp_comm(zero_stage=0, copy_in_s=0.02, **{**kw, "overlap": False})
    assert zero0.dp_all_reduce_s == pytest.approx(0.52)
