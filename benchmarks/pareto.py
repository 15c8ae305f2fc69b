"""Every system side by side on each benchmark model, measured the same way in one run.

Systems (each a family of points, memory against extra cost):

- ``no checkpointing``: the plain eager step;
- ``checkpoint first k``: ``torch.utils.checkpoint`` on the first k layers, k = 1..all (k = all
  is every-layer checkpointing);
- ``DeepSpeed-style, every layer``: every layer under graphckpt's DeepSpeed-compatible runtime
  with CPU checkpointing and contiguous buffers (``benchmarks.baselines``);
- ``torch.compile activation_memory_budget``: inductor at several budget fractions;
- ``graphckpt auto_checkpoint``: eager rewritten graphs at budgets from the smallest feasible to
  the no-checkpoint peak;
- ``graphckpt backend``: ``torch.compile(backend=graphckpt.backend(...))`` at the same budgets.

For every point: the step's peak measured at the CPU allocator (``step_peak_bytes(method=
"allocator")``, so compiled kernels count; CUDA stats on a GPU), FLOPs from FlopCounterMode
(``graphckpt.flops.count_flops``, which compiled code runs under; extra = over the plain step),
whether gradients match the plain step's (``torch.testing.assert_close``, dropout active, same
seed), and the step time, all points of a model timed interleaved in the same run (median).
Writes ``pareto.json``; ``python -m benchmarks.pareto_report`` draws the charts and tables.

Run::

    python -m benchmarks.pareto [--models gpt unet hf-gpt2] [--budgets 4] \
        [--fractions 1.0 0.5 0.2 0.0] [--repeats 5] [--out benchmarks/results/pareto.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import graphckpt
from benchmarks.baselines import checkpoint_every_layer_deepspeed, checkpoint_first_k
from benchmarks.compile_variants import torch_inductor_backend
from benchmarks.measure import time_steps
from benchmarks.models import BENCH_MODEL_NAMES, BenchModel, bench_model
from benchmarks.planner_sweep import budget_points, machine_info
from graphckpt.flops import count_flops
from graphckpt.memory import step_peak_bytes

__all__ = ["SYSTEMS", "Point", "main", "sweep_model"]

SEED = 0
_MIB = 2**20
SYSTEMS = (
    "no checkpointing",
    "checkpoint first k",
    "DeepSpeed-style, every layer",
    "torch.compile activation_memory_budget",
    "graphckpt auto_checkpoint",
    "graphckpt backend",
)
"""The systems, in the order charts and tables list them."""


@dataclass
class Point:
    """One way to run a model's step, and what measuring it found."""

    system: str
    setting: str
    """k, the budget fraction, or the budget in MiB."""
    peak_bytes: int = 0
    extra_flops: int = 0
    step_s: float = 0.0
    grads_match: bool = False
    predicted_peak_bytes: int | None = None
    budget_bytes: int | None = None
    error: str | None = None
    step: Callable[[], None] | None = field(default=None, repr=False)


def _log(msg: str) -> None:
    print(msg, flush=True)


def _make_step(module: nn.Module, call: Callable[..., Any], inputs: tuple[Any, ...]) -> Any:
    params = list(module.parameters())

    def step() -> None:
        for p in params:
            p.grad = None
        call(*inputs).backward()

    return step


def _measure(
    point: Point,
    module: nn.Module,
    call: Callable[..., Any],
    bench: BenchModel,
    ref: dict[str, Any] | None,
) -> dict[str, torch.Tensor]:
    """Warm ``call`` up (compiles), then measure its peak, FLOPs and gradients into ``point``."""
    step = _make_step(module, call, bench.inputs)
    step()  # the first call compiles; its allocations are not the step's
    params = list(module.parameters())
    resident = [*params, *module.buffers(), *(x for x in bench.inputs if torch.is_tensor(x))]
    for p in params:
        p.grad = None
    torch.manual_seed(SEED)
    point.peak_bytes = step_peak_bytes(step, resident, params[0].device, method="allocator")
    grads = {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}
    torch.manual_seed(SEED)
    point.extra_flops = count_flops(step) - (ref["flops"] if ref else 0)
    if ref:
        try:
            torch.testing.assert_close(grads, ref["grads"])
            point.grads_match = True
        except AssertionError:
            point.grads_match = False
    point.step = step
    return grads


def _budget_points(bench: BenchModel, plain_peak: int, n: int) -> list[int]:
    probe = graphckpt.plan(copy.deepcopy(bench.model), bench.inputs, 1000.0)
    return budget_points(probe.min_peak_bytes, max(plain_peak, probe.min_peak_bytes), n)


_Make = Callable[[], tuple[nn.Module, Any]]


