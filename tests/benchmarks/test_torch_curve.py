"""Tests of benchmarks/torch_curve.py: tuning torch's fraction to a budget on a non-monotone
curve (fractions pre-measured, so nothing compiles)."""

from __future__ import annotations

from benchmarks.compile_variants import Variant
from benchmarks.models import bench_gpt
from benchmarks.torch_curve import TorchCurve


def _curve(peaks: dict[float, int]) -> TorchCurve:
    """A curve whose fractions are already 'measured' (no compile happens for them)."""
    curve = TorchCurve(bench_gpt(batch=1, seq=8, n_layer=1, n_embd=16), {}, "t", initial=())
    for fraction, peak in peaks.items():
        curve.variants[fraction] = Variant(
            name=f"torch@{fraction:g}", step=lambda: None, compile_s=0.0, fraction=fraction,
            peak_bytes=peak,
        )  # fmt: skip
    return curve


def test_tune_picks_the_highest_fitting_peak_of_a_non_monotone_curve() -> None:
    curve = _curve({0.0: 90, 0.5: 60, 1.0: 80})
    chosen = curve.tune(85, bisect_steps=0)
    assert chosen is not None and chosen.fraction == 1.0
    chosen = curve.tune(70, bisect_steps=0)
    assert chosen is not None and chosen.fraction == 0.5
    assert curve.tune(50, bisect_steps=0) is None


def test_bisection_goes_up_from_the_largest_fit_or_down_from_the_lowest_peak() -> None:
    curve = _curve({0.0: 90, 0.5: 60, 1.0: 80})
    assert curve._next_fraction(70) == 0.75  # 0.5 fits, 1.0 does not
    assert curve._next_fraction(50) == 0.25  # nothing fits: left of the lowest peak
    assert curve._next_fraction(100) is None  # 1.0 fits: nothing larger to try
