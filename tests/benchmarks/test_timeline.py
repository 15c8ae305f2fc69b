"""Tests for benchmarks/timeline.py: one planned step of a tiny GPT, predicted and measured."""

from __future__ import annotations

import graphckpt
from benchmarks.timeline import step_timeline
from graphckpt.examples import gpt_example


def test_step_timeline_prediction_matches_the_plan_and_the_measurement() -> None:
    model, inputs = gpt_example(batch=2, seq=16, n_layer=2, n_embd=32, n_head=2, vocab_size=64)
    probe = graphckpt.plan(model, inputs, budget_gb=1.0)
    budget = (probe.min_peak_bytes + probe.max_peak_bytes) // 2  # some tensors recomputed
    t = step_timeline(model, inputs, budget)
    assert any(d.action == "recompute" for d in t.plan.tensors)
    assert t.measured_peak_bytes <= budget
    assert t.predicted_peak_bytes == t.plan.predicted_peak_bytes == max(t.predicted_bytes)
    assert t.measured_peak_bytes == max(t.measured_bytes)
    # The simulator tracks the measured step to within 1% at the peak (rockmate's test_mem).
    assert abs(t.predicted_peak_bytes - t.measured_peak_bytes) <= 0.01 * t.measured_peak_bytes
    assert t.predicted_bytes[0] == t.measured_bytes[0]  # both start from parameters + inputs
