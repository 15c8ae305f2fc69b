"""Tests of graphckpt/memory.py: the peak-memory measurement every benchmark relies on."""

import pytest
import torch

from graphckpt.memory import LiveTensorTracker, peak_memory, step_peak_bytes


def test_tracker_counts_new_storages_and_frees() -> None:
    x = torch.ones(1024)
    with LiveTensorTracker("cpu") as tracker:
        y = x * 2
        del y
        z = x + 1
    assert tracker.peak_bytes - tracker.baseline_bytes == 4096
    assert tracker.current_bytes - tracker.baseline_bytes == 4096
    del z


def test_views_share_their_storage() -> None:
    with LiveTensorTracker("cpu") as tracker:
        a = torch.zeros(256)
        b = a.view(16, 16)
        c = b.t()
    assert tracker.peak_bytes - tracker.baseline_bytes == 1024
    del a, b, c


def test_peak_memory_includes_resident_parameters_and_gradients() -> None:
    w = torch.randn(128, 128, requires_grad=True)
    nbytes = w.numel() * 4
    peak = peak_memory(lambda: (w @ w).sum().backward(), device="cpu")
    # w, the product, and w.grad at least; the backward's two partial products at most.
    assert 3 * nbytes <= peak <= 6 * nbytes
    assert w.grad is not None


def test_allocator_method_matches_the_tracker_on_eager_code() -> None:
    w = torch.randn(128, 128, requires_grad=True)

    def step() -> None:
        (w @ w).relu().sum().backward()

    step()
    w.grad = None
    tracker_peak = peak_memory(step, device="cpu")
    w.grad = None
    allocator_peak = peak_memory(step, device="cpu", method="allocator")
    assert abs(allocator_peak - tracker_peak) <= 4096
    w.grad = None
    resident = [w]
    by_tracker = step_peak_bytes(step, resident, "cpu")
    w.grad = None
    assert abs(step_peak_bytes(step, resident, "cpu", method="allocator") - by_tracker) <= 4096


def test_unknown_method_is_refused() -> None:
    with pytest.raises(ValueError, match="method must be one of"):
        peak_memory(lambda: None, device="cpu", method="psutil")  # type: ignore[arg-type]
