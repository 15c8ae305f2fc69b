"""Tests of passes/plan.py: plans fit the budget, cost less with more memory, and say when
no plan can fit."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from graphckpt.errors import InfeasibleBudgetError
from graphckpt.options import PlanConfig
from passes.plan import plan_pass
from passes.trace import capture_joint_graphs


@pytest.fixture
def joint(tiny_gpt):
    model, inputs = tiny_gpt
    return lambda: capture_joint_graphs(model, inputs)[0]


def test_plans_fit_and_recompute_less_with_more_budget(joint) -> None:
    cpu = torch.device("cpu")
    wide = plan_pass(joint(), 1 << 40, PlanConfig(), cpu)
    lo, hi = wide.min_peak_bytes, wide.max_peak_bytes
    assert lo <= hi
    previous = None
    for frac in (0.0, 0.3, 0.6, 1.0):
        budget = int(lo + frac * (hi - lo))
        p = plan_pass(joint(), budget, PlanConfig(), cpu)
        assert p.predicted_peak_bytes <= budget
        if previous is not None:  # more budget never costs more recompute
            assert p.recompute_seconds <= previous.recompute_seconds + 1e-12
        previous = p
    assert previous is not None and previous.recompute_flops == 0


def test_budget_below_minimum_names_the_minimum(joint) -> None:
    wide = plan_pass(joint(), 1 << 40, PlanConfig(), torch.device("cpu"))
    with pytest.raises(InfeasibleBudgetError, match="smallest feasible peak") as info:
        plan_pass(joint(), wide.min_peak_bytes - 1, PlanConfig(), torch.device("cpu"))
    assert info.value.min_feasible_bytes == wide.min_peak_bytes


def test_compiled_plans_leave_a_share_of_the_budget_free(joint) -> None:
    """Under inductor (fused_pointwise) the plan leaves COMPILED_HEADROOM_FRACTION of the
    budget free, and the smallest feasible budget it states is exactly the one that plans."""
    from passes.headroom import COMPILED_HEADROOM_FRACTION, headroom_bytes, smallest_budget

    cpu, fused = torch.device("cpu"), PlanConfig(fused_pointwise=True)
    wide = plan_pass(joint(), 1 << 40, fused, cpu)
    least = wide.min_peak_bytes
    with pytest.raises(InfeasibleBudgetError) as info:
        plan_pass(joint(), least - 1, fused, cpu)
    assert info.value.min_feasible_bytes == least
    tight = plan_pass(joint(), least, fused, cpu)
    room = least - headroom_bytes(least, fused)
    assert tight.predicted_peak_bytes <= room < least * (1 - COMPILED_HEADROOM_FRACTION)
    assert smallest_budget(tight.predicted_peak_bytes, fused) <= least
    assert smallest_budget(1000, PlanConfig()) == 1064


def test_the_exact_solver_leaves_the_compiled_share_free_too() -> None:
    from passes.headroom import headroom_bytes

    torch.manual_seed(0)
    mlp = nn.Sequential(
        nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 1)
    )
    graph = lambda: capture_joint_graphs(mlp, (torch.randn(16, 32),))[0]  # noqa: E731
    cpu, milp = torch.device("cpu"), PlanConfig(fused_pointwise=True, solver="milp")
    least = plan_pass(graph(), 1 << 40, milp, cpu).min_peak_bytes
    exact = plan_pass(graph(), least, milp, cpu)
    assert exact.predicted_peak_bytes <= least - headroom_bytes(least, milp)
    with pytest.raises(InfeasibleBudgetError) as info:
        plan_pass(graph(), least - 1, milp, cpu)
    assert info.value.min_feasible_bytes == least


def test_without_recompute_the_minimum_is_the_keep_all_peak(joint) -> None:
    p = plan_pass(joint(), 1 << 40, PlanConfig(allow_recompute=False), torch.device("cpu"))
    assert p.min_peak_bytes == p.max_peak_bytes


def test_attention_without_dropout_is_priced() -> None:
    from graphckpt.examples import gpt_example

    model, inputs = gpt_example(batch=2, seq=16, n_layer=2, n_embd=32, n_head=2, dropout=0.0)
    jg = capture_joint_graphs(model, inputs)[0]
    targets = {str(n.target) for n in jg.forward}
    assert any("flash_attention" in t for t in targets)
    wide = plan_pass(jg, 1 << 40, PlanConfig(), torch.device("cpu"))
    p = plan_pass(
        capture_joint_graphs(model, inputs)[0],
        wide.min_peak_bytes,
        PlanConfig(),
        torch.device("cpu"),
    )
    assert p.recompute_flops > 0
