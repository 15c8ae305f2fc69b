"""Sweep graphckpt's planner over memory budgets and compare it with hand-placed checkpointing.

For each benchmark model: measure the "checkpoint the first k layers" baselines for every k,
then plan with graphckpt at budgets from the smallest feasible peak up to the plain model's
peak (plus the budget halfway between checkpointing every layer and none), and record the
measured peak, the prediction error, the extra FLOPs, gradient equality and the step time
against the best baseline that fits the same budget. Steps are timed interleaved
(``benchmarks.measure.time_step_samples``); the time checks use the median over rounds of
graphckpt's time over the baseline's in the same round (``paired_ratio``). Where
auto_checkpoint runs the unmodified module (its step fits) and the best baseline is k = 0 (the
unmodified module too), the two are one step: the time check passes by identity and the row
says ``same_step_as_best_k``. Every budget is timed for at least ``--repeats`` rounds and at
least ``--min-seconds`` seconds, so the fast U-Net steps get about a hundred rounds: near the
no-checkpoint peak graphckpt and the best k differ by 1-3%, which a median of a few rounds on
this shared machine cannot resolve. Each model is swept in a fresh process (``--in-process``
to sweep them all in this one).

Run::

    python -m benchmarks.planner_sweep [--models gpt unet hf-gpt2] [--budgets 8] \
        [--repeats 9] [--min-seconds 10] [--in-process] \
        [--out benchmarks/results/planner_sweep.json]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tabulate import tabulate

import graphckpt
from benchmarks.baselines import checkpoint_first_k
from benchmarks.measure import (
    add_min_seconds_argument,
    grads_equal,
    measure_step,
    paired_ratio,
    time_step_samples,
)
from benchmarks.models import BENCH_MODEL_NAMES, BenchModel, bench_model
from graphckpt.memory import MeasureMethod

__all__ = ["budget_points", "machine_info", "main", "summary_table", "sweep", "sweep_model"]

SEED = 0
METHOD: MeasureMethod = "allocator"
"""Peaks measured at the CPU allocator: kernel scratch memory (oneDNN convolutions) counts."""
RTOL = 1e-5
ATOL = 1e-6
_MIB = 2**20


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, check=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.rstrip()


def machine_info() -> dict[str, Any]:
    """Platform, torch version, thread count, load, git commit and the UTC date of the run."""
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "git_commit": _git("rev-parse", "HEAD"),
        "git_modified_files": None if dirty is None else [ln[3:] for ln in dirty.splitlines()],
        "platform": platform.platform(),
        "processor": platform.processor(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "loadavg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def budget_points(min_peak: int, no_ckpt_peak: int, n: int) -> list[int]:
    """``n`` budgets (bytes) evenly spaced from ``min_peak`` to ``no_ckpt_peak``, inclusive."""
    if n < 1:
        raise ValueError(f"need at least one budget, got {n}")
    if n == 1:
        return [no_ckpt_peak]
    step = (no_ckpt_peak - min_peak) / (n - 1)
    return [round(min_peak + i * step) for i in range(n)]


def _step_fn(model: torch.nn.Module, inputs: tuple[Any, ...]) -> Callable[[], None]:
    def step() -> None:
        for p in model.parameters():
            p.grad = None
        model(*inputs).backward()

    return step


def _log(msg: str) -> None:
    print(msg, flush=True)


def sweep_model(
    bench: BenchModel,
    *,
    n_budgets: int = 8,
    repeats: int = 5,
    min_seconds: float = 0.0,
    seed: int = SEED,
) -> dict[str, Any]:
    """Run the whole sweep on one benchmark model and return its JSON-ready result."""
    n_layers = len(bench.layers)
    inputs = bench.inputs

    # 1. Baselines: checkpoint the first k layers, k = 0..all.
    baselines: list[dict[str, Any]] = []
    grads_ref: dict[str, torch.Tensor] = {}
    for k in range(n_layers + 1):
        model_k = checkpoint_first_k(bench, k)
        m = measure_step(model_k, inputs, seed=seed, method=METHOD)
        if k == 0:
            grads_ref = m.grads
        baselines.append({"k": k, "peak_bytes": m.peak_bytes, "flops": m.flops, "loss": m.loss})
        _log(
            f"[{bench.name}] baseline k={k}: peak {m.peak_bytes / _MIB:.2f} MiB, "
            f"{m.flops / 1e9:.3f} GFLOP"
        )
        del model_k
    flops_k0 = baselines[0]["flops"]
    peak_k0 = baselines[0]["peak_bytes"]
    peak_all = baselines[-1]["peak_bytes"]
    for b in baselines:
        b["extra_flops"] = b["flops"] - flops_k0

    # 2. Feasible range from the planner, and the budgets.
    probe = graphckpt.plan(copy.deepcopy(bench.model), inputs, 1000.0)
    min_peak, max_peak = probe.min_peak_bytes, probe.max_peak_bytes
    budgets = [(b, "sweep") for b in budget_points(min_peak, peak_k0, n_budgets)]
    halfway = round((peak_all + peak_k0) / 2)
    budgets.append((halfway, "halfway"))
    _log(
        f"[{bench.name}] plan feasible {min_peak / _MIB:.2f}..{max_peak / _MIB:.2f} MiB; "
        f"k=all {peak_all / _MIB:.2f} MiB, k=0 {peak_k0 / _MIB:.2f} MiB"
    )

    # 3./4. Plan, measure, compare at every budget.
    rows: list[dict[str, Any]] = []
    for budget, kind in budgets:
        row: dict[str, Any] = {"budget_bytes": budget, "kind": kind}
        fitting = [b for b in baselines if b["peak_bytes"] <= budget]
        best = min(fitting, key=lambda b: (b["extra_flops"], b["k"])) if fitting else None
        row["best_k"] = best["k"] if best else None
        row["best_k_extra_flops"] = best["extra_flops"] if best else None
        row["best_k_peak_bytes"] = best["peak_bytes"] if best else None
        try:
            ck = graphckpt.auto_checkpoint(
                copy.deepcopy(bench.model), budget / 2**30, example_inputs=inputs
            )
            plan = ck.plan
            assert plan is not None
            m = measure_step(ck, inputs, seed=seed, method=METHOD)
        except Exception as e:  # record and go on: the sweep reports failures, not hides them
            row["error"] = f"{type(e).__name__}: {e}"
            row["traceback"] = traceback.format_exc(limit=-6)
            row["checks"] = {
                "peak_within_budget": False,
                "prediction_within_5pct": False,
                "grads_match": False,
                "flops_le_best_k": False,
                "time_le_best_k": False,
            }
            if kind == "halfway":
                row["checks"]["halfway_flops_le_half_best_k"] = False
                row["checks"]["halfway_time_le_0.9_best_k"] = False
            rows.append(row)
            _log(
                f"[{bench.name}] budget {budget / _MIB:.2f} MiB ({kind}): "
                f"ERROR {row['error']}\n{row['traceback']}"
            )
            continue
        extra = m.flops - flops_k0
        # What ran: the plan's graphs, or the original module when its step fits (then its
        # measurement at planning time is the prediction).
        predicted = ck.predicted_peak_bytes
        assert predicted is not None
        row.update(
            predicted_peak_bytes=predicted,
            plan_predicted_peak_bytes=plan.predicted_peak_bytes,
            runs_original=ck.runs_original,
            measured_peak_bytes=m.peak_bytes,
            prediction_error=abs(predicted - m.peak_bytes) / m.peak_bytes,
            flops=m.flops,
            extra_flops=extra,
            plan_recompute_flops=plan.recompute_flops,
            planning_seconds=plan.planning_seconds,
            loss=m.loss,
            grads_allclose=grads_equal(m.grads, grads_ref, rtol=RTOL, atol=ATOL),
            grads_bitwise=grads_equal(m.grads, grads_ref),
        )
        candidates = {"graphckpt": _step_fn(ck, inputs)}
        best_model = None
        if best is not None:
            best_model = checkpoint_first_k(bench, best["k"])
            candidates["best_k"] = _step_fn(best_model, inputs)
        samples = time_step_samples(candidates, repeats=repeats, warmup=1, min_seconds=min_seconds)
        row["timed_rounds"] = len(samples["graphckpt"])
        times = {name: statistics.median(s) for name, s in samples.items()}
        row["time_s"] = times["graphckpt"]
        row["best_k_time_s"] = times.get("best_k")
        # graphckpt's time over the best k's, the median of the rounds' ratios (the checks' measure)
        ratio = paired_ratio(samples["graphckpt"], samples["best_k"]) if best is not None else None
        row["time_ratio"] = ratio
        # auto_checkpoint ran the unmodified module and the best k is 0 (that same module):
        # one step, so any time difference between the two is the machine's noise.
        row["same_step_as_best_k"] = bool(ck.runs_original and best is not None and best["k"] == 0)
        checks = {
            "peak_within_budget": m.peak_bytes <= budget,
            "prediction_within_5pct": row["prediction_error"] <= 0.05,
            "grads_match": row["grads_allclose"],
            # With no baseline fitting the budget there is nothing to lose against.
            "flops_le_best_k": best is None or extra <= best["extra_flops"],
            "time_le_best_k": ratio is None or ratio <= 1.0 or row["same_step_as_best_k"],
        }
        if kind == "halfway":
            checks["halfway_flops_le_half_best_k"] = (
                best is not None and extra <= 0.5 * best["extra_flops"]
            )
            checks["halfway_time_le_0.9_best_k"] = ratio is not None and ratio <= 0.9
        row["checks"] = checks
        rows.append(row)
        best_txt = (
            f"best k={best['k']} +{best['extra_flops'] / 1e9:.3f} GFLOP "
            f"{times['best_k'] * 1e3:.1f} ms"
            if best is not None
            else "no k fits"
        )
        _log(
            f"[{bench.name}] budget {budget / _MIB:.2f} MiB ({kind}): "
            f"pred {predicted / _MIB:.2f} meas {m.peak_bytes / _MIB:.2f} MiB, "
            f"+{extra / 1e9:.3f} GFLOP, {times['graphckpt'] * 1e3:.1f} ms; {best_txt}; "
            f"grads {'ok' if row['grads_allclose'] else 'DIFFER'}"
            f"{' (bitwise)' if row['grads_bitwise'] else ''}"
        )
        del ck, best_model

    model_checks = {
        "min_feasible_le_every_layer_peak": min_peak <= peak_all,
    }
    all_row_checks: dict[str, bool] = {}
    for row in rows:
        for name, ok in row["checks"].items():
            all_row_checks[name] = all_row_checks.get(name, True) and bool(ok)
    model_checks.update({f"all_{name}": ok for name, ok in all_row_checks.items()})
    return {
        "n_layers": n_layers,
        "plan_min_peak_bytes": min_peak,
        "plan_max_peak_bytes": max_peak,
        "baselines": baselines,
        "budgets": rows,
        "checks": model_checks,
    }


def sweep(
    models: Sequence[str | BenchModel] = BENCH_MODEL_NAMES,
    *,
    n_budgets: int = 8,
    repeats: int = 5,
    min_seconds: float = 0.0,
    seed: int = SEED,
) -> dict[str, Any]:
    """Sweep every model (by name or as a ready :class:`BenchModel`); the JSON-ready result."""
    result: dict[str, Any] = {"machine": machine_info(), "models": {}}
    for item in models:
        bench = bench_model(item) if isinstance(item, str) else item
        result["models"][bench.name] = sweep_model(
            bench, n_budgets=n_budgets, repeats=repeats, min_seconds=min_seconds, seed=seed
        )
    return result


def summary_table(result: dict[str, Any]) -> str:
    """One line per model and budget."""
    rows = []
    for name, res in result["models"].items():
        for r in res["budgets"]:
            if "error" in r:
                rows.append([name, f"{r['budget_bytes'] / _MIB:.2f}", r["kind"], "ERROR"])
                continue
            rows.append(
                [
                    name,
                    f"{r['budget_bytes'] / _MIB:.2f}",
                    r["kind"],
                    f"{r['predicted_peak_bytes'] / _MIB:.2f}",
                    f"{r['measured_peak_bytes'] / _MIB:.2f}",
                    f"{100 * r['prediction_error']:.1f}",
                    f"{r['extra_flops'] / 1e9:.3f}",
                    r["best_k"],
                    None if r["best_k"] is None else f"{r['best_k_extra_flops'] / 1e9:.3f}",
                    f"{r['time_s'] * 1e3:.1f}",
                    None if r["best_k_time_s"] is None else f"{r['best_k_time_s'] * 1e3:.1f}",
                    None if r.get("time_ratio") is None else f"{r['time_ratio']:.3f}",
                    "bitwise" if r["grads_bitwise"] else ("close" if r["grads_allclose"] else "NO"),
                    ",".join(k for k, ok in r["checks"].items() if not ok) or "-",
                ]
            )
    headers = [
        "model", "budget MiB", "kind", "pred MiB", "meas MiB", "err %", "+GFLOP",
        "best k", "k +GFLOP", "ms", "k ms", "ratio", "grads", "failed checks",
    ]  # fmt: skip
    return tabulate(rows, headers=headers)


def _sweep_isolated(models: Sequence[str], options: list[str]) -> dict[str, Any]:
    """Sweep each model in a fresh Python process and merge the results.

    A model's allocator-level peaks depend on what the process ran before (the U-Net's
    every-layer baseline measured 21.9 MiB after the GPT's sweep, 24.3 MiB in a fresh process,
    4 times out of 4), so no model inherits another's process state.
    """
    result: dict[str, Any] = {"machine": machine_info(), "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            out = Path(tmp) / f"{name}.json"
            command = [sys.executable, "-m", "benchmarks.planner_sweep", "--models", name]
            subprocess.run([*command, *options, "--out", str(out)], check=True)
            result["models"].update(json.loads(out.read_text())["models"])
    return result


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(BENCH_MODEL_NAMES))
    parser.add_argument("--budgets", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=9)
    add_min_seconds_argument(parser)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--out", default="benchmarks/results/planner_sweep.json")
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="sweep every model in this process (default: one fresh process per model)",
    )
    args = parser.parse_args(argv)
    if args.in_process or len(args.models) == 1:
        result = sweep(
            args.models,
            n_budgets=args.budgets,
            repeats=args.repeats,
            min_seconds=args.min_seconds,
            seed=args.seed,
        )
    else:
        options = [
            "--budgets", str(args.budgets),
            "--repeats", str(args.repeats),
            "--min-seconds", str(args.min_seconds),
        ]  # fmt: skip
        result = _sweep_isolated(args.models, [*options, "--seed", str(args.seed)])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(summary_table(result))
    print()
    for name, res in result["models"].items():
        held = [k for k, ok in res["checks"].items() if ok]
        failed = [k for k, ok in res["checks"].items() if not ok]
        print(f"{name}: held {held}; FAILED {failed}")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
