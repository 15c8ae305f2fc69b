"""Tests of passes/batch_norm.py: training-mode batch-norm backward no longer holds the updated
running statistics, so the rewritten keep-all step holds what eager holds."""

from __future__ import annotations

import copy

import torch
from torch import nn

import graphckpt
from benchmarks.measure import grads_equal, measure_step
from passes.batch_norm import drop_unread_batch_norm_stats
from passes.trace import capture_joint_graphs

_BN_BACKWARD = torch.ops.aten.native_batch_norm_backward.default


class _ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).square().mean()


def _inputs() -> tuple[torch.Tensor]:
    return (torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)),)


def test_backward_reads_no_forward_running_stats() -> None:
    torch.manual_seed(0)
    jg = capture_joint_graphs(_ConvBN(), _inputs())[0]
    assert drop_unread_batch_norm_stats(jg) == 4
    backward = [n for n in jg.backward if n.target is _BN_BACKWARD]
    assert len(backward) == 2
    for node in backward:
        assert node.args[3] is None and node.args[4] is None
    assert drop_unread_batch_norm_stats(jg) == 0


def test_eval_mode_keeps_its_running_stats() -> None:
    torch.manual_seed(0)
    model = _ConvBN().eval()
    for p in model.parameters():
        p.requires_grad_(True)
    jg = capture_joint_graphs(model, _inputs())[0]
    assert drop_unread_batch_norm_stats(jg) == 0


def _rewritten_step(model: nn.Module, inputs: tuple[torch.Tensor]):
    ckpt = graphckpt.auto_checkpoint(model, 1.0, example_inputs=inputs)
    # The rewritten graphs themselves, not the original module the wrapper may call instead.
    ckpt.forward = lambda *args: ckpt._run_compiled(args, {})  # type: ignore[method-assign]
    return measure_step(ckpt, inputs, seed=1), ckpt.plan


def test_rewritten_step_no_longer_holds_the_new_running_stats(monkeypatch) -> None:
    torch.manual_seed(0)
    model, inputs = _ConvBN(), _inputs()
    reference = measure_step(copy.deepcopy(model), inputs, seed=1)
    result, plan = _rewritten_step(copy.deepcopy(model), inputs)
    monkeypatch.setattr("passes.pipeline.drop_unread_batch_norm_stats", lambda jg: 0)
    before, plan_before = _rewritten_step(copy.deepcopy(model), inputs)
    stats_bytes = 2 * 2 * 16 * 4  # two batch norms, new mean and variance, 16 channels
    assert before.peak_bytes - result.peak_bytes == stats_bytes
    # The simulator frees input-mutation outputs when forward ends, as the runtime does, so the
    # prediction is the measurement, and without this pass both hold the statistics.
    assert plan.predicted_peak_bytes == result.peak_bytes
    assert plan_before.predicted_peak_bytes == before.peak_bytes
    assert result.loss == reference.loss and grads_equal(result.grads, reference.grads)