def _as_is(module: nn.Module) -> _Make:
    def make() -> tuple[nn.Module, Any]:
        return module, module

    return make


def _compiled(model: nn.Module, backend: Any) -> _Make:
    def make() -> tuple[nn.Module, Any]:
        return model, torch.compile(model, backend=backend)

    return make


def _add(
    points: list[Point], point: Point, make: _Make, bench: BenchModel, ref: dict[str, Any]
) -> None:
    """Build and measure one point; a failure is recorded on the point, not raised."""
    try:
        module, call = make()
        _measure(point, module, call, bench, ref)
    except Exception as e:  # a system that cannot run a setting is a result, not a crash
        point.error = f"{type(e).__name__}: {e}".splitlines()[0][:300]
    points.append(point)
    got = (
        f"ERROR {point.error}"
        if point.error
        else f"peak {point.peak_bytes / _MIB:.2f} MiB, +{point.extra_flops / 1e9:.3f} GFLOP, "
        f"grads {'ok' if point.grads_match else 'DIFFER'}"
    )
    _log(f"[{bench.name}] {point.system} {point.setting}: {got}")


def sweep_model(
    bench: BenchModel, *, n_budgets: int, fractions: Sequence[float], repeats: int
) -> dict[str, Any]:
    """Every system on one model; JSON-ready (the points, then a summary of each system)."""
    torch._dynamo.reset()
    model, inputs, n = bench.model, bench.inputs, len(bench.layers)
    plain = Point("no checkpointing", "-")
    ref_grads = _measure(plain, model, model, bench, None)
    ref = {"flops": plain.extra_flops, "grads": ref_grads}
    plain.extra_flops, plain.grads_match = 0, True
    points = [plain]
    for k in range(1, n + 1):
        m = checkpoint_first_k(bench, k)
        _add(points, Point("checkpoint first k", str(k)), _as_is(m), bench, ref)
    ds = checkpoint_every_layer_deepspeed(bench)
    _add(points, Point("DeepSpeed-style, every layer", str(n)), _as_is(ds), bench, ref)
    for f in fractions:
        backend = torch_inductor_backend(f)
        p = Point("torch.compile activation_memory_budget", f"{f:g}")
        _add(points, p, _compiled(model, backend), bench, ref)
    for budget in _budget_points(bench, plain.peak_bytes, n_budgets):
        gb, mib = budget / 2**30, f"{budget / _MIB:.2f} MiB"

        def eager(gb: float = gb) -> tuple[nn.Module, Any]:
            ck = graphckpt.auto_checkpoint(copy.deepcopy(model), gb, example_inputs=inputs)
            return ck, ck

        p = Point("graphckpt auto_checkpoint", mib, budget_bytes=budget)
        _add(points, p, eager, bench, ref)
        plans: list[graphckpt.Plan] = []
        backend = graphckpt.backend(budget_gb=gb, on_plan=plans.append)
        q = Point("graphckpt backend", mib, budget_bytes=budget)
        _add(points, q, _compiled(model, backend), bench, ref)
        if plans:
            q.predicted_peak_bytes = max(x.predicted_peak_bytes for x in plans)
        elif q.error is None:
            q.error = "no plan was made (the compile fell back to eager)"
            q.step = None
    runnable = [p for p in points if p.step is not None]
    steps = {str(i): p.step for i, p in enumerate(runnable) if p.step is not None}
    times = time_steps(steps, repeats, warmup=1)
    for i, p in enumerate(runnable):
        p.step_s = times[str(i)]
    _log(f"[{bench.name}] timed {len(runnable)} points x {repeats} interleaved")
    rows = [{k: v for k, v in asdict(p).items() if k != "step"} for p in points]
    return {"n_layers": n, "plain_step_s": plain.step_s, "points": rows}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the sweep on the chosen models and write the JSON."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(BENCH_MODEL_NAMES))
    parser.add_argument("--budgets", type=int, default=4)
    parser.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.5, 0.2, 0.0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/pareto.json")
    args = parser.parse_args(argv)
    unknown = [m for m in args.models if m not in BENCH_MODEL_NAMES]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {list(BENCH_MODEL_NAMES)}")
    result: dict[str, Any] = {
        "machine": machine_info(),
        "settings": vars(args),
        "models": {},
    }
    with torch._dynamo.config.patch(recompile_limit=256, accumulated_recompile_limit=4096):
        for name in args.models:
            result["models"][name] = sweep_model(
                bench_model(name),
                n_budgets=args.budgets,
                fractions=args.fractions,
                repeats=args.repeats,
            )
    torch._dynamo.reset()
    result["machine"]["loadavg_at_end"] = os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    _log(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
