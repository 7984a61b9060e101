"""The local-cluster measurement's arithmetic: alpha-beta fits, the link fit, the YAML round trip."""

from __future__ import annotations

from pathlib import Path

import pytest

from autopar.cost_models.cluster import DTENSOR_HOST_FIELDS, HOST_FIELDS, Cluster
from autopar.cost_models.comm import RING_BASE_LATENCY_S, Collective, estimate_collective_time
from autopar.cost_models.profiling.local_cluster import (
    AlphaBetaFit,
    LocalClusterProfile,
    RankCompute,
    cluster_yaml,
    fit_alpha_beta,
    fit_link,
)

SIZES = (4096, 65536, 2**20, 2**22)


def _fit(kind: Collective, n: int, latency: float, bw: float) -> AlphaBetaFit:
    """Samples made by comm.py's own ring formula on a link of (latency, bw)."""
    steps = 1 if kind is Collective.SEND_RECV else (2 * (n - 1) if kind is Collective.ALL_REDUCE else n - 1)
    factor = {Collective.ALL_REDUCE: 2 * (n - 1) / n, Collective.SEND_RECV: 1.0}.get(kind, (n - 1) / n)
    samples = tuple((s, RING_BASE_LATENCY_S + steps * latency + factor * s / bw) for s in SIZES)
    alpha, beta = fit_alpha_beta(samples)
    return AlphaBetaFit(kind=kind, group_size=n, alpha_s=alpha, beta_s_per_byte=beta, samples=samples)


def test_alpha_beta_fit_recovers_a_line_and_clamps_a_negative_intercept():
    alpha, beta = fit_alpha_beta([(s, 5e-5 + s * 2e-9) for s in SIZES])
    assert alpha == pytest.approx(5e-5, rel=1e-6) and beta == pytest.approx(2e-9, rel=1e-6)
    alpha, beta = fit_alpha_beta([(1000, 1e-6), (2000, 3e-6)])  # the line crosses below 0
    assert alpha == 0.0 and beta > 0
    with pytest.raises(ValueError):
        fit_alpha_beta([(1000, 1e-6)])


def test_link_fit_recovers_the_link_that_made_the_samples():
    latency, bw = 40e-6, 2e9
    fits = [_fit(k, n, latency, bw) for k in (Collective.ALL_REDUCE, Collective.ALL_GATHER) for n in (2, 4)]
    fits.append(_fit(Collective.SEND_RECV, 2, latency, bw))
    got_latency, got_bw = fit_link(fits)
    assert got_latency == pytest.approx(latency, rel=1e-6) and got_bw == pytest.approx(bw, rel=1e-6)


def test_cluster_yaml_round_trips_through_the_planner_reader(tmp_path: Path):
    latency, bw = 40e-6, 2e9
    fits = tuple(_fit(k, n, latency, bw) for k in (Collective.ALL_REDUCE, Collective.REDUCE_SCATTER) for n in (2, 4))
    profile = LocalClusterProfile(
        device_name='cpu:Some "CPU" @ 2GHz:1threads', ranks=4,
        compute=RankCompute(gemm_flops_per_s=3e10, copy_bytes_per_s=5e9, op_floor_s=4e-6, half_efficiency_s=1e-6,
                            dtensor_op_s=9e-5, dtensor_backward_op_s=1.5e-4, dtensor_collective_s=6e-4,
                            dtensor_hook_s=1.2e-4, dtensor_hook_backward_s=2.5e-4, fsdp_unit_s=4e-4),
        collectives=fits, host_mem_bytes=16 * 2**30, host_cores=2)
    path = tmp_path / "here.yaml"
    path.write_text(cluster_yaml(profile, name="here"))
    cluster = Cluster.from_yaml(path)
    assert cluster.name == "here" and cluster.num_gpus == 4 and cluster.gpu.name == profile.device_name
    assert cluster.gpu.peak_flops("float32") == pytest.approx(3e10, rel=1e-5)
    assert cluster.gpu.mem_bytes == 4 * 2**30
    assert tuple(getattr(cluster.gpu, name) for name in DTENSOR_HOST_FIELDS) == pytest.approx(
        (9e-5, 1.5e-4, 6e-4, 1.2e-4, 2.5e-4), rel=1e-5)
    assert cluster.gpu.fsdp_unit_s == pytest.approx(4e-4, rel=1e-5)
    assert not cluster.gpu.grad_reduce_overlaps  # a CPU rank's gradient reduce blocks its backward
    assert cluster.host_cores == 2  # four ranks on two cores take turns
    # the planner's collective model, on the written link, reproduces the measured samples
    for fit in fits:
        for nbytes, seconds in fit.samples:
            got = estimate_collective_time(fit.kind, nbytes, fit.group_size, cluster=cluster, algorithm="ring")
            assert got == pytest.approx(seconds, rel=1e-4)


