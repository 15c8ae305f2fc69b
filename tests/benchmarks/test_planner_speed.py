"""Smoke test for benchmarks/planner_speed.py on a tiny GPT: the chain is timed, the plan fits."""

from __future__ import annotations

from typing import Any

from benchmarks.planner_speed import halfway_budget, measure, timing_note

_TINY: dict[str, Any] = {"layers": 2, "embd": 32, "heads": 2, "seq": 16, "vocab": 64}


def test_halfway_budget_lies_between_the_peaks() -> None:
    found = halfway_budget(**_TINY)
    assert found["min_peak_bytes"] <= found["budget_bytes"] <= found["max_peak_bytes"]
    assert found["min_peak_bytes"] < found["max_peak_bytes"]


def test_measure_times_the_chain_and_the_plan_fits() -> None:
    result = measure(**_TINY, budget_bytes=1 << 30)
    assert result["predicted_peak_bytes"] <= result["budget_bytes"]
    assert result["end_to_end_s"] >= result["trace_s"] + result["plan_s"] - 1e-6
    assert result["end_to_end_cpu_s"] > 0 and result["forward_nodes"] > 0


def test_timing_note_labels_busy_runs() -> None:
    assert timing_note(0.5, 2).startswith("quiet")
    assert timing_note(7.0, 2).startswith("busy")


def test_replicated_and_full_traces_make_the_same_plan() -> None:
    deep: dict[str, Any] = {**_TINY, "layers": 8}
    budget = halfway_budget(**deep)["budget_bytes"]
    fast, full = (measure(**deep, budget_bytes=budget, trace=t) for t in ("replicated", "full"))
    assert fast["plan_sha256"] == full["plan_sha256"]
    assert fast["forward_nodes"] == full["forward_nodes"]
