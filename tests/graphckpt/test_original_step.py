"""Tests of graphckpt/original_step.py and of its use in api.py: when the original step is
measured to fit the budget, the wrapper runs the original module, bitwise the same step."""

from __future__ import annotations

import copy

import torch
from torch import nn

import graphckpt
from benchmarks.measure import grads_equal, measure_step
from graphckpt.original_step import call_key, may_run_original, original_step_peak, state_restored


class _Loss(nn.Module):
    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).square().mean()


def test_call_key_tracks_shapes_values_mode_and_parameters() -> None:
    lin, x = nn.Linear(3, 1), torch.ones(2, 3)
    key = call_key(lin, (x,), {})
    assert key == call_key(lin, (torch.zeros(2, 3),), {})
    assert key != call_key(lin, (torch.ones(3, 3),), {})
    assert call_key(lin, (x, 1), {}) != call_key(lin, (x, 2), {})
    assert call_key(lin, (x,), {"f": object()}) is None
    lin.eval()
    assert key != call_key(lin, (x,), {})
    lin.train()
    lin.weight.requires_grad_(False)
    assert key != call_key(lin, (x,), {})


def test_original_step_peak_restores_state() -> None:
    torch.manual_seed(0)
    model = _Loss(nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Dropout(0.5)))
    x = torch.randn(4, 8, requires_grad=True)
    y = x * 2  # upstream graph the measurement must not run into
    model.body[0].weight.grad = torch.ones(8, 8)
    rng = torch.get_rng_state()
    stats = [b.clone() for b in model.buffers()]
    expected = measure_step(copy.deepcopy(model), (y.detach(),), seed=0).peak_bytes
    torch.set_rng_state(rng)
    peak = original_step_peak(model, (y,), {})
    assert peak >= expected
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(a, b) for a, b in zip(stats, model.buffers()))
    assert torch.equal(model.body[0].weight.grad, torch.ones(8, 8))
    assert model.body[0].bias.grad is None
    assert x.grad is None
    y.sum().backward()  # the caller's graph is intact
    assert torch.equal(x.grad, torch.full((4, 8), 2.0))


def test_state_restored_undoes_input_mutation() -> None:
    x = torch.zeros(3)
    with state_restored(nn.Identity(), (x,)):
        x.add_(1)
    assert torch.equal(x, torch.zeros(3))


def test_fitting_original_runs_bitwise(tiny_gpt) -> None:
    model, inputs = tiny_gpt
    reference = measure_step(copy.deepcopy(model), inputs, seed=5)
    ckpt = graphckpt.auto_checkpoint(copy.deepcopy(model), 1.0, example_inputs=inputs)
    assert ckpt.plan is not None and may_run_original(ckpt.plan)
    calls: list[int] = []
    ckpt.wrapped.register_forward_hook(lambda *_: calls.append(1))
    compiled_calls: list[int] = []
    run_compiled = ckpt._run_compiled

    def counted(*args):
        compiled_calls.append(1)
        return run_compiled(*args)

    ckpt._run_compiled = counted  # type: ignore[method-assign]
    result = measure_step(ckpt, inputs, seed=5)
    assert calls and not compiled_calls  # the original module ran, not the fx graphs
    assert ckpt.runs_original
    # What ran was predicted by the original step's own measurement, not by the plan's graph.
    assert ckpt.predicted_peak_bytes == next(iter(ckpt._original_peaks.values()))
    assert result.loss == reference.loss and grads_equal(result.grads, reference.grads)
    assert result.peak_bytes == reference.peak_bytes <= ckpt.budget_bytes
    idx, targets = inputs
    ckpt(idx[:1], targets[:1]).backward()  # a new shape still plans
    assert len(ckpt.plans) == 2 and ckpt.plan is ckpt.plans[-1] and not ckpt.runs_original
    assert ckpt.predicted_peak_bytes == ckpt.plan.predicted_peak_bytes
    ckpt(*inputs).backward()
    assert ckpt.plan is ckpt.plans[0]


def test_plan_with_recompute_runs_the_rewritten_graphs(tiny_gpt) -> None:
    model, inputs = tiny_gpt
    budget = graphckpt.plan(model, inputs, budget_gb=1.0).min_peak_bytes
    ckpt = graphckpt.auto_checkpoint(copy.deepcopy(model), budget / 2**30, example_inputs=inputs)
    assert ckpt.plan is not None and ckpt.plan.recompute_flops > 0
    assert not may_run_original(ckpt.plan)
    assert not ckpt._original_peaks
    ckpt(*inputs).backward()
    assert not ckpt.runs_original


def test_original_over_budget_is_not_run() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 1))
    inputs = (torch.randn(32, 64),)
    loss_model = _Loss(model)
    wide = graphckpt.plan(loss_model, inputs, budget_gb=1.0)
    eager = measure_step(copy.deepcopy(loss_model), inputs, seed=0).peak_bytes
    ckpt = graphckpt.auto_checkpoint(loss_model, wide.max_peak_bytes / 2**30, example_inputs=inputs)
    fits = [peak <= ckpt.budget_bytes for peak in ckpt._original_peaks.values()]
    assert fits == [eager <= ckpt.budget_bytes]


def test_original_step_peak_counts_kernel_scratch() -> None:
    from graphckpt.memory import step_peak_bytes

    torch.manual_seed(0)
    model = _Loss(nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3)))
    x = torch.randn(4, 8, 32, 32)
    params = list(model.parameters())

    def step() -> None:
        model(x).backward()

    step()
    for p in params:
        p.grad = None
    tracked = step_peak_bytes(step, [*params, x], "cpu")
    for p in params:
        p.grad = None
    # oneDNN convolutions allocate scratch inside the kernel: only the allocator sees it, and
    # it is what the budget counts, so the original module is judged by it.
    assert original_step_peak(model, (x,), {}) > tracked
