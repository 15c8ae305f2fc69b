"""Sweep ``graphckpt.backend`` over budgets against torch.compile's ``activation_memory_budget``.

For each benchmark model: find graphckpt's smallest feasible budget and its compiled
no-checkpoint peak, then at budgets between them compile a training step with
``torch.compile(backend=graphckpt.backend(budget))`` (inductor) and record the compiled step's
peak, measured at the CPU allocator (``step_peak_bytes(method="allocator")``: memory inside
inductor's generated code included; CUDA memory stats on a GPU), its gradients against the
eager unmodified model (dropout active, same seed), and its step time against plain
``torch.compile`` (inductor, default partitioner) with ``activation_memory_budget`` tuned by
bisection over the fraction to reach the same peak, timed interleaved in the same run (at least
``--repeats`` rounds and ``--min-seconds`` per budget; the ratio is the median of the rounds'
paired ratios, ``benchmarks.measure.paired_ratio``).

graphckpt compiles with ``exact_rng=True`` (dropout masks equal eager's, which torch's
variants do not reproduce: inductor draws its own). ``--inductor-rng`` compiles graphckpt with
inductor's generator too, the like-for-like time comparison for models with dropout: its
masks are then those of a plain torch.compile, and its gradients are checked against a plain
torch.compile's (inductor, default partitioner, same seed) instead of the eager model's.

``--torch-eager-rng`` compiles torch's variants with inductor's ``fallback_random`` instead, so
they draw from torch's generator in eager's order like graphckpt's default: the like-for-like
comparison for ``exact_rng=True``, with torch's gradients checked against the eager model's.

Otherwise torch's variants draw with inductor's generator (in both modes), so their gradients
are checked against the same plain torch.compile's (``torch_grads_match`` in each budget row,
and per fraction in ``torch_curve``). On the models with dropout they differ wherever torch's
partitioner recomputes a dropout in backward (every fraction below 0.75 on the benchmark GPT and
GPT-2): it draws fresh seeds there (pytorch/pytorch#190758, open), so those steps apply one mask
in forward and differentiate another in backward. On torch's generator (``--torch-eager-rng``)
they differ too, as measured at every fraction up to 0.75 on the benchmark GPT and GPT-2.

Every compiled variant stays cached for the model's whole sweep (Dynamo keeps one cache entry
per backend object on the model's code, hence the raised recompile limit); ``torch._dynamo
.reset()`` starts each model afresh.

Run::

    python -m benchmarks.compile_sweep [--models gpt unet hf-gpt2] [--budgets 6] \
        [--repeats 5] [--min-seconds 10] [--bisect-steps 2] [--inductor-rng | --torch-eager-rng] \
        [--out benchmarks/results/compile_sweep.json (with --inductor-rng:
               benchmarks/results/compile_sweep_inductor_rng.json, with --torch-eager-rng:
               benchmarks/results/compile_sweep_torch_eager_rng.json)]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tabulate import tabulate

import graphckpt
from benchmarks.compile_variants import (
    Variant,
    compile_variant,
    graphckpt_min_feasible,
    measure_variant,
)
from benchmarks.measure import add_min_seconds_argument, paired_ratio, time_step_samples
from benchmarks.models import BENCH_MODEL_NAMES, BenchModel, bench_model
from benchmarks.planner_sweep import budget_points, machine_info
from benchmarks.torch_curve import INITIAL_FRACTIONS, TorchCurve

__all__ = ["main", "summary_table", "sweep", "sweep_model"]

SEED = 0
HUGE_BUDGET_GB = 1024.0
"""A budget no benchmark model reaches: graphckpt keeps every activation."""
_MIB = 2**20


def _log(msg: str) -> None:
    print(msg, flush=True)


def _is_monotone(peaks: Sequence[int]) -> bool:
    return all(a <= b for a, b in itertools.pairwise(peaks))


def _budget_row(
    bench: BenchModel,
    budget: int,
    curve: TorchCurve,
    ref_grads: dict[str, torch.Tensor],
    *,
    bisect_steps: int,
    exact_rng: bool = True,
) -> tuple[dict[str, Any], Variant, Variant | None]:
    """Compile and measure graphckpt at ``budget``, and tune torch to the same measured peak."""
    be = graphckpt.backend(budget_gb=budget / 2**30, exact_rng=exact_rng)
    v = compile_variant(f"graphckpt@{budget}", bench, be)
    measure_variant(v, bench, ref_grads, seed=SEED)
    t = curve.tune(v.peak_bytes, bisect_steps)
    row: dict[str, Any] = {
        "budget_bytes": budget,
        "measured_peak_bytes": v.peak_bytes,
        "predicted_peak_bytes": v.predicted_peak_bytes,
        "compile_s": v.compile_s,
        "grads_match": v.grads_match,
        "grads_max_abs_diff": v.grads_max_abs_diff,
        "torch_fraction": None if t is None else t.fraction,
        "torch_peak_bytes": None if t is None else t.peak_bytes,
        "torch_grads_match": None if t is None else t.grads_match,
        "checks": {"peak_within_budget": v.peak_bytes <= budget, "grads_match": v.grads_match},
    }
    torch_txt = "no torch fraction tried reaches it" if t is None else t.name
    _log(
        f"[{curve.tag}] budget {budget / _MIB:.2f} MiB: "
        f"pred {(v.predicted_peak_bytes or 0) / _MIB:.2f} meas {v.peak_bytes / _MIB:.2f} MiB, "
        f"grads {'ok' if v.grads_match else 'DIFFER'}; {torch_txt}"
    )
    return row, v, t


def _time_row(
    row: dict[str, Any],
    v: Variant,
    t: Variant | None,
    *,
    repeats: int,
    min_seconds: float,
    tag: str,
) -> None:
    """Time graphckpt's and torch's steps interleaved, into ``row``: medians of at least
    ``repeats`` rounds and ``min_seconds``, and the median of the rounds' paired ratios."""
    candidates = {"graphckpt": v.step} | ({} if t is None else {"torch": t.step})
    samples = time_step_samples(candidates, repeats=repeats, warmup=2, min_seconds=min_seconds)
    times = {name: statistics.median(s) for name, s in samples.items()}
    row["time_s"] = times["graphckpt"]
    row["torch_time_s"] = times.get("torch")
    row["timed_rounds"] = len(samples["graphckpt"])
    row["time_ratio"] = None if t is None else paired_ratio(samples["graphckpt"], samples["torch"])
    ratio = "" if t is None else f", torch {times['torch'] * 1e3:.1f} ms: {row['time_ratio']:.3f}"
    _log(
        f"[{tag}] budget {row['budget_bytes'] / _MIB:.2f} MiB: graphckpt "
        f"{times['graphckpt'] * 1e3:.1f} ms{ratio}"
    )


