"""Tests of graphckpt/buffers.py: rows are allocated once and reused across steps, and
checkpoints that save into them give the gradients of the plain call."""

from __future__ import annotations

import doctest
import gc
import importlib
import weakref

import pytest
import torch
from torch import nn

from graphckpt.buffers import ContiguousBuffers
from graphckpt.checkpoint import Checkpointer
from graphckpt.config import CheckpointConfig
from graphckpt.errors import GraphCkptError


def test_rows_are_taken_and_given_back() -> None:
    pool = ContiguousBuffers(2)
    a, b = pool.acquire(), pool.acquire()
    assert {a.slot, b.slot} == {0, 1}
    with pytest.raises(GraphCkptError, match="number_checkpoints=2"):
        pool.acquire()
    a.release()
    a.release()  # idempotent
    assert pool.acquire().slot == a.slot  # the new lease is dropped at once...
    gc.collect()
    assert pool.acquire().slot == a.slot  # ...and its row comes back when collected


def test_store_and_load_use_one_buffer_per_position_and_shape() -> None:
    pool = ContiguousBuffers(3)
    x, y = torch.randn(2, 5), torch.randn(7)
    for _ in range(3):
        lease = pool.acquire()
        saved_x, saved_y = pool.store(lease, 0, x), pool.store(lease, 1, y)
        torch.testing.assert_close(pool.load(lease, saved_x), x, rtol=0, atol=0)
        torch.testing.assert_close(pool.load(lease, saved_y), y, rtol=0, atol=0)
        lease.release()
    assert pool.num_allocations == 2
    assert pool.nbytes == 3 * (10 + 7) * 4


def test_reset_reclaims_rows_and_stale_leases_fail_clearly() -> None:
    pool = ContiguousBuffers(1)
    lease = pool.acquire()
    saved = pool.store(lease, 0, torch.ones(3))
    pool.reset()
    assert not lease.valid
    with pytest.raises(GraphCkptError, match="reclaimed"):
        pool.load(lease, saved)
    pool.acquire()  # the row is free again


def _train_steps(ckpt: Checkpointer | None, num_steps: int) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(16, 16), nn.Tanh()) for _ in range(3)])
    grads = []
    for step in range(num_steps):
        model.zero_grad(set_to_none=True)
        h = torch.randn(4, 16, generator=torch.Generator().manual_seed(step))
        h.requires_grad_()
        x = h
        for layer in model:
            h = layer(h) if ckpt is None else ckpt(layer, h)
        h.square().sum().backward()
        assert x.grad is not None
        grads += [x.grad, *(p.grad for p in model.parameters() if p.grad is not None)]
    return grads


@pytest.mark.parametrize("host", [False, True])
def test_contiguous_checkpoints_match_the_plain_call_and_allocate_once(host: bool) -> None:
    config = CheckpointConfig(
        contiguous_memory_optimization=True, number_checkpoints=3, cpu_checkpointing=host
    )
    ckpt = Checkpointer(config)
    got = _train_steps(ckpt, num_steps=3)
    want = _train_steps(None, num_steps=3)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    assert ckpt.buffers is not None
    assert ckpt.buffers.num_allocations == 1  # one position, one shape: one buffer, once
    assert ckpt.buffers.nbytes == 3 * 4 * 16 * 4
    assert ckpt.buffers.host is host


def test_too_few_rows_is_a_clear_error() -> None:
    ckpt = Checkpointer(CheckpointConfig(contiguous_memory_optimization=True, number_checkpoints=2))
    with pytest.raises(GraphCkptError, match="raise number_checkpoints"):
        _train_steps(ckpt, num_steps=1)


def test_contiguous_buffers_need_number_checkpoints() -> None:
    with pytest.raises(ValueError, match="number_checkpoints"):
        CheckpointConfig(contiguous_memory_optimization=True)


def test_reset_lets_forwards_without_backward_reuse_the_rows() -> None:
    ckpt = Checkpointer(CheckpointConfig(contiguous_memory_optimization=True, number_checkpoints=1))
    layer = nn.Linear(4, 4)
    x = torch.randn(2, 4, requires_grad=True)
    y = ckpt(layer, x)
    ckpt.reset()
    z = ckpt(layer, x)  # would need a second row without the reset
    z.sum().backward()
    with pytest.raises(GraphCkptError, match="reclaimed"):
        y.sum().backward()


def test_region_keeps_no_reference_to_a_buffered_input() -> None:
    ckpt = Checkpointer(CheckpointConfig(contiguous_memory_optimization=True, number_checkpoints=1))
    x = torch.randn(2, 4, requires_grad=True)
    hidden = x * 2
    alive = weakref.ref(hidden)
    y = ckpt(nn.Linear(4, 4), hidden)
    del hidden
    assert alive() is None  # only the buffer row holds its values
    y.sum().backward()


def test_docstring_examples_run() -> None:
    # importlib: the package re-exports names that shadow some of its submodules.
    result = doctest.testmod(importlib.import_module("graphckpt.buffers"))
    assert result.attempted > 0 and result.failed == 0


def test_nested_checkpoints_do_not_overwrite_a_row_in_use() -> None:
    ckpt = Checkpointer(CheckpointConfig(contiguous_memory_optimization=True, number_checkpoints=2))
    inner, outer = nn.Linear(8, 8), nn.Linear(8, 8)

    def region(h: torch.Tensor) -> torch.Tensor:
        return ckpt(inner, torch.tanh(outer(h)))

    x = torch.randn(3, 8, requires_grad=True)
    ckpt(region, x * 1).square().sum().backward()
    got = [x.grad, inner.weight.grad, outer.weight.grad]
    got = [g.clone() for g in got if g is not None]
    x.grad, inner.weight.grad, outer.weight.grad = None, None, None
    inner(torch.tanh(outer(x * 1))).square().sum().backward()
    want = [x.grad, inner.weight.grad, outer.weight.grad]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
