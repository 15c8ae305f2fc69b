"""Measurements shared by all benchmarks: peak memory, FLOPs, loss, gradients and step time.

Every candidate (plain, hand-checkpointed, graphckpt-planned) is measured by the same code
so that their numbers compare.
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from graphckpt.allocator import garbage_collection_paused
from graphckpt.flops import count_flops
from graphckpt.memory import MeasureMethod, resident_bytes, step_peak_bytes

__all__ = [
    "StepMeasurement",
    "grads_equal",
    "measure_step",
    "paired_ratio",
    "resident_bytes",
    "time_step_samples",
    "time_steps",
]


@dataclass(frozen=True)
class StepMeasurement:
    """What one training step (forward + backward) of a candidate did."""

    peak_bytes: int
    """Peak bytes on the device during the step: the model's parameters, buffers and inputs
    plus the step's own peak allocation (activations, gradients, temporaries)."""
    flops: int
    """FLOPs of forward and backward, recomputation included."""
    loss: float
    """The step's loss."""
    grads: dict[str, torch.Tensor]
    """Gradient of every parameter that received one, by parameter name (cloned)."""


def _zero_grads(model: nn.Module) -> None:
    for p in model.parameters():
        p.grad = None


def measure_step(
    model: nn.Module, inputs: tuple[Any, ...], *, seed: int, method: MeasureMethod = "tracker"
) -> StepMeasurement:
    """Run one training step of ``model`` twice, measuring its peak memory, then its FLOPs.

    Each run starts with ``.grad`` set to None and ``torch.manual_seed(seed)``, so dropout draws
    the same masks in both runs and across candidates. The peak is that of DESIGN.md's budget,
    for this model alone: parameters, buffers and tensor inputs, plus the largest amount the
    step allocates on top (other models alive in the process do not count). Loss and gradients
    are those of the first run; the model is left with the second run's gradients.

    Args:
        model: a module whose ``model(*inputs)`` is a scalar loss.
        inputs: the step's positional inputs.
        seed: the RNG seed set before each run.
        method: how the CPU peak is measured (``step_peak_bytes``): ``"tracker"`` or
            ``"allocator"`` (kernel scratch memory included).

    Returns:
        The :class:`StepMeasurement`.

    Example:
        >>> from graphckpt.examples import gpt_example
        >>> model, inputs = gpt_example(batch=2, seq=16, n_layer=2, n_embd=32)
        >>> m = measure_step(model, inputs, seed=0)
        >>> m.flops > 0 and m.peak_bytes > 0 and len(m.grads) > 0
        True
    """
    params = list(model.parameters())
    device = params[0].device if params else torch.device("cpu")
    tensor_inputs = [x for x in inputs if isinstance(x, torch.Tensor)]
    resident = [*params, *model.buffers(), *tensor_inputs]
    losses: list[torch.Tensor] = []

    def step() -> None:
        loss = model(*inputs)
        loss.backward()
        losses.append(loss.detach())

    _zero_grads(model)
    torch.manual_seed(seed)
    peak = step_peak_bytes(step, resident, device, method=method)
    grads = {
        name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None
    }
    _zero_grads(model)
    torch.manual_seed(seed)
    flops = count_flops(step)
    return StepMeasurement(peak_bytes=peak, flops=flops, loss=float(losses[0]), grads=grads)


