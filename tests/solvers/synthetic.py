"""A closed-form ``Pricing`` for search tests: transformer-like layers, alpha-beta links, ZeRO states."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from autopar.plan import Recompute, ShardingPlan
from autopar.solvers.costs import LayerCost


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

    @property
    def peak_flops_per_s(self) -> float:
        return self.peak

    @lru_cache(maxsize=None)
    def layer_costs(self, *, tp: int, sequence_parallel: bool, micro_batch_size: int,
                    recompute: Recompute) -> tuple[LayerCost, ...]:
        h, s, b = self.hidden, self.seq, micro_batch_size
        block_flops = 24 * b * s * h * h + 4 * b * s * s * h
        comm = 4 * self.collective_time("all_reduce", 2 * b * s * h, group_size=tp, nodes_spanned=1) if tp > 1 else 0
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

    def model_state_bytes(self, num_params: float, *, zero_stage: int, dp: int) -> tuple[float, float, float]:
        p, g, o = 2 * num_params, 2 * num_params, 12 * num_params
        return (p / dp if zero_stage >= 3 else p, g / dp if zero_stage >= 2 else g, o / dp if zero_stage >= 1 else o)

    def collective_time(self, kind: str, nbytes: float, *, group_size: int, nodes_spanned: int) -> float:
        bw = self.inter_bw if nodes_spanned > 1 else self.intra_bw
        n = group_size
        factor = {"all_reduce": 2 * (n - 1) / n, "all_gather": (n - 1) / n, "reduce_scatter": (n - 1) / n,
                  "p2p": 1.0}[kind]
        return self.latency + factor * nbytes / bw

    def optimizer_step_time(self, num_params: float) -> float:
        return 32 * num_params / 1e12

    def optimizer_temp_bytes(self, num_params: float) -> float:
        return 4 * num_params

    def fsdp_copy_time(self, num_params: float, *, gathers_per_step: int) -> tuple[float, float]:
        return 4 * gathers_per_step * num_params / 1e12, 6 * num_params / 1e12

    def buffer_bytes(self, *, largest_layer_params: float, zero_stage: int, dp: int) -> float:
        return 0.5e9

    def grad_bytes_per_param(self) -> float:
        return 4.0

    def param_bytes_per_param(self) -> float:
        return 2.0

    def sharding_plans(self, *, tp: int, sequence_parallel: bool) -> dict[str, ShardingPlan]:
        return {}
