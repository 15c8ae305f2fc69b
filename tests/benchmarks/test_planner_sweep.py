"""Smoke test for benchmarks/planner_sweep.py: the sweep runs; its JSON has the promised shape."""

from __future__ import annotations

import json

from benchmarks.models import bench_gpt
from benchmarks.planner_sweep import budget_points, summary_table, sweep


def test_budget_points_are_evenly_spaced_and_inclusive() -> None:
    assert budget_points(100, 200, 3) == [100, 150, 200]
    assert budget_points(100, 200, 1) == [200]


def test_sweep_on_a_small_gpt_fits_budgets_and_keeps_grads() -> None:
    bench = bench_gpt(batch=2, seq=32, n_layer=3, n_embd=32)
    result = json.loads(json.dumps(sweep([bench], n_budgets=2, repeats=1)))

    assert {"platform", "torch", "date"} <= result["machine"].keys()
    res = result["models"]["gpt"]
    assert [b["k"] for b in res["baselines"]] == [0, 1, 2, 3]
    assert res["baselines"][0]["extra_flops"] == 0
    assert "min_feasible_le_every_layer_peak" in res["checks"]
    assert [r["kind"] for r in res["budgets"]] == ["sweep", "sweep", "halfway"]
    for row in res["budgets"]:
        assert "error" not in row, row.get("traceback")
        for key in ("predicted_peak_bytes", "measured_peak_bytes", "extra_flops", "best_k"):
            assert key in row
        assert row["checks"]["peak_within_budget"], row
        assert row["checks"]["grads_match"], row
    assert "halfway_flops_le_half_best_k" in res["budgets"][-1]["checks"]
    assert "gpt" in summary_table(result)