def _summarise(rows: list[dict[str, Any]], curve: TorchCurve) -> dict[str, Any]:
    """Model-level checks and ratios over the budget rows (ascending budgets)."""
    ratios = [r["time_ratio"] for r in rows if r["time_ratio"] is not None]
    reached = [r for r in rows if r["time_ratio"] is not None]
    lowest = reached[0] if reached else None
    points = curve.points()
    return {
        "median_time_ratio": statistics.median(ratios) if ratios else None,
        "torch_grads_match_at_reached_budgets": all(r["torch_grads_match"] for r in reached),
        "lowest_torch_budget_bytes": None if lowest is None else lowest["budget_bytes"],
        "time_ratio_at_lowest_torch_budget": None if lowest is None else lowest["time_ratio"],
        "torch_min_peak_bytes": min(p["peak_bytes"] for p in points),
        "torch_peak_monotone_in_fraction": _is_monotone([p["peak_bytes"] for p in points]),
        "checks": {
            "all_peak_within_budget": all(r["checks"]["peak_within_budget"] for r in rows),
            "all_grads_match": all(r["checks"]["grads_match"] for r in rows),
            "peak_monotone_in_budget": _is_monotone([r["measured_peak_bytes"] for r in rows]),
            "median_time_ratio_le_1": bool(ratios) and statistics.median(ratios) <= 1.0,
        },
    }


