"""Tests of graphckpt/parallel.py: auto_checkpoint with DDP and FSDP2 over 2 gloo ranks."""

from __future__ import annotations

import copy
import doctest
import importlib

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import graphckpt
from graphckpt.examples import gpt_example
from graphckpt.parallel import UnsupportedWrappingError, sharded_submodules
from tests.graphckpt._two_ranks import run_two_ranks

Batch = tuple[torch.Tensor, torch.Tensor]


def test_plain_models_have_no_sharded_submodules() -> None:
    assert sharded_submodules(nn.Sequential(nn.Linear(2, 2), nn.ReLU())) == []


def test_docstring_examples_run() -> None:
    result = doctest.testmod(importlib.import_module("graphckpt.parallel"))
    assert result.attempted > 0 and result.failed == 0


def _setup() -> tuple[nn.Module, list[Batch], dict[str, torch.Tensor], float]:
    """A tiny GPT (no dropout), one batch per rank, the undistributed gradients of the mean loss
    over both batches, and the smallest feasible budget (it recomputes)."""
    model, _ = gpt_example(
        batch=2, seq=16, n_layer=2, n_embd=32, n_head=2, vocab_size=64, dropout=0
    )
    batches = []
    for r in range(2):
        g = torch.Generator().manual_seed(100 + r)
        batches.append(
            (torch.randint(0, 64, (2, 16), generator=g), torch.randint(0, 64, (2, 16), generator=g))
        )
    reference = copy.deepcopy(model)
    for batch in batches:
        (reference(*batch) / 2).backward()
    want = {n: p.grad.clone() for n, p in reference.named_parameters() if p.grad is not None}
    budget = graphckpt.plan(model, batches[0], budget_gb=1.0).min_peak_bytes / 2**30
    return model, batches, want, budget


def _full(t: torch.Tensor) -> torch.Tensor:
    full = getattr(t, "full_tensor", None)  # a DTensor shard under fully_shard
    return full() if full is not None else t


def _check_step(
    ckpt: nn.Module, call: nn.Module, batch: Batch, root: nn.Module, want: dict
) -> None:
    """One step through ``call``: ``root``'s gradients equal ``want``, and the plan recomputes."""
    call(*batch).backward()
    got = {n: _full(p.grad) for n, p in root.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys()
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad)
    plan = ckpt.plan
    assert plan is not None and any(t.action == "recompute" for t in plan.tensors)


def _ddp_both_orders(rank: int) -> None:
    model, batches, want, budget = _setup()

    m = copy.deepcopy(model)
    ckpt = graphckpt.auto_checkpoint(m, budget)
    _check_step(ckpt, DDP(ckpt), batches[rank], m, want)

    m = copy.deepcopy(model)
    ddp = DDP(m)
    keys = ddp.state_dict().keys()
    ckpt = graphckpt.auto_checkpoint(ddp, budget, example_inputs=batches[rank])
    assert ckpt.state_dict().keys() == keys
    _check_step(ckpt, ckpt, batches[rank], m, want)
    m.zero_grad()
    _check_step(ckpt, ckpt, batches[rank], m, want)  # a second step reduces gradients again


@pytest.mark.distributed
def test_ddp_in_either_order_on_two_gloo_ranks() -> None:
    run_two_ranks(_ddp_both_orders)


def _fsdp_orders(rank: int) -> None:
    from torch.distributed.fsdp import fully_shard

    model, batches, want, budget = _setup()

    m = copy.deepcopy(model)
    ckpt = graphckpt.auto_checkpoint(m, budget)
    fully_shard(ckpt)
    _check_step(ckpt, ckpt, batches[rank], m, want)

    m = copy.deepcopy(model)
    fully_shard(m)
    ckpt = graphckpt.auto_checkpoint(m, budget, example_inputs=batches[rank])
    _check_step(ckpt, ckpt, batches[rank], m, want)

    # fully_shard on the blocks: before auto_checkpoint, refused at once; after, at the first
    # step, with the same advice.
    m = copy.deepcopy(model)
    for block in m.blocks:
        fully_shard(block)
    with pytest.raises(UnsupportedWrappingError, match=r"submodules of GPT \(blocks.0, blocks.1"):
        graphckpt.auto_checkpoint(m, budget)
    m = copy.deepcopy(model)
    ckpt = graphckpt.auto_checkpoint(m, budget)
    for block in m.blocks:
        fully_shard(block)
    with pytest.raises(graphckpt.TraceError, match="Apply fully_shard to the root module only"):
        ckpt(*batches[rank])


@pytest.mark.distributed
def test_fsdp2_root_in_either_order_on_two_gloo_ranks() -> None:
    run_two_ranks(_fsdp_orders)
