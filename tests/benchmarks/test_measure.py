"""Tests for benchmarks/measure.py: what a step measurement reports, and interleaved timing."""

from __future__ import annotations

import time

import pytest
import torch

from benchmarks.measure import grads_equal, measure_step, resident_bytes, time_steps
from graphckpt.examples import gpt_example
from graphckpt.flops import count_flops


def test_measure_step_reports_the_steps_loss_grads_and_flops() -> None:
    model, inputs = gpt_example(batch=2, seq=16, n_layer=2, n_embd=32)
    m = measure_step(model, inputs, seed=3)

    for p in model.parameters():
        p.grad = None
    torch.manual_seed(3)
    loss = model(*inputs)
    loss.backward()
    assert m.loss == loss.item()
    assert grads_equal(m.grads, {n: p.grad for n, p in model.named_parameters()})  # type: ignore[misc]
    torch.manual_seed(3)
    assert m.flops == count_flops(lambda: model(*inputs).backward())


def test_peak_counts_the_model_and_ignores_other_tensors() -> None:
    model, inputs = gpt_example(batch=2, seq=16, n_layer=2, n_embd=32)
    first = measure_step(model, inputs, seed=0)
    params = resident_bytes(model.parameters())
    # Parameters and their gradients are both live at the end of the step.
    assert first.peak_bytes >= 2 * params
    unrelated = torch.ones(4 * 2**20)  # 16 MiB held by someone else in the process
    second = measure_step(model, inputs, seed=0)
    assert second.peak_bytes == first.peak_bytes
    assert second.flops == first.flops
    del unrelated


def test_resident_bytes_counts_shared_storage_once() -> None:
    w = torch.zeros(256)
    assert resident_bytes([w, w[:128], w.view(16, 16)]) == 1024
    assert resident_bytes([]) == 0


def test_time_steps_interleaves_candidates_alternating_order_and_returns_medians() -> None:
    calls: list[str] = []

    def step(name: str, sleep_s: float):  # type: ignore[no-untyped-def]
        def run() -> None:
            calls.append(name)
            time.sleep(sleep_s)

        return run

    times = time_steps({"a": step("a", 0.0), "b": step("b", 0.02)}, repeats=3, warmup=1)
    # Warm-up in order, then timed rounds alternating order (a b, b a, a b).
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]
    assert set(times) == {"a", "b"}
    assert times["b"] >= 0.02 > times["a"]


def test_time_steps_validates_counts() -> None:
    with pytest.raises(ValueError, match="repeats"):
        time_steps({"a": lambda: None}, repeats=0, warmup=0)
    with pytest.raises(ValueError, match="warmup"):
        time_steps({"a": lambda: None}, repeats=1, warmup=-1)


def test_grads_equal_is_bitwise_unless_given_tolerances() -> None:
    a = {"w": torch.tensor([1.0, 2.0])}
    assert grads_equal(a, {"w": torch.tensor([1.0, 2.0])})
    near = {"w": torch.tensor([1.0, 2.0 + 1e-6])}
    assert not grads_equal(a, near)
    assert grads_equal(a, near, rtol=1e-5)
    assert not grads_equal(a, {"v": torch.tensor([1.0, 2.0])})
    assert not grads_equal(a, {"w": torch.tensor([1.0, 2.0, 3.0])})
    assert not grads_equal(a, {"w": torch.tensor([1.0, 2.0], dtype=torch.float64)})


def test_paired_ratio_cancels_a_slow_round() -> None:
    from benchmarks.measure import paired_ratio, time_step_samples

    # Round 2 is slow for both candidates: the paired ratio still says b takes twice as long.
    assert paired_ratio([1.0, 1.0, 5.0], [2.0, 2.0, 10.0]) == 0.5
    with pytest.raises(ValueError, match="equally long"):
        paired_ratio([1.0], [1.0, 2.0])
    samples = time_step_samples({"a": lambda: None, "b": lambda: None}, repeats=4)
    assert [len(s) for s in samples.values()] == [4, 4]


def test_time_step_samples_runs_enough_rounds_to_fill_min_seconds() -> None:
    from benchmarks.measure import time_step_samples

    def sleep() -> None:
        time.sleep(0.01)

    # Rounds of about 20 ms: 0.2 s asks for about 10 rounds, more than the 3 repeats.
    samples = time_step_samples({"a": sleep, "b": sleep}, repeats=3, min_seconds=0.2)
    assert 8 <= len(samples["a"]) == len(samples["b"]) <= 11
    # Without warmup the first timed round sets the pace.
    samples = time_step_samples({"a": sleep}, repeats=1, warmup=0, min_seconds=0.1)
    assert 8 <= len(samples["a"]) <= 11
    assert len(time_step_samples({"a": sleep}, repeats=5, min_seconds=0.01)["a"]) == 5
    with pytest.raises(ValueError, match="min_seconds"):
        time_step_samples({"a": sleep}, repeats=1, min_seconds=-1.0)
