"""Tests of benchmarks/compile_sweep.py: the sweep on a tiny GPT, and its argument checks."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks.compile_sweep import main, summary_table, sweep, sweep_model
from benchmarks.models import bench_gpt


@pytest.mark.parametrize("exact_rng", [True, False])
def test_sweep_on_a_tiny_gpt_fits_budgets_and_matches_reference_grads(exact_rng) -> None:
    """Gradients match the eager model's (exact_rng) or, with inductor's generator, a plain
    torch.compile's: the same masks at every budget."""
    bench = bench_gpt(batch=2, seq=16, n_layer=2, n_embd=32)
    with torch._dynamo.config.patch(recompile_limit=64):
        raw = sweep(
            [bench], n_budgets=2, repeats=1, bisect_steps=0, fractions=(1.0,), exact_rng=exact_rng
        )
    result = json.loads(json.dumps(raw))
    assert {"git_commit", "loadavg_at_start", "loadavg_at_end"} <= result["machine"].keys()
    res = result["models"]["gpt"]
    rows = res["budgets"]
    least = res["graphckpt_min_feasible_bytes"]
    # A compiled keep-all step can measure below the smallest plan the planner predicts.
    assert [r["budget_bytes"] for r in rows] == [
        least,
        max(least, res["graphckpt_keep_all_peak_bytes"]),
    ]
    for row in rows:
        assert row["measured_peak_bytes"] <= row["budget_bytes"], row
        assert row["grads_match"], row
        assert row["time_s"] > 0
        if row["torch_fraction"] is not None:
            assert row["torch_peak_bytes"] <= row["measured_peak_bytes"]
            assert row["time_ratio"] > 0
    assert [p["fraction"] for p in res["torch_curve"]] == [1.0]
    # torch at fraction 1.0 is the plain torch.compile its gradients are checked against.
    assert res["torch_curve"][0]["grads_match"], res["torch_curve"]
    assert res["torch_grads_reference"] == "plain torch.compile (inductor)"
    torch_rows = [r for r in rows if r["torch_fraction"] is not None]
    assert all(r["torch_grads_match"] for r in torch_rows)
    assert res["torch_grads_match_at_reached_budgets"]
    assert set(res["checks"]) >= {"all_peak_within_budget", "peak_monotone_in_budget"}
    assert res["checks"]["keep_all_grads_match"] and res["checks"]["all_grads_match"]
    reference = "eager model" if exact_rng else "plain torch.compile (inductor)"
    assert res["grads_reference"] == reference
    assert "gpt" in summary_table(result)


def test_torch_on_eager_rng_pairs_only_with_graphckpts_exact_rng() -> None:
    """Eager RNG on torch's side against inductor's on graphckpt's compares unlike masks: refused
    before anything compiles, from Python and from the command line."""
    bench = bench_gpt(batch=1, seq=8, n_layer=1, n_embd=16)
    with pytest.raises(ValueError, match="exact_rng=True"):
        sweep_model(bench, exact_rng=False, torch_eager_rng=True)
    with pytest.raises(SystemExit):
        main(["--inductor-rng", "--torch-eager-rng", "--models", "gpt"])