def sweep_model(
    bench: BenchModel,
    *,
    n_budgets: int = 6,
    repeats: int = 5,
    min_seconds: float = 0.0,
    bisect_steps: int = 2,
    fractions: Sequence[float] = INITIAL_FRACTIONS,
    exact_rng: bool = True,
    torch_eager_rng: bool = False,
) -> dict[str, Any]:
    """Run the whole compile sweep on one benchmark model; its JSON-ready result.

    With ``exact_rng=False`` graphckpt compiles with ``graphckpt.backend(exact_rng=False)``:
    inductor's own generator, as torch's variants use, so dropout masks are no longer eager's
    and graphckpt's gradients (keep-all and at every budget) are checked against a plain
    ``torch.compile``'s (inductor, default partitioner, same seed: the same masks) instead of
    the eager model's.

    With ``torch_eager_rng=True`` torch's variants compile with ``fallback_random`` (torch's
    generator in eager's order, as graphckpt's ``exact_rng=True``): their forward masks equal the
    eager model's, and their gradients are checked against the eager model's.
    """
    if torch_eager_rng and not exact_rng:
        raise ValueError(
            "torch_eager_rng=True pairs torch's variants with graphckpt's exact_rng=True; "
            "with exact_rng=False both sides should draw with inductor's generator"
        )
    torch._dynamo.reset()
    tag = bench.name
    ref = compile_variant("eager", bench, None)
    measure_variant(ref, bench, None, seed=SEED)
    ref_grads = ref.grads
    min_feasible = graphckpt_min_feasible(bench, exact_rng=exact_rng)
    if torch_eager_rng:
        torch_ref = ref_grads  # both sides draw eager's masks (exact_rng holds, checked above)
    else:
        # A plain torch.compile (inductor's generator, default partitioner): the reference for
        # torch's variants, and for graphckpt's when it draws with inductor's generator too.
        plain = compile_variant("torch.compile", bench, "inductor")
        measure_variant(plain, bench, None, seed=SEED)
        torch_ref = plain.grads
    ours_ref = ref_grads if exact_rng else torch_ref
    top_backend = graphckpt.backend(budget_gb=HUGE_BUDGET_GB, exact_rng=exact_rng)
    top = compile_variant("graphckpt@keep-all", bench, top_backend)
    measure_variant(top, bench, ours_ref, seed=SEED)
    _log(
        f"[{tag}] eager peak {ref.peak_bytes / _MIB:.2f} MiB; graphckpt smallest feasible "
        f"{min_feasible / _MIB:.2f} MiB, compiled keep-all peak {top.peak_bytes / _MIB:.2f} MiB"
    )
    curve = TorchCurve(bench, torch_ref, tag, fractions, eager_rng=torch_eager_rng, seed=SEED)
    budgets = budget_points(min_feasible, max(top.peak_bytes, min_feasible), n_budgets)
    # Compile and measure everything first, then time: compiling leaves background work (and
    # the profiler a slow first call) that would land in the timings.
    made = [
        _budget_row(bench, b, curve, ours_ref, bisect_steps=bisect_steps, exact_rng=exact_rng)
        for b in budgets
    ]
    for row, v, t in made:
        _time_row(row, v, t, repeats=repeats, min_seconds=min_seconds, tag=tag)
    rows = [row for row, _, _ in made]
    summary = _summarise(rows, curve)
    summary["checks"]["keep_all_grads_match"] = bool(top.grads_match)
    return {
        "exact_rng": exact_rng,
        "grads_reference": "eager model" if exact_rng else "plain torch.compile (inductor)",
        "torch_rng": "torch's generator (fallback_random)" if torch_eager_rng else "inductor's",
        "torch_grads_reference": (
            "eager model" if torch_eager_rng else "plain torch.compile (inductor)"
        ),
        "eager_peak_bytes": ref.peak_bytes,
        "graphckpt_min_feasible_bytes": min_feasible,
        "graphckpt_keep_all_peak_bytes": top.peak_bytes,
        "budgets": rows,
        "torch_curve": curve.points(),
        **summary,
    }


