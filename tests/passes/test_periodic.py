"""Tests of passes/periodic.py: the layer blocks of a 3-layer graph against the 2-layer one."""

from __future__ import annotations

import pytest
import torch

from passes.layers import find_segments
from passes.periodic import TOP, TWIN, PeriodError, learn_period
from tests.passes._periodic_models import DeepMLP, gpt, joint


def test_gpt_period_has_parameter_forward_backward_and_gradient_blocks() -> None:
    model, inputs = gpt(3)
    three = joint(model, inputs)
    period = learn_period(joint(*gpt(2)), three)
    num_params = len(list(model.blocks[0].parameters()))
    layer_1 = next(s for s in find_segments(three.forward) if s.name == "blocks.1")
    # The block's parameters, its forward nodes, its backward nodes and its gradient outputs;
    # layers ascend in forward and descend in backward.
    sizes = [(k, ascending) for _start, k, ascending in period.blocks]
    assert sizes[:2] == [(num_params, True), (len(layer_1.nodes), True)]
    assert sizes[2][1] is False and sizes[2][0] > len(layer_1.nodes)
    assert sizes[3] == (num_params, True)
    assert period.role.count(TWIN) == period.role.count(TOP) == sum(k for k, _a in sizes)
    # Layer 1 reads layer 0's output: a reference that moves one layer down.
    assert len(period.below) >= 1


def test_a_layer_dependent_loop_is_not_periodic() -> None:
    x = torch.randn(4, 16)
    two = joint(DeepMLP(depth=2, scale_by_depth=True), (x,))
    three = joint(DeepMLP(depth=3, scale_by_depth=True), (x,))
    with pytest.raises(PeriodError):
        learn_period(two, three)


def test_graphs_of_different_models_are_not_one_layer_apart() -> None:
    x = torch.randn(4, 16)
    with pytest.raises(PeriodError):
        learn_period(joint(DeepMLP(depth=2), (x,)), joint(*gpt(3)))
