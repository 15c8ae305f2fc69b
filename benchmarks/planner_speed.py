"""Planner speed on a 48-layer GPT-2-XL-shaped model traced on meta tensors (issue 3, point 7).

Run: ``python -m benchmarks.planner_speed`` (``--layers``, ``--budget-bytes``, ``--out`` to change
the defaults).

Times one cold, contiguous chain in a fresh process, as a user calling ``graphckpt.plan`` meets it:
build the model on meta tensors, make its joint graph (nothing is computed), split dropout, and
plan (cost, min-cut, search, simulation) for a CUDA target. The graph is made both ways, each in
its own fresh process, one after the other: ``replicated`` (``graphckpt.plan``'s path: Dynamo +
AOTAutograd trace 2 and 3 layers, the 48-layer graph is built from them, ``passes/replicate.py``)
and ``full`` (all 48 layers traced); the two plans must be identical. The budget is halfway
between the smallest feasible peak and the keep-all peak of the full trace, found in a separate
process so the timed chains start cold. Wall and CPU seconds are both recorded: on a shared
machine the CPU seconds move less with the load. Targets: end to end <= 10 s, planning <= 2 s.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from typing import Any

import torch

from benchmarks.planner_sweep import machine_info
from graphckpt.examples.gpt import GPT, GPTConfig
from graphckpt.options import DeviceSpec, PlanConfig
from passes.decompose import split_dropout
from passes.plan import plan_pass
from passes.replicate import capture_for_planning
from passes.trace import JointGraph, capture_joint_graphs

_CONFIG = PlanConfig(device=DeviceSpec.preset("cuda"))


TRACES = ("replicated", "full")
"""How the joint graph is made: built from 2 and 3 traced layers (``graphckpt.plan``'s path,
``passes/replicate.py``), or traced with all layers."""


def _trace(
    layers: int, embd: int, heads: int, seq: int, vocab: int, trace: str = "replicated"
) -> JointGraph:
    with torch.device("meta"):
        model = GPT(
            GPTConfig(
                vocab_size=vocab,
                block_size=seq,
                n_layer=layers,
                n_head=heads,
                n_embd=embd,
                dropout=0.1,
            )
        )
        idx = torch.zeros(1, seq, dtype=torch.long)
    if trace == "replicated":
        jg = capture_for_planning(model, (idx, idx))[0]
    else:
        jg = capture_joint_graphs(model, (idx, idx))[0]
    split_dropout(jg)
    return jg


def peaks(layers: int, embd: int, heads: int, seq: int, vocab: int) -> tuple[int, int]:
    """The smallest feasible and the keep-all peak (bytes) of the model's step."""
    jg = _trace(layers, embd, heads, seq, vocab, "full")
    wide = plan_pass(jg, 1 << 50, _CONFIG, torch.device("cuda"))
    return wide.min_peak_bytes, wide.max_peak_bytes


