"""The measured peak that bench/plan_regret.py holds the memory model to, on steps of known allocations."""

from __future__ import annotations

import torch

from autopar.cost_models.profiling.tensor_memory import live_tensor_bytes, peak_tensor_bytes

MB = 2**20
SLACK = 64 * 2**10


def test_peak_is_held_bytes_plus_the_most_allocated_at_once() -> None:
    held = torch.empty(MB, dtype=torch.uint8)
    before = live_tensor_bytes()
    assert before >= MB

    def step() -> None:
        a = torch.empty(2 * MB, dtype=torch.uint8)
        b = torch.empty(3 * MB, dtype=torch.uint8)
        del a
        c = torch.ones(MB, dtype=torch.uint8) + b[:MB]  # a temporary (ones) and c: 2 MB live with b's 3
        del b, c

    peak = peak_tensor_bytes(step)
    # a and b together; after a is freed, b + ones + c is 5 MB too, never more (malloc's headers, page rounding
    # and the Python objects the step makes add a few KB)
    assert 5 * MB <= peak - before <= 5 * MB + SLACK
    assert live_tensor_bytes() == before  # the step let go of everything
    assert peak_tensor_bytes(lambda: None) - before <= SLACK  # nothing allocated: nothing measured
    del held


def test_views_and_shared_storages_count_once() -> None:
    base = live_tensor_bytes()
    x = torch.zeros(4 * MB, dtype=torch.uint8)
    views = [x[:MB], x.view(2, -1), x]
    assert live_tensor_bytes() - base == 4 * MB
    del x, views


def test_tensors_without_storage_hold_no_memory() -> None:
    """An export can leave FakeTensors alive: they have no data pointer, hold nothing and are not an error."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    base = live_tensor_bytes()
    with FakeTensorMode():
        fake = torch.empty(4 * MB, dtype=torch.uint8)
    assert live_tensor_bytes() == base
    del fake
