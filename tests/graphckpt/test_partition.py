"""Tests of graphckpt/partition.py: slices, padding, and partitioned saves over 2 gloo ranks."""

from __future__ import annotations

import doctest
import importlib
import weakref

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import graphckpt.partition as partition_module
from graphckpt.checkpoint import Checkpointer
from graphckpt.config import CheckpointConfig
from graphckpt.errors import GraphCkptError
from graphckpt.partition import (
    MIN_PARTITION_ELEMENTS_PER_RANK,
    gather_tensor,
    partition_tensor,
    should_partition,
)
from tests.graphckpt._two_ranks import run_two_ranks


def test_without_a_group_the_whole_tensor_is_kept() -> None:
    x = torch.randn(3, 5)
    part = partition_tensor(x, None)
    assert part.world_size == 1 and part.shard.numel() == 15
    torch.testing.assert_close(gather_tensor(part), x, rtol=0, atol=0)


def test_only_large_floating_point_tensors_are_partitioned() -> None:
    big = 2 * MIN_PARTITION_ELEMENTS_PER_RANK
    assert should_partition(torch.zeros(big), 2)
    assert not should_partition(torch.zeros(big - 1), 2)
    assert not should_partition(torch.zeros(big, dtype=torch.bool), 2)
    assert not should_partition(torch.zeros(big, dtype=torch.int64), 2)
    assert not should_partition(torch.zeros(big), 1)


@settings(max_examples=40, deadline=None)
@given(numel=st.integers(1, 300), world=st.integers(2, 5))
def test_slices_of_all_ranks_tile_the_tensor(numel: int, world: int) -> None:
    # Each rank's slice, computed as that rank would, concatenated in rank order is the flat
    # tensor followed by zero padding: what the all-gather in gather_tensor rebuilds.
    x = torch.randn(numel)
    shards = []
    for rank in range(world):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(partition_module, "group_rank_and_size", lambda _g, r=rank: (r, world))
            part = partition_tensor(x, None)
        assert part.world_size == world and part.shard.numel() == -(-numel // world)
        shards.append(part.shard)
    tiled = torch.cat(shards)
    assert torch.equal(tiled[:numel], x)
    assert not tiled[numel:].any()


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(67, 67)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.linear(x)).masked_fill(mask, 0.0) + bias


def _grads(ckpt: Checkpointer, block: Block, x: torch.Tensor) -> tuple[list[torch.Tensor], int]:
    block.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    mask = torch.arange(67) % 3 == 0
    bias = torch.linspace(0, 1, 67).requires_grad_()
    h = ckpt(block, x, mask, bias)
    out = ckpt(block, h, mask, bias)
    saved = ckpt.saved_bytes()
    out.square().sum().backward()
    assert ckpt.saved_bytes() == 0
    grads = [x.grad, bias.grad, *(p.grad for p in block.parameters())]
    return [g.clone() for g in grads if g is not None], saved


def _partitioned_saves(rank: int) -> None:
    # Every rank holds the same activations, as tensor-parallel ranks do.
    torch.manual_seed(0)
    block = Block()
    x = torch.randn(5, 67)  # 335 elements: does not divide by 2, the tail is padded
    group = dist.group.WORLD

    # torch.equal, not assert_close: with a process group up, assert_close imports DTensor
    # (and sympy), which takes seconds.
    part = partition_tensor(x, group)
    assert part.shard.numel() == 168
    assert torch.equal(gather_tensor(part), x)

    want, whole_bytes = _grads(Checkpointer(), block, x)
    partitioned = Checkpointer(CheckpointConfig(partition_activations=True), group)
    got, part_bytes = _grads(partitioned, block, x)
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    # Two regions each save x (335 floats), the mask (67 bools) and the bias (67 floats, small).
    kept_whole = 2 * (67 + 67 * 4)
    assert whole_bytes == 2 * 335 * 4 + kept_whole
    assert part_bytes == 2 * 168 * 4 + kept_whole
    # Measured on this rank: the partitioned inputs take about half of their whole size.
    assert 0.45 < (part_bytes - kept_whole) / (whole_bytes - kept_whole) < 0.55

    # The region holds only the slice: the whole input is freed once the caller drops it.
    hidden = x * 1
    alive = weakref.ref(hidden)
    y = partitioned(block, hidden, torch.zeros(67, dtype=torch.bool), torch.zeros(67))
    del hidden
    assert alive() is None
    del y

    both = CheckpointConfig(partition_activations=True, cpu_checkpointing=True)
    offloaded = Checkpointer(both, group)
    got, _ = _grads(offloaded, block, x)
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))

    # By default the caller's tensor stays whole: passing it to a second region is fine.
    mask, bias = torch.zeros(67, dtype=torch.bool), torch.zeros(67)
    x1 = x.clone().requires_grad_()
    hidden = x1 * 1
    (
        partitioned(block, hidden, mask, bias) + partitioned(block, hidden, mask, bias)
    ).sum().backward()
    x2 = x.clone().requires_grad_()
    hidden = x2 * 1
    (block(hidden, mask, bias) + block(hidden, mask, bias)).sum().backward()
    assert x1.grad is not None and x2.grad is not None and torch.equal(x1.grad, x2.grad)

    # With release_inputs=True its storage is freed, and passing it again says so.
    release = CheckpointConfig(partition_activations=True, release_inputs=True)
    releasing = Checkpointer(release, group)
    hidden = x.clone().requires_grad_() * 1  # an intermediate: leaves are never released
    releasing(block, hidden, mask, bias)
    assert hidden.numel() == 0
    with pytest.raises(GraphCkptError, match=r"args\[0\].*partitioned.*released"):
        releasing(block, hidden, mask, bias)


@pytest.mark.distributed
def test_partitioned_saves_on_two_gloo_ranks() -> None:
    run_two_ranks(_partitioned_saves)


def test_docstring_examples_run() -> None:
    # importlib: the package re-exports names that shadow some of its submodules.
    result = doctest.testmod(importlib.import_module("graphckpt.partition"))
    assert result.attempted > 0 and result.failed == 0
