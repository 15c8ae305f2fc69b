"""Tests of benchmarks/pareto.py and benchmarks/pareto_report.py on a tiny GPT: every system is
measured the same way, the tables and charts render, the README block is replaced in place."""

from __future__ import annotations

import pytest
import torch

from benchmarks.models import bench_gpt
from benchmarks.pareto import SYSTEMS, sweep_model
from benchmarks.pareto_report import (
    BEGIN,
    END,
    budget_table,
    plot_systems,
    replace_between_markers,
)


@pytest.fixture(scope="module")
def result() -> dict:
    bench = bench_gpt(batch=2, seq=16, n_layer=2, n_embd=32)
    with torch._dynamo.config.patch(recompile_limit=64, accumulated_recompile_limit=256):
        out = sweep_model(bench, n_budgets=2, fractions=[0.0], repeats=1)
    torch._dynamo.reset()
    return out


def test_every_system_is_measured(result) -> None:
    points = result["points"]
    assert {p["system"] for p in points} == set(SYSTEMS)
    plain = next(p for p in points if p["system"] == "no checkpointing")
    every = next(p for p in points if p["system"] == "checkpoint first k" and p["setting"] == "2")
    assert every["extra_flops"] > 0 and every["peak_bytes"] < plain["peak_bytes"]
    for p in points:
        if p["error"] is None:
            assert p["peak_bytes"] > 0 and p["step_s"] > 0
    eager = [p for p in points if p["system"] == "graphckpt auto_checkpoint"]
    assert eager and all(p["error"] is None and p["grads_match"] for p in eager)
    # The allocator sees a few bytes the simulator does not (scalar bookkeeping): within 1 KB.
    assert all(p["peak_bytes"] <= p["budget_bytes"] + 1024 for p in eager)


def test_report_renders(result, tmp_path) -> None:
    table = budget_table("tiny", result)
    assert table.count("\n|") >= 3 and "graphckpt backend" in table
    fig = plot_systems("tiny", result)
    assert fig.axes[0].get_xlabel().startswith("measured peak")
    fig.savefig(tmp_path / "x.png")
    readme = f"intro\n{BEGIN}\nold\n{END}\noutro\n"
    assert replace_between_markers(readme, "new") == f"intro\n{BEGIN}\nnew\n{END}\noutro\n"
    with pytest.raises(ValueError, match="markers"):
        replace_between_markers("no markers", "new")