def test_measured_fits_in_the_yaml_replace_the_link_for_their_kind(tmp_path: Path):
    fits = (_fit(Collective.ALL_REDUCE, 2, 40e-6, 2e9),
            AlphaBetaFit(kind=Collective.ALL_GATHER, group_size=2, alpha_s=7e-4, beta_s_per_byte=3e-9,
                         samples=((4096, 7e-4 + 4096 * 3e-9), (2**20, 7e-4 + 2**20 * 3e-9))))
    profile = LocalClusterProfile(
        device_name="cpu:x:1threads", ranks=2,
        compute=RankCompute(gemm_flops_per_s=3e10, copy_bytes_per_s=5e9, op_floor_s=4e-6, half_efficiency_s=1e-6),
        collectives=fits, host_mem_bytes=2**30)
    path = tmp_path / "m.yaml"
    path.write_text(cluster_yaml(profile))
    cluster = Cluster.from_yaml(path)
    assert estimate_collective_time(Collective.ALL_GATHER, 2**20, 2, cluster=cluster) == pytest.approx(
        7e-4 + 2**20 * 3e-9)
    assert cluster.measured_collective("broadcast", 2) is None  # not measured: the link prices it
    assert estimate_collective_time(Collective.BROADCAST, 2**20, 2, cluster=cluster) > 0


def test_compute_is_a_rank_with_a_core_and_host_times_are_scaled_to_one() -> None:
    from autopar.cost_models.profiling import local_cluster
    from autopar.cost_models.profiling.calibration import CalibrationTable

    probes = {"gemm_flops_per_s": 4e10, "copy_bytes_per_s": 8e9, "op_floor_s": 5e-6, "half_efficiency_s": 1e-6}
    host = {name: 1e-4 for name in HOST_FIELDS}
    table = CalibrationTable(device_name="cpu:x", torch_version="t", entries={"k": (2e-4, 6e-4)},
                             batch_entries={"k": {2.0: (4e-4, 1e-3)}}).to_dict()

    def results(cores: int) -> list[dict]:  # ranks past the cores time no compute (local_worker.run_rank)
        return [{"rank": r, "compute": {**(probes if r < cores else {}), **host},
                 "collectives": {("all_reduce", 2): [(4096, 1e-3), (2**20, 3e-3)]},
                 "table": table if r < cores else None, "device_name": "cpu:x", "host_mem_bytes": 2**34}
                for r in range(4)]

    alone = local_cluster._combine(results(4), 4, cores=4)
    shared = local_cluster._combine(results(2), 4, cores=2)  # 4 ranks take turns on 2 cores
    assert (alone.host_cores, shared.host_cores) == (4, 2)
    assert shared.compute.gemm_flops_per_s == alone.compute.gemm_flops_per_s == 4e10  # a core of its own
    assert shared.compute.op_floor_s == alone.compute.op_floor_s == 5e-6
    # DTensor's per-op figure runs inside a time slice; FSDP2's steps, timed while four ranks shared two cores,
    # spent half their time waiting for a core
    assert shared.compute.dtensor_op_s == alone.compute.dtensor_op_s == 1e-4
    assert shared.compute.fsdp_unit_s == pytest.approx(alone.compute.fsdp_unit_s / 2)
    assert shared.calibration is not None and shared.calibration.entries["k"] == pytest.approx((2e-4, 6e-4))
    assert shared.collectives == alone.collectives  # measured as the step pays them (after compute)
    text = cluster_yaml(shared, name="x")
    assert "host_cores: 2" in text and "timed on 2 ranks at once" in text


def _put_a_large_result(rank: int, nbytes: int, queue, tag: str) -> None:  # type: ignore[no-untyped-def]
    queue.put({"rank": rank, "payload": bytes(nbytes), "tag": tag})


def _fail_on_rank_1(rank: int, queue) -> None:  # type: ignore[no-untyped-def]
    if rank == 1:
        raise RuntimeError("rank 1 broke")
    queue.put(rank)


def test_results_larger_than_a_pipe_are_read_while_the_ranks_run() -> None:
    """Each rank puts 4 MB (a pipe holds 64 KB): reading only after the processes end would wait forever, as
    ``autopar profile --ranks 4`` did on Llama's op tables."""
    from autopar.cost_models.profiling.local_cluster import run_and_gather

    results = run_and_gather(_put_a_large_result, (4 * 2**20,), ("t",), 3)
    assert sorted(r["rank"] for r in results) == [0, 1, 2]
    assert all(len(r["payload"]) == 4 * 2**20 and r["tag"] == "t" for r in results)


def test_a_failing_rank_raises_instead_of_hanging() -> None:
    from torch.multiprocessing import ProcessRaisedException

    from autopar.cost_models.profiling.local_cluster import run_and_gather

    with pytest.raises(ProcessRaisedException, match="rank 1 broke"):
        run_and_gather(_fail_on_rank_1, (), (), 2)


def test_a_collective_is_timed_as_what_it_adds_to_a_run_of_compute():
    """``_in_step_s``: the calls' time after bursts of compute, less the bursts alone (a fake collective whose cost
    is known: a 5 ms sleep after each 5 ms burst adds 5 ms a call; a free call adds nothing)."""
    import time

    import torch.distributed as dist

    from autopar.cost_models.profiling.local_worker import _in_step_s

    def sleep(seconds: float):
        return lambda: time.sleep(seconds)

    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        added = _in_step_s(sleep(5e-3), sleep(5e-3), calls=10, group=None)
        free = _in_step_s(lambda: None, sleep(5e-3), calls=10, group=None)
    finally:
        dist.destroy_process_group()
    assert added == pytest.approx(5e-3, abs=1.5e-3)  # sleeps overshoot on a busy machine
    assert 0.0 < free < 1.5e-3  # at least the call's own time: never 0, which no alpha-beta fit can weigh
