"""Compiled training-step variants for the compile benchmark: build, measure, compare.

A variant is one way to run a benchmark model's step (eager, ``graphckpt.backend`` at a budget,
torch.compile at an ``activation_memory_budget`` fraction), compiled by its first call and
measured at the allocator level, so that graphckpt and torch are measured by the same code.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

import graphckpt
from benchmarks.models import BenchModel
from graphckpt.errors import InfeasibleBudgetError
from graphckpt.memory import step_peak_bytes

__all__ = [
    "Variant",
    "compile_variant",
    "graphckpt_min_feasible",
    "measure_variant",
    "torch_inductor_backend",
]


@dataclass(eq=False)
class Variant:
    """One compiled way to run a model's training step, and what measuring it found."""

    name: str
    step: Callable[[], None]
    """Sets every ``.grad`` to None, then runs forward and backward once."""
    compile_s: float
    """Seconds of the first call (compile and one step)."""
    fraction: float | None = None
    """torch's ``activation_memory_budget`` (torch variants only)."""
    predicted_peak_bytes: int | None = None
    """The largest predicted peak of graphckpt's plans (graphckpt variants only)."""
    peak_bytes: int = 0
    """Measured step peak (parameters, buffers and inputs resident), at the allocator level."""
    grads: dict[str, torch.Tensor] = field(default_factory=dict)
    grads_match: bool | None = None
    """Whether the gradients pass ``torch.testing.assert_close`` against the reference's."""
    grads_max_abs_diff: float | None = None


def torch_inductor_backend(fraction: float, *, eager_rng: bool = False) -> Callable[..., Any]:
    """torch.compile's inductor backend with ``activation_memory_budget=fraction``.

    The functorch config is patched only for the compile call (the partitioner reads it
    there), and AOTAutograd's cache is off so each fraction is partitioned afresh. Each call
    returns a new backend object, so Dynamo keeps one cache entry per fraction.

    ``eager_rng=True`` also sets inductor's ``fallback_random`` for the compile: random ops
    draw from torch's generator in eager's order, as ``graphckpt.backend(exact_rng=True)``
    does, so the forward's dropout masks equal the eager model's.

    Example:
        >>> backend = torch_inductor_backend(0.5)  # torch.compile(model, backend=backend)
    """
    import torch._functorch.config as functorch_config

    def inductor_at_fraction(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        from torch._inductor.compile_fx import compile_fx

        with functorch_config.patch(activation_memory_budget=fraction, enable_autograd_cache=False):
            # config_patches, not a patch around the call: they also cover the backward graph,
            # which AOTAutograd compiles lazily, at the first backward.
            return compile_fx(gm, example_inputs, config_patches={"fallback_random": eager_rng})

    return inductor_at_fraction


def compile_variant(name: str, bench: BenchModel, backend: Any) -> Variant:
    """Compile ``bench.model`` with ``backend`` (None: eager) by running one step.

    Every variant shares the one model instance, so they all see the same parameters.
    """
    call = bench.model if backend is None else torch.compile(bench.model, backend=backend)
    params = list(bench.model.parameters())

    def step() -> None:
        for p in params:
            p.grad = None
        call(*bench.inputs).backward()

    start = time.perf_counter()
    step()
    v = Variant(name=name, step=step, compile_s=time.perf_counter() - start)
    plans = getattr(backend, "plans", None)
    if plans:
        v.predicted_peak_bytes = max(p.predicted_peak_bytes for p in plans)
    for p in params:
        p.grad = None
    return v


def _compare_grads(v: Variant, ref: dict[str, torch.Tensor]) -> None:
    diffs = [(v.grads[k] - g).abs().max().item() for k, g in ref.items() if k in v.grads]
    v.grads_max_abs_diff = max(diffs, default=0.0)
    try:
        torch.testing.assert_close(v.grads, ref)
    except AssertionError:
        v.grads_match = False
    else:
        v.grads_match = True


def measure_variant(
    v: Variant, bench: BenchModel, ref_grads: dict[str, torch.Tensor] | None, *, seed: int
) -> None:
    """Measure one step of ``v`` (seeded): its allocator-level peak and gradients, in place.

    The peak counts the model's parameters, buffers and inputs plus the most the step allocates
    above what was allocated when it started (``step_peak_bytes(method="allocator")``).
    """
    model = bench.model
    params = list(model.parameters())
    resident = [*params, *model.buffers(), *(x for x in bench.inputs if torch.is_tensor(x))]
    for p in params:
        p.grad = None  # outside the measured step: the profiler cannot size older blocks
    torch.manual_seed(seed)
    v.peak_bytes = step_peak_bytes(v.step, resident, params[0].device, method="allocator")
    v.grads = {
        n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None
    }
    for p in params:
        p.grad = None
    if ref_grads is not None:
        _compare_grads(v, ref_grads)


def _find_infeasible(e: BaseException | None) -> InfeasibleBudgetError | None:
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, InfeasibleBudgetError):
            return e
        seen.add(id(e))
        e = getattr(e, "inner_exception", None) or e.__cause__ or e.__context__
    return None


def graphckpt_min_feasible(bench: BenchModel, *, exact_rng: bool = True) -> int:
    """The smallest budget (bytes) graphckpt's compile backend can plan ``bench`` under.

    Compiles with a one-byte budget and reads the ``InfeasibleBudgetError`` Dynamo wraps.
    """
    try:
        be = graphckpt.backend(budget_gb=2.0**-30, exact_rng=exact_rng)
        compile_variant("graphckpt@1B", bench, be)
    except Exception as e:
        err = _find_infeasible(e)
        if err is None:
            raise
        return err.min_feasible_bytes
    raise AssertionError("a one-byte budget was planned; the planner ignores its budget")
