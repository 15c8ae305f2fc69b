"""Tests of graphckpt/recompute.py: which modules a region is seen to run, BatchNorm statistics
kept from a second update, and autocast state replayed."""

from __future__ import annotations

import doctest
import functools
import importlib

import torch
from torch import nn

from graphckpt.recompute import AutocastState, frozen_running_stats, module_roots


def test_module_roots_sees_modules_methods_closures_partials_and_arguments() -> None:
    a, b, c, d = nn.Linear(2, 2), nn.ReLU(), nn.Tanh(), nn.GELU()

    def closure(x: torch.Tensor) -> torch.Tensor:
        return b(x)

    assert module_roots(a, []) == [a]
    assert module_roots(a.forward, []) == [a]
    assert module_roots(closure, []) == [b]
    assert module_roots(functools.partial(closure), [c]) == [c, b]
    assert module_roots(lambda x, m=d: m(x), []) == [d]
    assert module_roots(torch.relu, [1, None]) == []


def test_frozen_running_stats_keeps_the_statistics_and_swaps_back_the_buffers() -> None:
    bn = nn.BatchNorm1d(3)
    mean, var, count = bn.running_mean, bn.running_var, bn.num_batches_tracked
    want = [t.clone() for t in (mean, var, count)]
    with frozen_running_stats([nn.Sequential(bn)]):
        bn(torch.randn(4, 3))
        assert int(bn.num_batches_tracked) == 1
    assert bn.running_mean is mean and bn.running_var is var and bn.num_batches_tracked is count
    for got, expected in zip((mean, var, count), want):
        assert torch.equal(got, expected)


def test_frozen_running_stats_leaves_eval_mode_batchnorm_alone() -> None:
    bn = nn.BatchNorm1d(3).eval()
    mean = bn.running_mean
    with frozen_running_stats([bn]):
        assert bn.running_mean is mean


def test_autocast_state_is_captured_and_applied() -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        state = AutocastState.capture()
    assert state.cpu_enabled and state.cpu_dtype == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu")
    with state.apply():
        assert torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
    off = AutocastState.capture()
    with torch.autocast("cpu", dtype=torch.bfloat16), off.apply():
        assert not torch.is_autocast_enabled("cpu")


GLOBAL_BN = nn.BatchNorm1d(2)


def _reads_a_global(x: torch.Tensor) -> torch.Tensor:
    return GLOBAL_BN(x)


def test_module_roots_sees_modules_named_as_globals() -> None:
    assert module_roots(_reads_a_global, []) == [GLOBAL_BN]


def test_docstring_examples_run() -> None:
    # importlib: the package re-exports names that shadow some of its submodules.
    result = doctest.testmod(importlib.import_module("graphckpt.recompute"))
    assert result.attempted > 0 and result.failed == 0
