"""Tests of graphckpt/profile.py: per-region forward and recompute times, as a table."""

from __future__ import annotations

import doctest
import functools
import importlib
import time

import pytest
import torch
from torch import nn

from graphckpt.checkpoint import Checkpointer
from graphckpt.config import CheckpointConfig
from graphckpt.profile import RegionProfiler, region_identity


def test_region_identity_names_modules_methods_and_functions() -> None:
    layer = nn.Linear(2, 2)
    assert region_identity(layer) == (id(layer), "Linear")
    assert region_identity(layer.forward) == (id(layer), "Linear.forward")
    assert region_identity(functools.partial(layer.forward))[0] == id(layer)

    def block(x: torch.Tensor) -> torch.Tensor:
        return x

    assert region_identity(block)[1].endswith("block")


def test_times_accumulate_per_region_and_phase() -> None:
    prof = RegionProfiler()
    a, b = nn.ReLU(), nn.Tanh()
    cpu = torch.device("cpu")
    for _ in range(2):
        with prof.time(a, "forward", cpu):
            time.sleep(0.01)
    with prof.time(a, "recompute", cpu):
        time.sleep(0.02)
    with prof.time(b, "forward", cpu):
        pass
    first, second = prof.rows()
    assert (first.label, first.num_forward, first.num_recompute) == ("0:ReLU", 2, 1)
    assert first.forward_s >= 0.02 and first.recompute_s >= 0.02
    assert (second.label, second.num_forward, second.num_recompute) == ("1:Tanh", 1, 0)
    prof.reset()
    assert prof.rows() == []


def test_checkpointer_profile_table() -> None:
    ckpt = Checkpointer(CheckpointConfig(profile=True))
    layers = [nn.Linear(8, 8), nn.Linear(8, 8)]
    h = torch.randn(2, 8, requires_grad=True)
    for layer in layers:
        h = ckpt(layer, h)
    h.sum().backward()
    table = ckpt.profile_table()
    lines = table.splitlines()
    assert "forward ms" in lines[0] and "recompute ms" in lines[0]
    assert [line.split()[0] for line in lines[2:]] == ["0:Linear", "1:Linear"]
    assert all(line.split()[1] == "1" and line.split()[3] == "1" for line in lines[2:])
    assert ckpt.profiler is not None and all(r.recompute_s > 0 for r in ckpt.profiler.rows())


def test_profile_table_needs_profile_true() -> None:
    with pytest.raises(ValueError, match="profile=True"):
        Checkpointer().profile_table()


def test_docstring_examples_run() -> None:
    # importlib: the package re-exports names that shadow some of its submodules.
    result = doctest.testmod(importlib.import_module("graphckpt.profile"))
    assert result.attempted > 0 and result.failed == 0
