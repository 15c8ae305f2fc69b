"""``graphckpt plan``: plan a model under a budget and show what it costs, from the terminal.

With no model it plans the built-in example GPT. It prints the plan table, the predicted peak,
the measured peak of one real training step and the extra FLOPs recompute costs.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

__all__ = ["main"]

_MIB = float(1 << 20)
_DEFAULT_MODEL = "graphckpt.examples:gpt_example"


class CliError(Exception):
    """A problem with the command line, reported as one line without a traceback."""


@contextmanager
def _stage(label: str, index: int, total: int) -> Iterator[None]:
    """Show progress of a long stage: its label while it runs, its time when it ends."""
    sys.stderr.write(f"[{index}/{total}] {label} ...")
    sys.stderr.flush()
    start = time.perf_counter()
    yield
    sys.stderr.write(f" done in {time.perf_counter() - start:.1f}s\n")


def _load_factory(spec: str) -> Callable[[], Any]:
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise CliError(f"--model must look like package.module:factory, got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise CliError(f"cannot import {module_name!r} for --model: {e}") from e
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise CliError(f"{module_name!r} has no callable {attr!r} (given as --model {spec})")
    return factory


def _build(spec: str, device: str) -> tuple[torch.nn.Module, tuple[Any, ...]]:
    made = _load_factory(spec)()
    if not (isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], torch.nn.Module)):
        raise CliError(f"--model factory {spec!r} must return (model, example_inputs)")
    model, inputs = made
    inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    moved = tuple(x.to(device) if isinstance(x, torch.Tensor) else x for x in inputs)
    return model.to(device), moved


def _measure(model: torch.nn.Module, inputs: tuple[Any, ...], device: str) -> tuple[int, int]:
    from graphckpt.flops import count_flops
    from graphckpt.memory import step_peak_bytes

    def step() -> None:
        for p in model.parameters():
            p.grad = None
        torch.manual_seed(0)
        loss = model(*inputs)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise CliError("the model must return a scalar loss so one training step can run")
        loss.backward()

    step()  # warm: the first call plans
    resident = [*model.parameters(), *model.buffers()]
    resident += [x for x in inputs if isinstance(x, torch.Tensor)]
    peak = step_peak_bytes(step, resident, device)
    return peak, count_flops(step)


def _plan_command(args: argparse.Namespace) -> int:
    import graphckpt
    from graphckpt.api import budget_to_bytes

    device = args.device
    if args.budget_gb is not None:
        budget_to_bytes(args.budget_gb)  # reject a bad budget before any work
    if device == "cuda" and not torch.cuda.is_available():
        raise CliError("--device cuda was given but no CUDA device is available")
    with _stage(f"building {args.model}", 1, 4):
        model, inputs = _build(args.model, device)
    budget_gb = args.budget_gb
    if budget_gb is None:
        with _stage("tracing to find the feasible budgets", 2, 4):
            wide = graphckpt.plan(model, inputs, budget_gb=1e6)
        budget_gb = (wide.min_peak_bytes + wide.max_peak_bytes) / 2 / 2**30
        sys.stderr.write(
            f"      no --budget-gb: using {budget_gb * 1024:.1f} MiB, halfway between the "
            f"feasible {wide.min_peak_bytes / _MIB:.1f} and no-recompute "
            f"{wide.max_peak_bytes / _MIB:.1f} MiB\n"
        )
    with _stage("measuring the unmodified step", 3, 4):
        base_peak, base_flops = _measure(model, inputs, device)
    with _stage("planning and running the planned step", 4, 4):
        planned = graphckpt.auto_checkpoint(model, budget_gb, example_inputs=inputs)
        peak, flops = _measure(planned, inputs, device)
    plan = planned.plan
    assert plan is not None
    print(plan.table())
    extra = (flops - base_flops) / base_flops if base_flops else 0.0
    print(
        f"predicted peak {plan.predicted_peak_bytes / _MIB:.1f} MiB | measured peak "
        f"{peak / _MIB:.1f} MiB (unplanned {base_peak / _MIB:.1f} MiB) | extra FLOPs "
        f"{(flops - base_flops) / 1e9:.3f} GFLOP ({extra:+.1%})"
    )
    if args.json:
        with open(args.json, "w") as f:
            f.write(plan.to_json())
        print(f"plan written to {args.json}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="graphckpt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan", help="plan a model under a memory budget and measure one step")
    p.add_argument(
        "--model",
        default=_DEFAULT_MODEL,
        help="package.module:factory returning (model, example_inputs); the model returns a "
        "scalar loss (default: the built-in example GPT)",
    )
    p.add_argument("--budget-gb", type=float, default=None, help="budget in GiB (2**30 bytes)")
    p.add_argument("--json", default=None, help="also write the plan as JSON to this path")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``graphckpt`` and ``python -m graphckpt``; returns the exit status."""
    from graphckpt.errors import GraphCkptError

    args = _parser().parse_args(argv)
    try:
        return _plan_command(args)
    except (CliError, GraphCkptError, ValueError, TypeError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        sys.stderr.write(f"\ngraphckpt: error: {first}\n")
        return 2
