"""Tests of passes/headroom.py: the room under a budget, and the smallest budget for a peak."""

from __future__ import annotations

import doctest
import importlib

from graphckpt.options import PlanConfig
from passes.headroom import (
    COMPILED_HEADROOM_FRACTION,
    HEADROOM_BYTES,
    headroom_bytes,
    smallest_budget,
)


def test_smallest_budget_is_the_least_whose_room_holds_the_peak() -> None:
    for config in (PlanConfig(), PlanConfig(fused_pointwise=True)):
        for peak in (0, 1000, 31 << 20, 123_456_789):
            budget = smallest_budget(peak, config)
            assert budget - headroom_bytes(budget, config) >= peak
            assert (budget - 1) - headroom_bytes(budget - 1, config) < peak
    assert headroom_bytes(100 << 20, PlanConfig()) == HEADROOM_BYTES
    compiled = headroom_bytes(100 << 20, PlanConfig(fused_pointwise=True)) - HEADROOM_BYTES
    assert compiled >= COMPILED_HEADROOM_FRACTION * (100 << 20)


def test_docstring_examples() -> None:
    module = importlib.import_module("passes.headroom")
    assert doctest.testmod(module).failed == 0
