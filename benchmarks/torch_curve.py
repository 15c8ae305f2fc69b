"""torch.compile's measured peak as a function of ``activation_memory_budget``, and tuning it.

The compile benchmark compares graphckpt's compiled step with torch.compile's at the same
measured peak. torch's knob is a fraction, not bytes, and its peak is not monotone in it, so
:class:`TorchCurve` compiles and measures fractions lazily and bisects towards a budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from benchmarks.compile_variants import (
    Variant,
    compile_variant,
    measure_variant,
    torch_inductor_backend,
)
from benchmarks.models import BenchModel

__all__ = ["INITIAL_FRACTIONS", "TorchCurve"]

INITIAL_FRACTIONS: tuple[float, ...] = (0.0, 0.5, 1.0)
"""The fractions every curve measures first."""
_MIB = 2**20


class TorchCurve:
    """torch.compile's measured peak per ``activation_memory_budget`` fraction, compiled lazily.

    ``variants`` maps each fraction tried to its compiled :class:`Variant`; the points are the
    curve the JSON records (not monotone in general). Each fraction's gradients are checked
    against ``ref_grads``: a plain torch.compile's (same seed, so the same dropout masks) or,
    with ``eager_rng`` (torch's generator, ``fallback_random``), the eager model's. Every
    measured step is seeded with ``seed``.
    """

    def __init__(
        self,
        bench: BenchModel,
        ref_grads: dict[str, torch.Tensor],
        tag: str,
        initial: Sequence[float] = INITIAL_FRACTIONS,
        *,
        eager_rng: bool = False,
        seed: int = 0,
    ) -> None:
        self.bench = bench
        self.ref_grads = ref_grads
        self.tag = tag
        self.initial = tuple(initial)
        self.eager_rng = eager_rng
        self.seed = seed
        self.variants: dict[float, Variant] = {}

    def get(self, fraction: float) -> Variant:
        """The compiled and measured variant at ``fraction`` (compiled on first use)."""
        if fraction not in self.variants:
            backend = torch_inductor_backend(fraction, eager_rng=self.eager_rng)
            v = compile_variant(f"torch@{fraction:g}", self.bench, backend)
            v.fraction = fraction
            measure_variant(v, self.bench, self.ref_grads, seed=self.seed)
            self.variants[fraction] = v
            print(
                f"[{self.tag}] torch fraction {fraction:g}: peak {v.peak_bytes / _MIB:.2f} MiB, "
                f"grads {'ok' if v.grads_match else 'DIFFER'} (compiled in {v.compile_s:.0f} s)",
                flush=True,
            )
        return self.variants[fraction]

    def fitting(self, budget: int) -> list[float]:
        """Fractions tried so far whose measured peak is at or below ``budget``."""
        return [f for f, v in self.variants.items() if v.peak_bytes <= budget]

    def tune(self, budget: int, bisect_steps: int) -> Variant | None:
        """The variant whose peak is the highest at or below ``budget``, after bisecting.

        Each step tries the midpoint between the largest fitting fraction and the next larger
        one tried, or, while none fits, between the lowest-peak fraction and its lower
        neighbour. The curve is not monotone, so this finds a fitting point, not necessarily the
        best one. None when no fraction tried fits.
        """
        for f in self.initial:
            self.get(f)
        for _ in range(bisect_steps):
            mid = self._next_fraction(budget)
            if mid is None:
                break
            self.get(mid)
        fits = self.fitting(budget)
        if not fits:
            return None
        best = max(fits, key=lambda f: (self.variants[f].peak_bytes, f))
        return self.variants[best]

    def _next_fraction(self, budget: int) -> float | None:
        fits = self.fitting(budget)
        tried = sorted(self.variants)
        if fits:
            lo = max(fits)
            above = [f for f in tried if f > lo]
            pair = (lo, above[0]) if above else None
        else:
            lowest = min(tried, key=lambda f: self.variants[f].peak_bytes)
            below = [f for f in tried if f < lowest]
            above = [f for f in tried if f > lowest]
            pair = (below[-1], lowest) if below else ((lowest, above[0]) if above else None)
        if pair is None:
            return None
        mid = round((pair[0] + pair[1]) / 2, 4)
        return None if mid in self.variants else mid

    def points(self) -> list[dict[str, Any]]:
        """The curve: fraction, measured peak, compile seconds and gradient check, by fraction."""
        return [
            {
                "fraction": f,
                "peak_bytes": v.peak_bytes,
                "compile_s": v.compile_s,
                "grads_match": v.grads_match,
                "grads_max_abs_diff": v.grads_max_abs_diff,
            }
            for f, v in sorted(self.variants.items())
        ]