def _run_fresh(flags: list[str], shape: dict[str, int]) -> Any:
    """Run this script in a fresh process with ``flags``; return the JSON of its last line."""
    cmd = [sys.executable, "-m", "benchmarks.planner_speed", *flags]
    cmd += [arg for key, value in shape.items() for arg in (f"--{key}", str(value))]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=root, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def halfway_budget(layers: int, embd: int, heads: int, seq: int, vocab: int) -> dict[str, int]:
    """Peaks and the halfway budget, computed in a fresh process so this one stays cold."""
    shape = {"layers": layers, "embd": embd, "heads": heads, "seq": seq, "vocab": vocab}
    low, high = _run_fresh(["--peaks-only"], shape)
    return {"min_peak_bytes": low, "max_peak_bytes": high, "budget_bytes": (low + high) // 2}


def measure_cold(shape: dict[str, int], budget_bytes: int, trace: str) -> dict[str, Any]:
    """:func:`measure` in a fresh process (a cold chain, as a user's first call meets it), with
    the 1-minute load before and after."""
    flags = ["--measure-only", "--trace", trace, "--budget-bytes", str(budget_bytes)]
    before = os.getloadavg()[0]
    result: dict[str, Any] = _run_fresh(flags, shape)
    result["loadavg_1min_before_after"] = [before, os.getloadavg()[0]]
    return result


def measure(
    layers: int,
    embd: int,
    heads: int,
    seq: int,
    vocab: int,
    budget_bytes: int,
    trace: str = "replicated",
) -> dict[str, Any]:
    """Time the cold chain build -> trace -> split dropout -> plan; return timings and the plan.

    Args:
        layers, embd, heads, seq, vocab: the GPT's shape.
        budget_bytes: the step's budget the plan must meet.
        trace: one of :data:`TRACES`.

    Returns:
        Wall and CPU seconds of each stage and of the chain, and the plan's numbers.

    Example:
        >>> r = measure(2, embd=32, heads=2, seq=16, vocab=64, budget_bytes=1 << 30)
        >>> r["end_to_end_s"] >= r["plan_s"]
        True
    """
    wall, cpu = [time.perf_counter()], [time.process_time()]

    def lap() -> None:
        wall.append(time.perf_counter())
        cpu.append(time.process_time())

    jg = _trace(layers, embd, heads, seq, vocab, trace)
    lap()
    plan = plan_pass(jg, budget_bytes, _CONFIG, torch.device("cuda"))
    lap()
    decisions = json.loads(plan.to_json())
    decisions.pop("planning_seconds")
    return {
        "trace": trace,
        "layers": layers,
        "forward_nodes": len(jg.forward),
        "backward_nodes": len(jg.backward),
        "trace_s": wall[1] - wall[0],
        "plan_s": wall[2] - wall[1],
        "end_to_end_s": wall[2] - wall[0],
        "trace_cpu_s": cpu[1] - cpu[0],
        "plan_cpu_s": cpu[2] - cpu[1],
        "end_to_end_cpu_s": cpu[2] - cpu[0],
        "budget_bytes": budget_bytes,
        "predicted_peak_bytes": plan.predicted_peak_bytes,
        "saved_tensors": len(plan.saved_nodes()),
        "plan_le_2s": wall[2] - wall[1] <= 2.0,
        "end_to_end_le_10s": wall[2] - wall[0] <= 10.0,
        "plan_sha256": hashlib.sha256(json.dumps(decisions).encode()).hexdigest(),
    }


def timing_note(load: float, num_cpus: int) -> str:
    """Say whether the wall times are representative: not when other work kept the CPUs busy.

    Example:
        >>> timing_note(0.2, 2).startswith("quiet")
        True
    """
    if load <= 0.5 * num_cpus:
        return f"quiet machine (1-min load {load:.1f} on {num_cpus} CPUs): wall times hold"
    return (
        f"busy machine (1-min load {load:.1f} on {num_cpus} CPUs): other work inflates the wall "
        "times and so the *_le_* checks; the *_cpu_s fields move less; rerun on a quiet machine"
    )


def main() -> None:
    """Parse arguments, measure, print and write JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--embd", type=int, default=1600)
    parser.add_argument("--heads", type=int, default=25)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--budget-bytes", type=int, default=None, help="default: halfway")
    parser.add_argument("--peaks-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--measure-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--trace", choices=TRACES, default="replicated", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="benchmarks/results/planner_speed.json")
    args = parser.parse_args()
    keys = ("layers", "embd", "heads", "seq", "vocab")
    shape = {key: getattr(args, key) for key in keys}
    if args.peaks_only:
        print(json.dumps(peaks(**shape)))
        return
    if args.measure_only:
        print(json.dumps(measure(**shape, budget_bytes=args.budget_bytes, trace=args.trace)))
        return
    found = halfway_budget(**shape) if args.budget_bytes is None else {}
    budget = args.budget_bytes or found["budget_bytes"]
    load_before = list(os.getloadavg())
    runs = {trace: measure_cold(shape, budget, trace) for trace in TRACES}
    result = {**runs["replicated"], "full_trace": runs["full"]}
    result.update({k: v for k, v in found.items() if k != "budget_bytes"})
    result["full_over_replicated_cpu"] = (
        runs["full"]["end_to_end_cpu_s"] / runs["replicated"]["end_to_end_cpu_s"]
    )
    result["plans_identical"] = runs["full"]["plan_sha256"] == runs["replicated"]["plan_sha256"]
    result["timing_note"] = timing_note(load_before[0], os.cpu_count() or 1)
    result["machine"] = machine_info()
    for key, value in result.items():
        print(f"{key}: {value}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
