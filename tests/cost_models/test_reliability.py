"""The reliability model against its closed forms (Young/Daly, availability optimum, loss per failure)."""

from __future__ import annotations

import math

import pytest

from autopar.cost_models.cluster import Cluster
from autopar.cost_models.memory import estimate_model_state_bytes
from autopar.cost_models.reliability import (
    CheckpointMode,
    CheckpointSize,
    ReliabilitySpec,
    availability,
    availability_optimal_interval_s,
    build_reliability_spec,
    estimate_checkpoint_size,
    estimate_checkpoint_times,
    estimate_goodput,
    expected_loss_per_failure_s,
    job_mtbf_s,
    young_daly_interval_s,
)
from autopar.errors import ClusterSpecError


@pytest.mark.parametrize(("c", "m"), [(10.0, 3600.0), (60.0, 11_134.0), (1.5, 1e6)])
def test_young_daly_is_sqrt_2cm(c: float, m: float) -> None:
    assert young_daly_interval_s(c, m) == pytest.approx(math.sqrt(2 * c * m), rel=1e-12)
    assert young_daly_interval_s(4 * c, m) == pytest.approx(2 * young_daly_interval_s(c, m), rel=1e-12)


def _argmax(f, lo: float, hi: float) -> float:
    """Golden-section search for the maximum of a unimodal f on [lo, hi]."""
    g = (math.sqrt(5) - 1) / 2
    a, b = lo, hi
    for _ in range(200):
        c, d = b - g * (b - a), a + g * (b - a)
        if f(c) > f(d):
            b = d
        else:
            a = c
    return (a + b) / 2


@pytest.mark.parametrize(("ts", "tf", "tr", "w"), [(20.0, 11_134.0, 600.0, 0.0), (5.0, 3600.0, 120.0, 40.0),
                                                   (300.0, 50_000.0, 1800.0, 300.0)])
def test_availability_optimum_is_the_closed_form(ts: float, tf: float, tr: float, w: float) -> None:
    def a(tau: float) -> float:
        return availability(tau, stall_s=ts, mtbf_s=tf, restart_s=tr, checkpoint_s=w)

    numeric = _argmax(a, ts * 1.0001, 20 * tf)
    closed = availability_optimal_interval_s(ts, tf, tr + w)
    assert closed == pytest.approx(ts + math.sqrt(2 * (tf + tr + w) * ts + ts * ts), rel=1e-12)
    assert numeric == pytest.approx(closed, rel=1e-6)


def test_availability_optimum_tends_to_young_daly_for_cheap_checkpoints() -> None:
    tf = 10_000.0
    for ts, tol in ((1.0, 0.02), (0.01, 0.002)):
        assert availability_optimal_interval_s(ts, tf, 0.0) / young_daly_interval_s(ts, tf) == pytest.approx(1, abs=tol)


def test_loss_per_failure_is_restart_plus_half_interval_plus_checkpoint() -> None:
    assert expected_loss_per_failure_s(1000.0, restart_s=600.0, checkpoint_s=30.0) == 600.0 + 500.0 + 30.0
    # derive it: a failure uniform in [0, τ) after a checkpoint start loses t, or t + τ if the
    # checkpoint was not yet durable (t < W); integrate numerically
    tau, w, n = 1000.0, 30.0, 200_000
    mean_rework = sum((t + tau if t < w else t) for t in ((i + 0.5) * tau / n for i in range(n))) / n
    assert expected_loss_per_failure_s(tau, restart_s=0.0, checkpoint_s=w) == pytest.approx(mean_rework, rel=1e-6)


def test_job_mtbf_reproduces_llama3_report() -> None:
    # 419 unexpected interruptions in 54 days on 16,384 GPUs: one every 1,296 h / 419
    assert job_mtbf_s(ReliabilitySpec(), num_gpus=16384, gpus_per_node=8) / 3600 == pytest.approx(1296 / 419,
                                                                                                   rel=2e-3)
    half = job_mtbf_s(ReliabilitySpec(), num_gpus=8192, gpus_per_node=8)
    assert half == pytest.approx(2 * job_mtbf_s(ReliabilitySpec(), num_gpus=16384, gpus_per_node=8))


