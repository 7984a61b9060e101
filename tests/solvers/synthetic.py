"""Closed-form prices for search tests: transformer-like layers in a ``LayerCostTable`` on a made-up cluster.

The layer rows are closed forms; the per-layout formulas (model states, collectives, the optimizer
step, buffers) are the cost models' own, on a cluster with these GPUs and links.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType

from autopar.cost_models.cluster import Cluster, GPUSpec, LinkKind, LinkSpec
from autopar.plan import Recompute
from autopar.solvers.costs import Formulas, LayerCost, LayerCostTable, LayerSetting, PriceTable
from autopar.solvers.space import SearchSpace


@dataclass(frozen=True)
class SyntheticPricing:
    """L blocks of hidden h (plus embedding and head layers) on GPUs of ``mem`` bytes."""

    blocks: int = 8
    hidden: int = 1024
    seq: int = 1024
    vocab: int = 32000
    mem: float = 16e9
    peak: float = 100e12
    intra_bw: float = 100e9
    inter_bw: float = 10e9
    latency: float = 5e-6

    @property
    def num_layers(self) -> int:
        return self.blocks + 2

    @property
    def gpu_mem_bytes(self) -> int:
        return int(self.mem)

    def cluster(self, nodes: int = 64) -> Cluster:
        """8-GPU nodes of these GPUs (28 optimizer bytes per parameter at 0.875 TB/s: 32 ps per parameter)."""
        gpu = GPUSpec(name="synthetic", peak_flops_per_s=MappingProxyType({"bfloat16": self.peak}),
                      mem_bytes=int(self.mem), mem_bytes_per_s=0.875e12, matmul_efficiency=1.0,
                      memory_efficiency=1.0, kernel_launch_s=1e-6, half_efficiency_s=1e-6)
        return Cluster(name="synthetic", gpu=gpu, gpus_per_node=8, nodes=nodes, host_mem_bytes=2**40,
                       intra_node=LinkSpec(kind=LinkKind.NVLINK, bytes_per_s=self.intra_bw, latency_s=self.latency,
                                           efficiency=1.0),
                       inter_node=LinkSpec(kind=LinkKind.INFINIBAND, bytes_per_s=self.inter_bw,
                                           latency_s=self.latency, efficiency=1.0))

    def prices(self, space: SearchSpace) -> PriceTable:
        """Every setting of ``space`` under every policy, priced."""
        rows = {LayerSetting(tp, sp, mbs, rc): self.layer_costs(tp=tp, sequence_parallel=sp, micro_batch_size=mbs,
                                                                 recompute=rc)
                for tp in space.tp for sp in space.sequence_parallel for mbs in space.micro_batch_size
                for rc in Recompute}
        return PriceTable(layers=LayerCostTable.of(self.num_layers, rows), cluster=self.cluster(), dtype="bfloat16")

    def formulas(self) -> Formulas:
        return Formulas(self.cluster(), "bfloat16")

    def _all_reduce_s(self, nbytes: float, group_size: int) -> float:
        return self.latency + 2 * (group_size - 1) / group_size * nbytes / self.intra_bw

    def layer_costs(self, *, tp: int, sequence_parallel: bool, micro_batch_size: int,
                    recompute: Recompute) -> tuple[LayerCost, ...]:
        h, s, b = self.hidden, self.seq, micro_batch_size
        block_flops = 24 * b * s * h * h + 4 * b * s * s * h
        comm = 4 * self._all_reduce_s(2 * b * s * h, tp) if tp > 1 else 0
        act = s * b * h * (34 / tp if sequence_parallel else 10 + 24 / tp)
        extra = {Recompute.NONE: 0.0, Recompute.SELECTIVE: 0.1, Recompute.FULL: 1.0}[recompute]
        if recompute is Recompute.FULL:
            act = 2 * s * b * h
        elif recompute is Recompute.SELECTIVE:
            act *= 0.8
        fwd = block_flops / tp / self.peak
        block = LayerCost(forward_s=fwd + comm / 2, backward_s=(2 + extra) * fwd + comm / 2,
                          forward_flops=block_flops, recompute_flops=extra * block_flops, activation_bytes=act,
                          param_count=12 * h * h / tp, boundary_bytes=2 * b * s * h,
                          tp_comm_s=float(comm))
        head_flops = 2 * b * s * h * self.vocab
        edge = LayerCost(forward_s=head_flops / tp / self.peak, backward_s=2 * head_flops / tp / self.peak,
                         forward_flops=head_flops, recompute_flops=0.0, activation_bytes=2 * b * s * h,
                         param_count=h * self.vocab / tp, boundary_bytes=2 * b * s * h)
        return (edge,) + (block,) * self.blocks + (edge,)