def sweep(
    models: Sequence[str | BenchModel] = BENCH_MODEL_NAMES,
    *,
    n_budgets: int = 6,
    repeats: int = 5,
    min_seconds: float = 0.0,
    bisect_steps: int = 2,
    fractions: Sequence[float] = INITIAL_FRACTIONS,
    out: Path | None = None,
    exact_rng: bool = True,
    torch_eager_rng: bool = False,
) -> dict[str, Any]:
    """Sweep every model (by name or as a ready :class:`BenchModel`); the JSON-ready result.

    With ``out``, the result so far is written there as JSON after each model.
    """
    start = time.perf_counter()
    result: dict[str, Any] = {"machine": machine_info(), "models": {}}
    # One cache entry per compiled variant on the model's code: well over Dynamo's default 8.
    with torch._dynamo.config.patch(recompile_limit=256, accumulated_recompile_limit=4096):
        for item in models:
            bench = bench_model(item) if isinstance(item, str) else item
            result["models"][bench.name] = sweep_model(
                bench,
                n_budgets=n_budgets,
                repeats=repeats,
                min_seconds=min_seconds,
                bisect_steps=bisect_steps,
                fractions=fractions,
                exact_rng=exact_rng,
                torch_eager_rng=torch_eager_rng,
            )
            result["machine"]["loadavg_at_end"] = (
                list(os.getloadavg()) if hasattr(os, "getloadavg") else None
            )
            result["sweep_seconds"] = time.perf_counter() - start
            if out is not None:
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(result, indent=2) + "\n")
    torch._dynamo.reset()
    return result


def _yes_no(flag: bool | None) -> str | None:
    return None if flag is None else ("yes" if flag else "NO")


def summary_table(result: dict[str, Any]) -> str:
    """One line per model and budget."""
    rows = []
    for name, res in result["models"].items():
        for r in res["budgets"]:
            tp = r["torch_peak_bytes"]
            rows.append(
                [
                    name,
                    f"{r['budget_bytes'] / _MIB:.2f}",
                    f"{r['measured_peak_bytes'] / _MIB:.2f}",
                    _yes_no(r["grads_match"]),
                    f"{r['time_s'] * 1e3:.1f}",
                    None if r["torch_fraction"] is None else f"{r['torch_fraction']:g}",
                    None if tp is None else f"{tp / _MIB:.2f}",
                    _yes_no(r.get("torch_grads_match")),
                    None if r["torch_time_s"] is None else f"{r['torch_time_s'] * 1e3:.1f}",
                    None if r["time_ratio"] is None else f"{r['time_ratio']:.3f}",
                ]
            )
    headers = [
        "model", "budget MiB", "peak MiB", "grads", "ms",
        "torch frac", "torch MiB", "torch grads", "torch ms", "ratio",
    ]  # fmt: skip
    return tabulate(rows, headers=headers)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(BENCH_MODEL_NAMES))
    parser.add_argument("--budgets", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=5)
    add_min_seconds_argument(parser)
    parser.add_argument("--bisect-steps", type=int, default=2)
    parser.add_argument(
        "--inductor-rng",
        action="store_true",
        help="compile graphckpt with exact_rng=False (inductor's generator, like torch's variants)",
    )
    parser.add_argument(
        "--torch-eager-rng",
        action="store_true",
        help="compile torch's variants with fallback_random (torch's generator, like graphckpt's "
        "default exact_rng=True); not with --inductor-rng",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="JSON path (default benchmarks/results/compile_sweep.json, or "
        "compile_sweep_inductor_rng.json with --inductor-rng, "
        "compile_sweep_torch_eager_rng.json with --torch-eager-rng)",
    )
    args = parser.parse_args(argv)
    if args.inductor_rng and args.torch_eager_rng:
        parser.error(
            "--torch-eager-rng pairs torch's variants with graphckpt's exact RNG; "
            "drop --inductor-rng (or drop --torch-eager-rng to compare both on inductor's RNG)"
        )
    default = "compile_sweep.json"
    if args.inductor_rng:
        default = "compile_sweep_inductor_rng.json"
    elif args.torch_eager_rng:
        default = "compile_sweep_torch_eager_rng.json"
    out = Path(args.out or f"benchmarks/results/{default}")
    result = sweep(
        args.models,
        n_budgets=args.budgets,
        repeats=args.repeats,
        min_seconds=args.min_seconds,
        bisect_steps=args.bisect_steps,
        out=out,
        exact_rng=not args.inductor_rng,
        torch_eager_rng=args.torch_eager_rng,
    )
    print(summary_table(result))
    print()
    for name, res in result["models"].items():
        failed = [k for k, ok in res["checks"].items() if not ok]
        print(
            f"{name}: median ratio {res['median_time_ratio']}, at torch's lowest budget "
            f"{res['time_ratio_at_lowest_torch_budget']}; FAILED {failed or 'none'}"
        )
    print(f"wrote {out} in {result['sweep_seconds']:.0f} s")
    return result


if __name__ == "__main__":
    main()
