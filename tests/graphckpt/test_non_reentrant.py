"""Tests of graphckpt/non_reentrant.py: saved tensors are dropped in forward and recomputed once
in backward; gradients equal the plain call (the kinds of inputs are covered in
test_checkpoint.py, which runs every case through this variant too)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from graphckpt.checkpoint import Checkpointer, non_reentrant_checkpoint
from graphckpt.config import CheckpointConfig
from graphckpt.errors import GraphCkptError
from graphckpt.memory import LiveTensorTracker


def test_forward_drops_saved_tensors_and_backward_recomputes_once() -> None:
    calls = []
    layers = nn.Sequential(*[nn.Sequential(nn.Linear(128, 128), nn.Tanh()) for _ in range(3)])

    def region(x: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return layers(x)

    x = torch.randn(32, 128, requires_grad=True)
    with LiveTensorTracker("cpu") as tracker:
        y = non_reentrant_checkpoint(region, x)
        kept = tracker.current_bytes - tracker.baseline_bytes
    assert kept == 32 * 128 * 4  # the output; the tanh outputs the graph saved are dropped
    y.sum().backward()
    assert len(calls) == 2
    got = [x.grad, *(p.grad for p in layers.parameters())]
    got = [g.clone() for g in got if g is not None]
    x.grad = None
    layers.zero_grad()
    layers(x).sum().backward()
    want = [x.grad, *(p.grad for p in layers.parameters())]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_autograd_grad_works() -> None:
    layer = nn.Linear(4, 4)
    x = torch.randn(2, 4, requires_grad=True)
    (gx,) = torch.autograd.grad(non_reentrant_checkpoint(layer, x).sum(), x)
    (want,) = torch.autograd.grad(layer(x).sum(), x)
    torch.testing.assert_close(gx, want, rtol=0, atol=0)
    assert layer.weight.grad is None


def test_offloaded_inputs_are_freed_after_backward() -> None:
    ckpt = Checkpointer(CheckpointConfig(cpu_checkpointing=True))
    x = torch.randn(2, 4, requires_grad=True)
    y = ckpt.non_reentrant(nn.Linear(4, 4), x)
    assert ckpt.saved_bytes("host") == 2 * 4 * 4
    y.sum().backward()
    assert ckpt.saved_bytes() == 0


def test_region_that_runs_differently_on_recompute_is_a_clear_error() -> None:
    calls = []

    def region(x: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return x.exp().exp() if len(calls) == 1 else x * 2

    y = non_reentrant_checkpoint(region, torch.randn(3, requires_grad=True))
    with pytest.raises(GraphCkptError, match="saved fewer tensors"):
        y.sum().backward()
