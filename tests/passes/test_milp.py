"""Tests of passes/milp.py: MILP answers fit the budget under the simulator, beat or match the
heuristic planner, and equal brute force on a graph small enough to enumerate."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from graphckpt.errors import InfeasibleBudgetError
from graphckpt.options import DeviceSpec, PlanConfig
from passes.cost import estimate_costs
from passes.milp import _candidates, milp_min_peak, solve_milp
from passes.plan import plan_pass
from passes.simulate import StepGraph, simulate
from passes.trace import JointGraph, capture_joint_graphs


class _Chain(nn.Module):
    def __init__(self, num_layers: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(num_layers):
            layers += [nn.Linear(16, 16), nn.ReLU()]
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).sum()


def _chain(num_layers: int) -> tuple[JointGraph, StepGraph]:
    torch.manual_seed(0)
    jg = capture_joint_graphs(_Chain(num_layers), (torch.randn(256, 16),))[0]
    nodes = [*jg.primals, *jg.forward, *jg.tangents, *jg.backward]
    return jg, StepGraph.build(jg, estimate_costs(nodes, DeviceSpec()), 5056)


@pytest.fixture(scope="module")
def chain3() -> tuple[JointGraph, StepGraph]:
    return _chain(3)


def brute_force(sg: StepGraph, budget_bytes: int, candidates: list[int]) -> float:
    """Least simulated recompute seconds over every subset of ``candidates`` kept."""
    best = float("inf")
    for mask in range(1 << len(candidates)):
        sim = simulate(sg, [v for i, v in enumerate(candidates) if mask >> i & 1])
        if sim.peak_bytes <= budget_bytes:
            best = min(best, sim.recompute_seconds)
    return best


def _budgets(sg: StepGraph, hi: int) -> list[int]:
    lo = milp_min_peak(sg).model_peak_bytes
    return [lo + (hi - lo) * i // 3 for i in range(4)]


def test_fits_under_simulator_and_no_worse_than_planner(chain3) -> None:
    jg, sg = chain3
    wide = plan_pass(jg, 1 << 40, PlanConfig(), torch.device("cpu"))
    for budget in _budgets(sg, wide.max_peak_bytes):
        result = solve_milp(sg, budget)
        sim = simulate(sg, result.saved)
        assert result.optimal
        assert sim.peak_bytes == result.peak_bytes <= budget
        assert sim.recompute_seconds == pytest.approx(result.recompute_seconds)
        try:
            plan = plan_pass(jg, budget, PlanConfig(), torch.device("cpu"))
        except InfeasibleBudgetError:
            continue
        assert result.recompute_seconds <= plan.recompute_seconds + 1e-12


def test_equals_brute_force(chain3) -> None:
    _jg, sg = chain3
    cand = [v for v in _candidates(sg) if not sg.outputs[v]]  # tuple ops are never kept
    assert len(cand) <= 12
    keep_all = simulate(sg, cand).peak_bytes
    for budget in _budgets(sg, keep_all):
        result = solve_milp(sg, budget)
        seconds = brute_force(sg, budget, cand)
        assert result.recompute_seconds == pytest.approx(seconds, rel=1e-9, abs=1e-15)


def test_infeasible_budget_names_the_minimum(chain3) -> None:
    _jg, sg = chain3
    least = milp_min_peak(sg)
    with pytest.raises(InfeasibleBudgetError, match="smallest peak") as info:
        solve_milp(sg, least.model_peak_bytes - 1)
    assert info.value.min_feasible_bytes == least.model_peak_bytes
