"""Charts of the benchmark results: memory against extra cost, and one step's memory timeline.

Reads ``benchmarks/results/planner_sweep.json`` (written by ``benchmarks.planner_sweep``) and
measures one step of the example GPT (``benchmarks.timeline``); writes PNGs next to the JSON.

Run::

    python -m benchmarks.plots [--sweep benchmarks/results/planner_sweep.json] \
        [--out-dir benchmarks/results] [--no-timeline]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["main", "plot_pareto", "plot_timeline", "timeline_data"]

_MIB = 2**20
_GRAPHCKPT = "graphckpt (one plan per budget)"
_FIRST_K = "checkpoint first k layers (torch.utils.checkpoint)"


def _figure(**kwargs: Any) -> Figure:
    """A matplotlib Figure without pyplot (no GUI backend, no global figure registry)."""
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(
            "benchmarks.plots needs matplotlib: pip install matplotlib (or pip install -e '.[dev]')"
        ) from e
    return Figure(**kwargs)


def plot_pareto(name: str, result: dict[str, Any]) -> Figure:
    """Measured peak memory against extra GFLOP and against step time, for one swept model.

    Left: graphckpt's plans at every budget of the sweep and the first-k baselines for every k
    (extra FLOPs over the plain step, both measured with FlopCounterMode). Right: step times;
    the sweep times a baseline only as the best k that fits each budget, timed alongside
    graphckpt's plan, so only those baselines appear there.

    Args:
        name: the model's name in the sweep.
        result: ``planner_sweep.json``'s entry for that model.

    Returns:
        The Figure (save it with ``fig.savefig(path)``).

    Example:
        >>> import json
        >>> sweep = json.load(open("benchmarks/results/planner_sweep.json"))
        >>> fig = plot_pareto("gpt", sweep["models"]["gpt"])
        >>> [ax.get_xlabel() for ax in fig.axes]
        ['measured peak memory of one step (MiB)', 'measured peak memory of one step (MiB)']
    """
    fig = _figure(figsize=(12, 5.6), layout="constrained")
    ax_flops, ax_time = fig.subplots(1, 2)
    rows = sorted(
        (r for r in result["budgets"] if "error" not in r), key=lambda r: r["measured_peak_bytes"]
    )
    half = [r for r in rows if r["kind"] == "halfway"]
    bases = result["baselines"]

    gx = [r["measured_peak_bytes"] / _MIB for r in rows]
    ax_flops.plot(gx, [r["extra_flops"] / 1e9 for r in rows], "o-", color="C0", label=_GRAPHCKPT)
    bx = [b["peak_bytes"] / _MIB for b in bases]
    by = [b["extra_flops"] / 1e9 for b in bases]
    ax_flops.plot(bx, by, "s--", color="C1", label=f"{_FIRST_K}, every k")
    for b, x, y in zip(bases, bx, by):
        ax_flops.annotate(f"k={b['k']}", (x, y), xytext=(4, 4), textcoords="offset points")
    ax_time.plot(gx, [r["time_s"] * 1e3 for r in rows], "o-", color="C0", label=_GRAPHCKPT)
    timed = sorted(
        (r for r in rows if r.get("best_k_time_s") is not None),
        key=lambda r: r["best_k_peak_bytes"],
    )
    tx = [r["best_k_peak_bytes"] / _MIB for r in timed]
    ty = [r["best_k_time_s"] * 1e3 for r in timed]
    ax_time.plot(
        tx,
        ty,
        "s",
        color="C1",
        label=f"{_FIRST_K}, best fitting k (timed with graphckpt at each budget)",
    )
    for r, x, y in zip(timed, tx, ty):
        ax_time.annotate(f"k={r['best_k']}", (x, y), xytext=(4, 4), textcoords="offset points")
    for r in half:
        x = r["measured_peak_bytes"] / _MIB
        ax_flops.plot(
            [x], [r["extra_flops"] / 1e9], "*", ms=14, color="C2", label="graphckpt, halfway budget"
        )
        ax_time.plot(
            [x], [r["time_s"] * 1e3], "*", ms=14, color="C2", label="graphckpt, halfway budget"
        )

    ax_flops.set_ylabel("extra compute over the plain step (GFLOP)")
    ax_time.set_ylabel("median step time, forward + backward (ms)")
    for ax in (ax_flops, ax_time):
        ax.set_xlabel("measured peak memory of one step (MiB)")
        ax.grid(True, alpha=0.3)
    # One legend for both panels, below them, so that it hides no point.
    handles: dict[str, Any] = {}
    for ax in (ax_flops, ax_time):
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.legend(handles.values(), handles.keys(), loc="outside lower center", ncol=2)
    ax_flops.set_title("recompute (FLOPs) against memory")
    ax_time.set_title("step time against memory (CPU)")
    fig.suptitle(
        f"{name} ({result['n_layers']} layers): measured memory against extra cost "
        "(lower left is better)"
    )
    return fig


def timeline_data(*, seed: int = 0, budget_bytes: int | None = None) -> dict[str, Any]:
    """Plan and measure one step of the benchmark GPT at the sweep's halfway budget.

    The halfway budget lies between the peaks of checkpointing every layer and none (the
    sweep's ``halfway`` row); it is recomputed here from the same baselines unless given.

    Args:
        seed: RNG seed of the measured step.
        budget_bytes: the budget; None measures the two baselines to find the halfway point.

    Returns:
        JSON-ready data: the budget, the predicted and measured timelines (bytes), their peaks.
    """
    from benchmarks.baselines import checkpoint_first_k
    from benchmarks.measure import measure_step
    from benchmarks.models import bench_gpt
    from benchmarks.timeline import step_timeline

    bench = bench_gpt()
    if budget_bytes is None:
        peaks = [
            measure_step(checkpoint_first_k(bench, k), bench.inputs, seed=seed).peak_bytes
            for k in (0, len(bench.layers))
        ]
        budget_bytes = round(sum(peaks) / 2)
    t = step_timeline(bench.model, bench.inputs, budget_bytes, seed=seed)
    return {
        "model": "gpt",
        "description": "benchmarks.models.bench_gpt(): gpt_example(batch=8, seq=128, n_layer=8, "
        "n_embd=128, dropout=0.1), CPU, one forward+backward after a compiling step",
        "budget_bytes": budget_bytes,
        "budget_kind": "halfway between checkpointing every layer and none",
        "predicted_peak_bytes": t.predicted_peak_bytes,
        "measured_peak_bytes": t.measured_peak_bytes,
        "predicted_bytes": t.predicted_bytes,
        "measured_bytes": t.measured_bytes,
    }


def plot_timeline(data: dict[str, Any]) -> Figure:
    """Predicted and measured live memory through one step, on one chart.

    Args:
        data: what :func:`timeline_data` returns (or ``timeline_gpt.json``).

    Returns:
        The Figure.
    """
    fig = _figure(figsize=(11, 4.8), layout="constrained")
    ax = fig.subplots()
    pred = [b / _MIB for b in data["predicted_bytes"]]
    meas = [b / _MIB for b in data["measured_bytes"]]
    ax.plot(
        range(len(pred)),
        pred,
        color="C0",
        label=f"predicted: simulator, {len(pred)} graph nodes "
        f"(peak {data['predicted_peak_bytes'] / _MIB:.2f} MiB)",
    )
    ax.plot(
        range(len(meas)),
        meas,
        color="C3",
        ls="--",
        label=f"measured: live tensor storages, {len(meas)} dispatched ops "
        f"(peak {data['measured_peak_bytes'] / _MIB:.2f} MiB)",
    )
    ax.axhline(
        data["budget_bytes"] / _MIB,
        color="k",
        ls=":",
        label=f"budget {data['budget_bytes'] / _MIB:.2f} MiB",
    )
    ax.set_xlabel("step index (ops executed: forward, then backward with recompute)")
    ax.set_ylabel("live memory (MiB, incl. parameters and inputs)")
    ax.set_ylim(0, max(max(pred), max(meas), data["budget_bytes"] / _MIB) * 1.1)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower center", fontsize="small")
    kind = data.get("budget_kind")
    ax.set_title(
        f"{data['model']}: memory through one training step, "
        f"budget {data['budget_bytes'] / _MIB:.2f} MiB" + (f" ({kind})" if kind else "")
    )
    return fig


def main(argv: Sequence[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", default="benchmarks/results/planner_sweep.json")
    parser.add_argument("--out-dir", default="benchmarks/results")
    parser.add_argument("--no-timeline", action="store_true", help="only the Pareto charts")
    args = parser.parse_args(argv)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sweep = json.loads(Path(args.sweep).read_text())
    written: list[Path] = []
    for name, result in sweep["models"].items():
        path = out_dir / f"pareto_{name}.png"
        plot_pareto(name, result).savefig(path, dpi=110)
        written.append(path)
    if not args.no_timeline:
        halfway = [
            r for r in sweep["models"].get("gpt", {}).get("budgets", []) if r["kind"] == "halfway"
        ]
        data = timeline_data(budget_bytes=halfway[0]["budget_bytes"] if halfway else None)
        json_path = out_dir / "timeline_gpt.json"
        json_path.write_text(json.dumps(data) + "\n")
        path = out_dir / "timeline_gpt.png"
        plot_timeline(data).savefig(path, dpi=110)
        written += [json_path, path]
    for path in written:
        print(f"wrote {path}")
    return written


if __name__ == "__main__":
    main()
