"""Charts and tables from ``benchmarks/results/pareto.json`` (written by ``benchmarks.pareto``).

Writes, next to the JSON: ``systems_<model>.png`` (measured peak against extra GFLOP and against
step time, every system on one chart) and ``pareto.md`` (for each model and graphckpt budget,
the cheapest setting of every system whose measured peak fits that budget). With
``--readme README.md`` it also replaces the part of the README between
``<!-- pareto:begin -->`` and ``<!-- pareto:end -->`` with the tables.

Run::

    python -m benchmarks.pareto_report [--json benchmarks/results/pareto.json] [--readme README.md]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tabulate import tabulate

from benchmarks.pareto import SYSTEMS
from benchmarks.plots import _figure

__all__ = ["budget_table", "main", "plot_systems", "replace_between_markers"]

_MIB = 2**20
BEGIN, END = "<!-- pareto:begin -->", "<!-- pareto:end -->"
_STYLE = {
    "no checkpointing": ("k", "*"),
    "checkpoint first k": ("tab:blue", "o"),
    "DeepSpeed-style, every layer": ("tab:purple", "D"),
    "torch.compile activation_memory_budget": ("tab:orange", "s"),
    "graphckpt auto_checkpoint": ("tab:green", "^"),
    "graphckpt backend": ("tab:red", "v"),
}


def _ok(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [p for p in points if p["error"] is None]


def plot_systems(name: str, result: dict[str, Any]) -> Any:
    """Measured peak against extra GFLOP (left) and step time (right), every system.

    Example:
        >>> # fig = plot_systems("gpt", json.load(open("pareto.json"))["models"]["gpt"])
    """
    fig = _figure(figsize=(12, 4.8))
    left, right = fig.subplots(1, 2)
    for system in SYSTEMS:
        pts = sorted(
            (p for p in _ok(result["points"]) if p["system"] == system),
            key=lambda p: p["peak_bytes"],
        )
        if not pts:
            continue
        color, marker = _STYLE[system]
        x = [p["peak_bytes"] / _MIB for p in pts]
        left.plot(
            x, [p["extra_flops"] / 1e9 for p in pts], marker=marker, color=color, label=system
        )
        right.plot(x, [p["step_s"] * 1e3 for p in pts], marker=marker, color=color, label=system)
    left.set_xlabel("measured peak of one training step (MiB, CPU allocator)")
    left.set_ylabel("extra GFLOP over the plain step")
    right.set_xlabel("measured peak of one training step (MiB, CPU allocator)")
    right.set_ylabel("step time (ms, median, interleaved)")
    left.set_title(f"{name}: memory vs recompute")
    right.set_title(f"{name}: memory vs step time")
    right.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _cell(p: dict[str, Any] | None, plain_s: float, setting: bool = False) -> str:
    if p is None:
        return "does not fit"
    label = f"{p['setting']}: " if setting else ""
    grads = "" if p["grads_match"] else ", grads differ"
    return (
        f"{label}{p['step_s'] / plain_s:.2f}x, +{p['extra_flops'] / 1e9:.2f} GF"
        f" ({p['peak_bytes'] / _MIB:.1f}){grads}"
    )


def budget_table(name: str, result: dict[str, Any]) -> str:
    """Markdown: at each graphckpt budget, each system's cheapest setting that fits it."""
    points = _ok(result["points"])
    plain = next(p for p in points if p["system"] == "no checkpointing")
    rows = []
    budgets = sorted({p["budget_bytes"] for p in result["points"] if p["budget_bytes"]})
    for budget in budgets:
        row = [f"{budget / _MIB:.1f}"]
        for system in SYSTEMS:
            fits = [p for p in points if p["system"] == system and p["peak_bytes"] <= budget]
            if system.startswith("graphckpt"):
                fits = [p for p in fits if p["budget_bytes"] == budget]
            best = min(fits, key=lambda p: (p["step_s"], p["extra_flops"]), default=None)
            row.append(_cell(best, plain["step_s"], setting=not system.startswith("graphckpt")))
        rows.append(row)
    headers = ["budget MiB", *SYSTEMS]
    return (
        f"**{name}** (plain step {plain['step_s'] * 1e3:.0f} ms, peak "
        f"{plain['peak_bytes'] / _MIB:.1f} MiB). Each cell: the fastest setting whose measured "
        "peak fits the budget: step time over the plain step's, extra GFLOP, (peak MiB).\n\n"
        + tabulate(rows, headers=headers, tablefmt="github")
    )


def replace_between_markers(text: str, body: str) -> str:
    """``text`` with what lies between BEGIN and END replaced by ``body``."""
    if BEGIN not in text or END not in text:
        raise ValueError(f"the README needs the markers {BEGIN} and {END} around the table")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{body}\n{END}{tail}"


def main(argv: Sequence[str] | None = None) -> list[Path]:
    """Draw the charts, write the tables; returns the files written."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--json", default="benchmarks/results/pareto.json")
    parser.add_argument("--readme", default=None)
    args = parser.parse_args(argv)
    path = Path(args.json)
    data = json.loads(path.read_text())
    written = []
    for name, result in data["models"].items():
        out = path.parent / f"systems_{name}.png"
        plot_systems(name, result).savefig(out, dpi=110)
        written.append(out)
    machine = data["machine"]
    note = (
        f"Measured by `python -m benchmarks.pareto` on {machine['cpu_count']} CPUs "
        f"(load {machine['loadavg_at_start'][0]:.1f} at start), commit "
        f"{str(machine.get('git_commit', '?'))[:7]}."
    )
    tables = "\n\n".join(budget_table(n, r) for n, r in data["models"].items())
    md = path.parent / "pareto.md"
    md.write_text(f"{tables}\n\n{note}\n")
    written.append(md)
    if args.readme:
        readme = Path(args.readme)
        readme.write_text(replace_between_markers(readme.read_text(), f"{tables}\n\n{note}"))
        written.append(readme)
    for p in written:
        print(f"wrote {p}")
    return written


if __name__ == "__main__":
    main()
