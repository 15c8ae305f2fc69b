"""Tests of graphckpt/api.py: auto_checkpoint trains like the original and fits its budget."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import graphckpt
from benchmarks.measure import grads_equal, measure_step


@pytest.mark.parametrize("bad", [0, -1.0, math.nan, math.inf])
def test_bad_budget_values(tiny_gpt, bad) -> None:
    model, _ = tiny_gpt
    with pytest.raises(ValueError, match="budget_gb must be a positive finite"):
        graphckpt.auto_checkpoint(model, budget_gb=bad)


@pytest.mark.parametrize("bad", ["8", None, True])
def test_bad_budget_types(tiny_gpt, bad) -> None:
    model, _ = tiny_gpt
    with pytest.raises(TypeError, match="budget_gb must be a number"):
        graphckpt.auto_checkpoint(model, budget_gb=bad)


def test_trains_like_the_original_within_budget(tiny_gpt) -> None:
    model, inputs = tiny_gpt
    wide = graphckpt.plan(model, inputs, budget_gb=1.0)
    budget = (wide.min_peak_bytes + wide.max_peak_bytes) // 2
    reference = measure_step(copy.deepcopy(model), inputs, seed=5)
    planned_model = copy.deepcopy(model)
    ckpt = graphckpt.auto_checkpoint(planned_model, budget / 2**30, example_inputs=inputs)
    assert ckpt.state_dict().keys() == model.state_dict().keys()
    assert ckpt.plan is not None and ckpt.plan.predicted_peak_bytes <= budget
    result = measure_step(ckpt, inputs, seed=5)
    assert result.loss == reference.loss
    assert grads_equal(result.grads, reference.grads)
    assert result.peak_bytes <= budget


def test_infeasible_budget_states_the_minimum(tiny_gpt) -> None:
    model, inputs = tiny_gpt
    with pytest.raises(graphckpt.InfeasibleBudgetError, match="smallest feasible peak"):
        graphckpt.auto_checkpoint(model, budget_gb=1e-6, example_inputs=inputs)


def test_new_input_shape_replans(tiny_gpt) -> None:
    model, inputs = tiny_gpt
    ckpt = graphckpt.auto_checkpoint(model, budget_gb=1.0, example_inputs=inputs)
    first = ckpt.plan
    idx, targets = inputs
    ckpt(idx[:1], targets[:1]).backward()
    assert len(ckpt.plans) == 2 and ckpt.plan is not first


def test_no_grad_calls_the_original(tiny_gpt) -> None:
    model, inputs = tiny_gpt
    ckpt = graphckpt.auto_checkpoint(model, budget_gb=1.0)
    with torch.no_grad():
        ckpt(*inputs)
    assert ckpt.plan is None


def test_untraceable_model_is_a_trace_error() -> None:
    class Untraceable(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.lin(x)
            if y.sum().item() > 0:  # data-dependent Python control flow
                return y.relu().sum()
            return y.sum()

    with pytest.raises(graphckpt.TraceError, match="Untraceable"):
        graphckpt.auto_checkpoint(Untraceable(), 1.0, example_inputs=(torch.randn(2, 4),))