def time_step_samples(
    candidates: dict[str, Callable[[], Any]],
    repeats: int,
    warmup: int = 1,
    *,
    min_seconds: float = 0.0,
) -> dict[str, list[float]]:
    """Wall-clock seconds of each zero-argument step in every timed round, interleaved.

    Runs ``warmup`` untimed rounds, then ``repeats`` timed rounds, or more when ``min_seconds``
    asks for it; each round calls every candidate once, in order, and every other round in
    reverse order (A, B, C, C, B, A, ...), so that drifts in machine load and whatever one step
    leaves behind for the next (caches, allocator state) affect all candidates alike. Sample
    ``i`` of every candidate comes from round ``i``, so samples of one round can be compared
    pairwise (:func:`paired_ratio`). As ``timeit`` does, the timed rounds run with Python's
    automatic garbage collection paused: a collection costs in proportion to every object the
    process holds (a benchmark's plans, graphs and compile caches), not to the step that
    happens to trigger it, so it would charge one candidate for all of them.

    Args:
        candidates: step functions by name, e.g. ``{"plain": step_a, "ckpt": step_b}``.
        repeats: timed rounds, >= 1.
        warmup: untimed rounds before them, >= 0.
        min_seconds: time at least this long in all: the number of rounds is raised to what
            fits, from the duration of the last warmup round (or the first timed one). Short
            steps then get many rounds, which a median needs on a noisy machine to resolve
            differences of a few percent.

    Returns:
        The seconds of each round, by candidate name.

    Example:
        >>> samples = time_step_samples({"sum": lambda: torch.ones(100).sum()}, repeats=3)
        >>> len(samples["sum"])
        3
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if not math.isfinite(min_seconds) or min_seconds < 0:
        raise ValueError(f"min_seconds must be a finite number >= 0, got {min_seconds}")
    round_seconds = 0.0
    for _ in range(warmup):
        start = time.perf_counter()
        for step in candidates.values():
            step()
        round_seconds = time.perf_counter() - start
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    names = list(candidates)
    gc.collect()
    with garbage_collection_paused():
        i = 0
        while i < repeats or (min_seconds and i * round_seconds < min_seconds):
            for name in names if i % 2 == 0 else reversed(names):
                step = candidates[name]
                start = time.perf_counter()
                step()
                samples[name].append(time.perf_counter() - start)
            if not round_seconds:
                round_seconds = sum(samples[name][-1] for name in names) or 1e-9
            i += 1
    return samples


def add_min_seconds_argument(parser: argparse.ArgumentParser, default: float = 10.0) -> None:
    """Add ``--min-seconds``, the shortest time each comparison is timed for
    (``time_step_samples``'s ``min_seconds``), to a benchmark's command line.

    Example:
        >>> p = argparse.ArgumentParser()
        >>> add_min_seconds_argument(p)
        >>> p.parse_args([]).min_seconds
        10.0
    """
    parser.add_argument(
        "--min-seconds",
        type=float,
        default=default,
        help="time each budget for at least this long (more rounds than --repeats if needed)",
    )


def time_steps(
    candidates: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1
) -> dict[str, float]:
    """Median wall-clock seconds of each zero-argument step, the candidates interleaved as in
    :func:`time_step_samples`.

    Example:
        >>> times = time_steps({"sum": lambda: torch.ones(100).sum()}, repeats=3, warmup=1)
        >>> sorted(times)
        ['sum']
    """
    samples = time_step_samples(candidates, repeats, warmup)
    return {name: statistics.median(s) for name, s in samples.items()}


def paired_ratio(a: list[float], b: list[float]) -> float:
    """Median over rounds of ``a[i] / b[i]``: the time ratio of two interleaved candidates.

    Each round's pair ran back to back, so a burst of load that slows one round slows both and
    cancels in the ratio, where it would shift a ratio of medians.

    Example:
        >>> paired_ratio([1.0, 2.0, 9.0], [2.0, 4.0, 3.0])
        0.5
    """
    if len(a) != len(b) or not a:
        raise ValueError(
            f"paired_ratio needs two equally long, non-empty lists, got {len(a)}, {len(b)}"
        )
    return statistics.median(x / y for x, y in zip(a, b))


def grads_equal(
    a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], *, rtol: float = 0.0, atol: float = 0.0
) -> bool:
    """Whether two gradient dicts have the same names and equal tensors.

    With the default tolerances the tensors must be bitwise equal (``torch.equal``);
    otherwise ``torch.allclose(x, y, rtol, atol)`` decides.

    Args:
        a: gradients by parameter name.
        b: gradients by parameter name.
        rtol: relative tolerance.
        atol: absolute tolerance.

    Returns:
        True if every gradient matches.

    Example:
        >>> g = {"w": torch.ones(3)}
        >>> grads_equal(g, {"w": torch.ones(3)}), grads_equal(g, {"w": torch.zeros(3)})
        (True, False)
    """
    if a.keys() != b.keys():
        return False
    for name, x in a.items():
        y = b[name]
        if x.shape != y.shape or x.dtype != y.dtype:
            return False
        same = torch.equal(x, y) if rtol == 0 and atol == 0 else torch.allclose(x, y, rtol, atol)
        if not same:
            return False
    return True