def _size(zero: int, dp: int = 8, tp: int = 8, pp: int = 4, params: int = 70_000_000_000) -> CheckpointSize:
    per_gpu = params // (tp * pp)
    states = estimate_model_state_bytes(per_gpu, zero_stage=zero, dp=dp)
    return estimate_checkpoint_size(params_bytes=[states.params] * pp, optimizer_bytes=[states.optimizer] * pp,
                                    dp=dp, tp=tp, zero_stage=zero)


def test_checkpoint_size_is_the_unique_state_under_every_zero_stage() -> None:
    unique = 70_000_000_000 * (2 + 12)  # bf16 weights + fp32 master and Adam moments
    for zero in (0, 1, 2, 3):
        size = _size(zero)
        assert size.total_bytes == pytest.approx(unique, rel=1e-6)
    assert _size(0).held_bytes_per_rank[0] == 8 * _size(3).held_bytes_per_rank[0]  # replicated over dp = 8
    assert _size(0).read_bytes == pytest.approx(8 * unique, rel=1e-6)  # every replica reads its copy
    assert _size(3).read_bytes == pytest.approx(unique, rel=1e-6)


def test_checkpoint_times_take_the_slower_of_node_link_and_storage() -> None:
    spec = ReliabilitySpec(storage_write_bytes_per_s=1e12, node_storage_write_bytes_per_s=1e9)
    size = _size(3)
    t = estimate_checkpoint_times(size, spec, gpus_per_node=8, host_mem_bytes=2**41)
    node_bytes = 8 * max(size.written_bytes_per_rank)
    assert t.save_sync_s == pytest.approx(max(node_bytes / 1e9, size.total_bytes / 1e12))
    assert t.save_async_s == pytest.approx(t.async_stall_s + t.save_sync_s)
    small_host = estimate_checkpoint_times(size, spec, gpus_per_node=8, host_mem_bytes=node_bytes // 2)
    assert not small_host.async_fits


def _goodput(spec: ReliabilitySpec, *, host_mem_bytes: int = 2**41):
    size = _size(1)
    times = estimate_checkpoint_times(size, spec, gpus_per_node=8, host_mem_bytes=host_mem_bytes)
    return estimate_goodput(size, times, spec, num_gpus=256, gpus_per_node=8, step_time_s=7.0, tokens_per_s=1e6)


def test_goodput_is_monotone_in_mtbf() -> None:
    fractions = [_goodput(ReliabilitySpec(gpu_mtbf_hours=h, node_mtbf_hours=h / 5)).goodput_fraction
                 for h in (100.0, 1_000.0, 10_000.0, 100_000.0, 1e6)]
    assert all(a < b for a, b in zip(fractions, fractions[1:]))
    assert 0 < fractions[0] and fractions[-1] < 1


def test_goodput_interval_is_the_closed_form_in_whole_steps() -> None:
    spec = ReliabilitySpec(gpu_mtbf_hours=2_000.0)
    est = _goodput(spec, host_mem_bytes=1)  # async cannot stage: synchronous saves
    assert est.mode is CheckpointMode.SYNC
    closed = availability_optimal_interval_s(est.save_sync_s, est.mtbf_s, spec.restart_s + est.load_s
                                             + est.save_sync_s)
    assert abs(est.interval_s - closed) <= 7.0
    assert est.interval_s == est.interval_steps * 7.0
    assert est.loss_per_failure_s == pytest.approx(spec.restart_s + est.load_s + est.interval_s / 2 + est.save_sync_s)
    assert est.goodput_tokens_per_s == pytest.approx(1e6 * est.goodput_fraction)
    async_est = _goodput(spec)
    assert async_est.mode is CheckpointMode.ASYNC and async_est.goodput_fraction > est.goodput_fraction


def test_cluster_files_set_reliability() -> None:
    base = Cluster.preset("dgx-h100", nodes=2)
    assert base.reliability.host_link_bytes_per_s == 64e9
    custom = Cluster.from_dict({"preset": "dgx-h100", "reliability": {"gpu_mtbf_hours": 1000,
                                                                      "restart_s": "90 s"}})
    assert custom.reliability.gpu_mtbf_hours == 1000 and custom.reliability.restart_s == 90.0
    assert custom.reliability.host_link_bytes_per_s == 64e9  # merged with the preset's section
    with pytest.raises(ClusterSpecError, match="reliability.mtbf"):
        build_reliability_spec({"mtbf": 5})
    with pytest.raises(ClusterSpecError, match="positive"):
        build_reliability_spec({"restart_s": 0})
