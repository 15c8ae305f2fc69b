"""Tests of graphckpt/api.py: auto_checkpoint trains like the original and fits its budget."""

from __future__ import annotations

import copy
import io
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


def _bn_net() -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(16, 32),
        torch.nn.BatchNorm1d(32),
        torch.nn.GELU(),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(32, 16),
    )
    return net, torch.randn(8, 16)


def _one_step(model: torch.nn.Module, x: torch.Tensor, autocast: bool = False) -> tuple:
    """Loss, grads, buffers and the global RNG state after one training step (seed 5)."""
    torch.manual_seed(5)
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(x).pow(2).sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    return loss.detach(), grads, buffers, torch.get_rng_state()


def _assert_same_step(a: tuple, b: tuple) -> None:
    assert torch.equal(a[0], b[0])
    for x, y in zip(a[1:3], b[1:3]):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    assert torch.equal(a[3], b[3])


@pytest.mark.parametrize("mode", ["train", "eval", "autocast_bf16"])
def test_model_state_after_a_step_equals_the_original(mode: str) -> None:
    """Loss, gradients, buffers (BatchNorm stats, counter) and RNG state equal the original's,
    in training, in eval mode with grad enabled (the plan is kept), and under bf16 autocast."""
    net, x = _bn_net()
    wide = graphckpt.plan(copy.deepcopy(net), (x,), 1.0)
    budget = (wide.min_peak_bytes + wide.max_peak_bytes) // 2 / 2**30
    reference = copy.deepcopy(net)
    ckpt = graphckpt.auto_checkpoint(copy.deepcopy(net), budget, example_inputs=(x,))
    if mode == "eval":
        reference.eval(), ckpt.eval()
    autocast = mode == "autocast_bf16"
    _assert_same_step(_one_step(reference, x, autocast), _one_step(ckpt, x, autocast))
    # Planned graphs ran (eval with grad keeps planning); in training the plan recomputes.
    assert ckpt.plan is not None and not ckpt.runs_original
    if mode == "train":
        assert ckpt.plan.recompute_seconds > 0


def test_inference_runs_the_original_without_planning() -> None:
    net, x = _bn_net()
    ckpt = graphckpt.auto_checkpoint(copy.deepcopy(net).eval(), 1.0)
    with torch.inference_mode():
        y = ckpt(x)
    with torch.no_grad():
        z = ckpt(x)
    assert ckpt.plans == [] and y.is_inference() and torch.equal(y, z)


def test_a_dropped_wrapper_frees_its_model() -> None:
    """Regression: the compiled call's backend held the wrapper, and Dynamo's cache (shared by
    every wrapper) held the backend, so no planned model was ever freed."""
    import gc
    import weakref

    from graphckpt.examples import gpt_example

    model, inputs = gpt_example(batch=2, seq=16, n_layer=2, n_embd=32, n_head=2, vocab_size=64)
    ckpt = graphckpt.auto_checkpoint(model, budget_gb=1.0, example_inputs=inputs)
    ckpt(*inputs).backward()
    weight = weakref.ref(next(model.parameters()))
    del ckpt, model
    gc.collect()
    assert weight() is None


def test_models_planned_one_after_another_do_not_pile_up_compiled_code() -> None:
    """Regression: every wrapper compiled the same code object, so Dynamo kept each dropped
    wrapper's compiled graphs, and a process that planned 256 models stopped at Dynamo's limit
    of compiles per code object (here lowered to 3)."""
    import gc

    from graphckpt.examples import gpt_example

    with torch._dynamo.config.patch(accumulated_recompile_limit=3):
        for _ in range(5):
            model, inputs = gpt_example(batch=2, seq=8, n_layer=1, n_embd=16, n_head=2)
            ckpt = graphckpt.auto_checkpoint(model, budget_gb=1.0, example_inputs=inputs)
            ckpt(*inputs).backward()
            del ckpt, model
            gc.collect()


@pytest.mark.parametrize("how", ["torch.save", "deepcopy"])
def test_a_saved_or_copied_wrapper_trains_on_its_own(tiny_gpt, how) -> None:
    """``torch.save`` failed (the offloader's weak dictionary), and a deep copy shared the
    original's compiled step, which planned into the original's list."""
    model, inputs = tiny_gpt
    wide = graphckpt.plan(model, inputs, budget_gb=1.0)
    budget = (wide.min_peak_bytes + wide.max_peak_bytes) // 2
    reference = measure_step(copy.deepcopy(model), inputs, seed=5)
    ckpt = graphckpt.auto_checkpoint(copy.deepcopy(model), budget / 2**30, example_inputs=inputs)
    if how == "torch.save":
        buffer = io.BytesIO()
        torch.save(ckpt, buffer)
        buffer.seek(0)
        clone = torch.load(buffer, weights_only=False)
    else:
        clone = copy.deepcopy(ckpt)
    assert [p.to_json() for p in clone.plans] == [p.to_json() for p in ckpt.plans]
    assert clone.budget_bytes == ckpt.budget_bytes and clone.config == ckpt.config
    assert clone.state_dict().keys() == ckpt.state_dict().keys()
    assert all(a is not b for a, b in zip(clone.parameters(), ckpt.parameters(), strict=True))
    before = len(ckpt.plans)
    result = measure_step(clone, inputs, seed=5)
    assert not clone.runs_original
    assert len(clone.plans) == before + 1 and len(ckpt.plans) == before
    assert result.loss == reference.loss
    assert grads_equal(result.grads, reference.grads)
    assert result.peak_bytes <= budget
