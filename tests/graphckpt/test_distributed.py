"""Tests of graphckpt/distributed.py: plan hashes, and plan agreement over 2 gloo ranks."""

from __future__ import annotations

import dataclasses
import doctest
import importlib
import time

import pytest
import torch
import torch.distributed as dist

import graphckpt
from graphckpt.distributed import (
    PlanAgreementTimeoutError,
    PlanMismatchError,
    _raise_on_mismatch,
    check_plans_agree,
    summarize_plan,
)
from graphckpt.examples import gpt_example
from graphckpt.plan import LayerPlan, Plan, TensorDecision
from tests.graphckpt._two_ranks import run_two_ranks

MISMATCH_LIMIT_S = 60.0
"""A mismatch is found as soon as both ranks have planned (seconds on CI), well before the
plan check's 120 s timeout."""


def _plan(action: str = "keep", budget: int = 1000, seconds: float = 0.0) -> Plan:
    kept = int(action == "keep")
    layers = [LayerPlan("pre", 1, 0, 8, 0, 0.0), LayerPlan("blocks.0", kept, 1 - kept, 8, 0, 0.0)]
    tensors = [
        TensorDecision("a", "pre", "keep", 8),
        TensorDecision("b", "blocks.0", action, 8),  # type: ignore[arg-type]
    ]
    return Plan(
        budget_bytes=budget,
        predicted_peak_bytes=500,
        min_peak_bytes=100,
        max_peak_bytes=900,
        layers=layers,
        tensors=tensors,
        planning_seconds=seconds,
    )


def test_the_hash_ignores_timing_and_survives_json() -> None:
    plan = _plan(seconds=1.5)
    same = dataclasses.replace(plan, planning_seconds=9.0)
    assert summarize_plan(plan) == summarize_plan(same)
    assert summarize_plan(Plan.from_json(plan.to_json())) == summarize_plan(plan)
    assert summarize_plan(_plan("recompute")).digest != summarize_plan(plan).digest


def test_a_mismatch_names_ranks_and_first_layer() -> None:
    keep, recompute = summarize_plan(_plan()), summarize_plan(_plan("recompute"))
    _raise_on_mismatch([keep, keep, keep], [0, 1, 2])  # agreement: no error
    with pytest.raises(PlanMismatchError) as failed:
        _raise_on_mismatch([keep, recompute, keep, recompute], [0, 1, 2, 3])
    text = str(failed.value)
    assert "ranks [1, 3] differ from rank 0" in text
    assert "first differing layer 'blocks.0'" in text
    assert "rank 0 keeps 1, recomputes 0; rank 1 keeps 0, recomputes 1" in text


def test_a_mismatch_outside_the_layers_names_the_field() -> None:
    a, b = summarize_plan(_plan(budget=1000)), summarize_plan(_plan(budget=2000))
    with pytest.raises(PlanMismatchError, match=r"budget_bytes differs \(rank 0: 1000, rank 1"):
        _raise_on_mismatch([a, b], [0, 1])


def test_without_a_process_group_nothing_is_checked() -> None:
    assert not dist.is_initialized()
    check_plans_agree(_plan())


def test_timeout_must_be_positive() -> None:
    with pytest.raises(ValueError, match="plan_check_timeout_s must be a positive"):
        graphckpt.PlanConfig(plan_check_timeout_s=0)


def _tiny() -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    return gpt_example(batch=2, seq=16, n_layer=2, n_embd=32, n_head=2, vocab_size=64)


def _budgets(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[float, float]:
    """The smallest feasible and the keep-everything budgets, in GiB: different plans."""
    wide = graphckpt.plan(model, inputs, budget_gb=1.0)
    return wide.min_peak_bytes / 2**30, wide.max_peak_bytes / 2**30


def _mismatched_plans(rank: int) -> None:
    model, inputs = _tiny()
    low, high = _budgets(model, inputs)
    budget = high if rank == 0 else low

    # Same budget on both ranks: the plans agree, and training runs.
    ckpt = graphckpt.auto_checkpoint(model, high, example_inputs=inputs)
    ckpt(*inputs).backward()

    dist.barrier()  # time the check from when both ranks start planning
    start = time.monotonic()
    with pytest.raises(PlanMismatchError) as failed:
        graphckpt.auto_checkpoint(model, budget, example_inputs=inputs)
    assert time.monotonic() - start < MISMATCH_LIMIT_S
    text = str(failed.value)
    assert "ranks [1] differ from rank 0" in text and "first differing layer '" in text

    compiled = torch.compile(model, backend=graphckpt.backend(budget, compiler="eager"))
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed) as compile_failed:
        compiled(*inputs)
    inner = compile_failed.value.inner_exception
    assert isinstance(inner, PlanMismatchError), f"rank {rank}: {type(inner).__name__}: {inner}"

    # Checking can be turned off, for ranks that plan different models.
    graphckpt.auto_checkpoint(model, budget, example_inputs=inputs, check_plans=False)


@pytest.mark.distributed
def test_mismatched_plans_on_two_gloo_ranks_are_an_error() -> None:
    run_two_ranks(_mismatched_plans)


def _rank_arrives_late(rank: int, timeout_s: float) -> None:
    if rank == 1:
        time.sleep(timeout_s + 2)  # arrives after rank 0 gave up: an error here too
        with pytest.raises(PlanAgreementTimeoutError, match=r"rank 1: ranks \[0\] stopped wait"):
            check_plans_agree(_plan(), timeout_s=timeout_s)
        return
    start = time.monotonic()
    with pytest.raises(PlanAgreementTimeoutError, match=r"rank 0: ranks \[1\] did not reach"):
        check_plans_agree(_plan(), timeout_s=timeout_s)
    assert time.monotonic() - start < timeout_s + 5


@pytest.mark.distributed
def test_a_rank_that_never_arrives_is_a_timeout_error() -> None:
    run_two_ranks(_rank_arrives_late, 2.0)


def _rank_arrives_after_the_group_timeout(rank: int, group_timeout_s: float) -> None:
    if rank == 0:
        time.sleep(group_timeout_s + 2)  # rank 1 waits longer than a collective could
    for budget in (1000, 2000):  # agreeing twice: each check is its own exchange
        check_plans_agree(_plan(budget=budget), timeout_s=30.0)
    with pytest.raises(PlanMismatchError, match="budget_bytes differs"):
        check_plans_agree(_plan(budget=1000 + rank), timeout_s=30.0)


@pytest.mark.distributed
def test_the_check_waits_its_own_timeout_not_the_groups() -> None:
    # Seen in CI: rank 1 planned 60 s before rank 0 and its barrier hit the group's timeout.
    run_two_ranks(_rank_arrives_after_the_group_timeout, 2.0, group_timeout_s=2.0)


def test_docstring_examples_run() -> None:
    result = doctest.testmod(importlib.import_module("graphckpt.distributed"))
    assert result.attempted > 0 and result.failed == 0
