"""Planner speed on a 48-layer GPT-2-XL-shaped model traced on meta tensors (issue 3, point 7).

Run: ``python -m benchmarks.planner_speed`` (``--layers``, ``--out`` to change the defaults).

Times the trace (Dynamo + AOTAutograd on meta tensors; nothing is computed) and the planning
after it (cost, min-cut, search, simulation), for a CUDA target at a budget halfway between the
smallest feasible peak and the keep-all peak. Targets: end to end <= 10 s, planning <= 2 s.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import torch

from benchmarks.planner_sweep import machine_info
from graphckpt.examples.gpt import GPT, GPTConfig
from graphckpt.options import DeviceSpec, PlanConfig
from passes.decompose import split_dropout
from passes.plan import plan_pass
from passes.trace import capture_joint_graphs


def measure(layers: int, embd: int, seq: int, vocab: int) -> dict[str, Any]:
    """Trace and plan one GPT-2-XL-shaped model; return the timings and plan numbers."""
    start = time.perf_counter()
    with torch.device("meta"):
        model = GPT(
            GPTConfig(
                vocab_size=vocab,
                block_size=seq,
                n_layer=layers,
                n_head=25,
                n_embd=embd,
                dropout=0.1,
            )
        )
        idx = torch.zeros(1, seq, dtype=torch.long)
    built = time.perf_counter()
    jg = capture_joint_graphs(model, (idx, idx))[0]
    split_dropout(jg)
    traced = time.perf_counter()
    config = PlanConfig(device=DeviceSpec.preset("cuda"))
    wide = plan_pass(jg, 1 << 50, config, torch.device("cuda"))
    plan_start = time.perf_counter()
    budget = (wide.min_peak_bytes + wide.max_peak_bytes) // 2
    plan = plan_pass(jg, budget, config, torch.device("cuda"))
    planned = time.perf_counter()
    end_to_end = (traced - start) + (planned - plan_start)
    return {
        "layers": layers,
        "forward_nodes": len(jg.forward),
        "backward_nodes": len(jg.backward),
        "build_s": built - start,
        "trace_s": traced - built,
        "plan_s": planned - plan_start,
        "end_to_end_s": end_to_end,
        "budget_bytes": budget,
        "predicted_peak_bytes": plan.predicted_peak_bytes,
        "min_peak_bytes": wide.min_peak_bytes,
        "max_peak_bytes": wide.max_peak_bytes,
        "plan_le_2s": planned - plan_start <= 2.0,
        "end_to_end_le_10s": end_to_end <= 10.0,
    }


def main() -> None:
    """Parse arguments, measure, print and write JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--out", default="benchmarks/results/planner_speed.json")
    args = parser.parse_args()
    result = measure(args.layers, embd=1600, seq=1024, vocab=50257)
    result["machine"] = machine_info()
    for key, value in result.items():
        print(f"{key}: {value}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
