"""Tests for benchmarks/plots.py: the charts from the committed sweep and from small data."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SWEEP = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "planner_sweep.json"
needs_matplotlib = pytest.mark.skipif(
    importlib.util.find_spec("matplotlib") is None,
    reason="the charts need matplotlib: pip install matplotlib",
)


@needs_matplotlib
def test_pareto_chart_labels_every_system() -> None:
    from benchmarks.plots import plot_pareto

    sweep = json.loads(SWEEP.read_text())
    fig = plot_pareto("gpt", sweep["models"]["gpt"])
    labels = [t.get_text() for legend in fig.legends for t in legend.get_texts()]
    assert any(label.startswith("graphckpt") for label in labels)
    assert any("every k" in label for label in labels)
    assert any("best fitting k" in label for label in labels)
    for ax in fig.axes:
        assert "MiB" in ax.get_xlabel()
        assert "(" in ax.get_ylabel()  # a unit


@needs_matplotlib
def test_main_writes_pareto_pngs(tmp_path: Path) -> None:
    from benchmarks.plots import main

    written = main(["--sweep", str(SWEEP), "--out-dir", str(tmp_path), "--no-timeline"])
    assert sorted(p.name for p in written) == [
        "pareto_gpt.png",
        "pareto_hf-gpt2.png",
        "pareto_unet.png",
    ]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in written)


@needs_matplotlib
def test_timeline_chart_has_both_series_and_the_budget() -> None:
    from benchmarks.plots import plot_timeline

    data = {
        "model": "toy",
        "budget_bytes": 3 << 20,
        "predicted_peak_bytes": 2 << 20,
        "measured_peak_bytes": 2 << 20,
        "predicted_bytes": [1 << 20, 2 << 20, 1 << 20],
        "measured_bytes": [1 << 20, 2 << 20],
    }
    fig = plot_timeline(data)
    (ax,) = fig.axes
    labels = ax.get_legend_handles_labels()[1]
    assert [label.split(":")[0].split(" ")[0] for label in labels] == [
        "predicted",
        "measured",
        "budget",
    ]
    assert "MiB" in ax.get_ylabel()
