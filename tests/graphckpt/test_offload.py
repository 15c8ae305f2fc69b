"""Tests of graphckpt/offload.py: host copies come back equal; checkpoints with
cpu_checkpointing=True give the gradients of the plain call."""

from __future__ import annotations

import doctest
import importlib
import weakref

import pytest
import torch
from torch import nn

from graphckpt.checkpoint import Checkpointer
from graphckpt.config import CheckpointConfig
from graphckpt.offload import OffloadedTensor, OffloadEngine

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _stack(device: str) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Linear(16, 16), nn.GELU()) for _ in range(3)]).to(
        device
    )


def _grads(model: nn.Module, x: torch.Tensor, ckpt: Checkpointer | None) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    h = x
    for layer in model:
        h = layer(h) if ckpt is None else ckpt(layer, h)
    h.square().sum().backward()
    assert x.grad is not None
    return [x.grad, *(p.grad for p in model.parameters() if p.grad is not None)]


def test_host_copy_is_independent_of_the_original() -> None:
    engine = OffloadEngine()
    x = torch.randn(5, 3)
    handle = engine.offload(x)
    want = x.clone()
    x.add_(1)
    assert handle.nbytes == 60
    torch.testing.assert_close(engine.reload(handle), want, rtol=0, atol=0)


def test_offloaded_checkpoints_match_the_plain_call_on_cpu() -> None:
    model = _stack("cpu")
    x = torch.randn(4, 16)
    ckpt = Checkpointer(CheckpointConfig(cpu_checkpointing=True))
    got = _grads(model, x, ckpt)
    want = _grads(model, x, None)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_offloaded_bytes_are_counted_as_host_bytes() -> None:
    ckpt = Checkpointer(CheckpointConfig(cpu_checkpointing=True))
    x = torch.randn(4, 16, requires_grad=True)
    mask = torch.ones(4, 16, dtype=torch.bool)
    y = ckpt(lambda a, m: a.masked_fill(m, 0.0), x, mask)
    assert ckpt.saved_bytes("host") == 4 * 16 * 4  # the float input; the mask stays
    assert ckpt.saved_bytes("device") == 4 * 16
    y.sum().backward()
    assert ckpt.saved_bytes() == 0


@cuda
def test_offload_round_trip_on_cuda_uses_pinned_memory() -> None:
    engine = OffloadEngine()
    x = torch.randn(256, 256, device="cuda")
    handle = engine.offload(x)
    assert handle.host.is_pinned() and handle.host.device.type == "cpu"
    engine.prefetch(handle)
    back = engine.reload(handle)
    assert back.device == x.device
    torch.testing.assert_close(back, x, rtol=0, atol=0)


@cuda
def test_offloaded_checkpoints_match_the_plain_call_on_cuda() -> None:
    model = _stack("cuda")
    x = torch.randn(4, 16, device="cuda")
    ckpt = Checkpointer(CheckpointConfig(cpu_checkpointing=True))
    got = _grads(model, x, ckpt)
    want = _grads(model, x, None)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def _prefetch_order(device: str) -> None:
    model = _stack(device)
    ckpt = Checkpointer(CheckpointConfig(cpu_checkpointing=True))
    inputs = [torch.randn(4, 16, device=device, requires_grad=True)]
    for layer in model:
        inputs.append(ckpt(layer, inputs[-1]))
    engine = ckpt._storage.offload
    assert engine is not None
    started: list[torch.Tensor] = []
    prefetch = engine.prefetch

    def spy(handle: OffloadedTensor) -> None:
        if handle.prefetched is None:
            started.append(handle.host.to(device))
        prefetch(handle)

    engine.prefetch = spy  # type: ignore[method-assign]
    inputs[-1].sum().backward()
    # When region 3's backward starts, region 2's input starts coming back, then region 1's;
    # on CUDA region 3's own input is fetched first, on demand.
    want = inputs[:2][::-1] if device == "cpu" else inputs[:3][::-1]
    assert len(started) == len(want)
    for got, expected in zip(started, want):
        torch.testing.assert_close(got, expected.detach(), rtol=0, atol=0)


def test_backward_of_a_region_prefetches_the_region_before_it() -> None:
    _prefetch_order("cpu")


@cuda
def test_backward_of_a_region_prefetches_the_region_before_it_on_cuda() -> None:
    _prefetch_order("cuda")


@pytest.mark.parametrize("non_reentrant", [False, True])
def test_region_keeps_no_reference_to_an_offloaded_input(non_reentrant: bool) -> None:
    ckpt = Checkpointer(CheckpointConfig(cpu_checkpointing=True))
    layer = nn.Linear(16, 16)
    x = torch.randn(4, 16, requires_grad=True)
    hidden = x * 2
    alive = weakref.ref(hidden)
    y = ckpt.non_reentrant(layer, hidden) if non_reentrant else ckpt(layer, hidden)
    del hidden
    assert alive() is None  # only the host copy is left
    y.sum().backward()
    assert x.grad is not None


def test_docstring_examples_run() -> None:
    # importlib: the package re-exports names that shadow some of its submodules.
    result = doctest.testmod(importlib.import_module("graphckpt.offload"))
    assert result.attempted > 0 and result.failed == 0
