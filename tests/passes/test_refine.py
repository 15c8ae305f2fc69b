"""Tests of passes/refine.py: the per-tensor search never makes a plan worse, respects its work
budget, and reaches plans the layer search alone cannot (checked against the exact MILP)."""

from __future__ import annotations

import pytest
import torch

from benchmarks.optimality_gap import GRAPHS
from benchmarks.planner_sweep import budget_points
from graphckpt.errors import InfeasibleBudgetError
from graphckpt.options import PlanConfig
from passes.headroom import HEADROOM_BYTES
from passes.milp import milp_min_peak, solve_milp
from passes.plan import PlanSearch, build_search, greedy_sequence, plan_pass
from passes.refine import lowest_peak, refine
from passes.trace import JointGraph, capture_joint_graphs

_CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def block() -> tuple[JointGraph, PlanSearch]:
    torch.manual_seed(0)
    model, inputs = GRAPHS["transformer block"]()
    jg = capture_joint_graphs(model, inputs)[0]
    return jg, build_search(jg, PlanConfig(), PlanConfig().device_for(_CPU))


def test_refine_never_worse_and_fits(block) -> None:
    _, search = block
    sg = search.sg
    for state in greedy_sequence(search):
        start = search.run(state)
        room = start.peak_bytes
        got = refine(sg, search.saved_for(state), room, max_node_visits=50_000)
        assert got.sim.peak_bytes <= room
        assert got.sim.recompute_seconds <= start.recompute_seconds + 1e-15


def test_lowest_peak_is_never_above_its_starts(block) -> None:
    _, search = block
    states = greedy_sequence(search)
    starts = [search.saved_for(states[-1]), search.saved_for(states[0])]
    got = lowest_peak(search.sg, starts, max_node_visits=100_000)
    assert got.sim.peak_bytes <= min(search.run(s).peak_bytes for s in (states[-1], states[0]))


def test_work_budget_bounds_the_simulations(block) -> None:
    _, search = block
    state = greedy_sequence(search)[-1]
    n = len(search.sg.nodes)
    got = refine(search.sg, search.saved_for(state), 1, max_node_visits=10 * n)
    assert got.num_simulations <= 10 + 2  # the budget, plus the two starts
    none = refine(search.sg, search.saved_for(state), 1, max_node_visits=0)
    assert none.num_simulations == 1 and none.saved == frozenset(search.saved_for(state))


def test_fits_the_milp_minimum_where_the_layer_search_cannot(block) -> None:
    jg, search = block
    low = milp_min_peak(search.sg, time_limit_s=60).model_peak_bytes + HEADROOM_BYTES
    with pytest.raises(InfeasibleBudgetError):
        plan_pass(jg, low, PlanConfig(local_search_node_visits=0), _CPU)
    plan = plan_pass(jg, low, PlanConfig(), _CPU)
    assert plan.predicted_peak_bytes + HEADROOM_BYTES <= low


def test_matches_the_milp_where_the_layer_search_recomputes_more() -> None:
    torch.manual_seed(0)
    model, inputs = GRAPHS["residual mlp x2"]()
    jg = capture_joint_graphs(model, inputs)[0]
    sg = build_search(jg, PlanConfig(), PlanConfig().device_for(_CPU)).sg
    wide = plan_pass(jg, 1 << 40, PlanConfig(), _CPU)
    lo, hi = wide.min_peak_bytes, wide.max_peak_bytes
    worse = 0
    for budget in budget_points(lo, hi, 6):
        exact = solve_milp(sg, budget - HEADROOM_BYTES, time_limit_s=60)
        ours = plan_pass(jg, budget, PlanConfig(), _CPU)
        assert ours.recompute_seconds <= exact.recompute_seconds * 1.02 + 1e-15
        try:
            alone = plan_pass(jg, budget, PlanConfig(local_search_node_visits=0), _CPU)
        except InfeasibleBudgetError:
            worse += 1
            continue
        worse += alone.recompute_seconds > ours.recompute_seconds * 1.02
    assert worse >= 2  # the layer search alone misses the optimum at several budgets


@pytest.mark.parametrize("bad", [-1, 1.5, True, "many"])
def test_config_rejects_bad_work_budgets(bad) -> None:
    with pytest.raises(ValueError, match="local_search_node_visits"):
        PlanConfig(local_search_node_visits=bad)


def test_the_milp_is_selectable_for_small_graphs(block) -> None:
    jg, search = block
    low = milp_min_peak(search.sg, time_limit_s=60).peak_bytes + HEADROOM_BYTES
    budget = low + 200
    exact = plan_pass(jg, budget, PlanConfig(solver="milp"), _CPU)
    assert exact.predicted_peak_bytes + HEADROOM_BYTES <= budget
    direct = solve_milp(search.sg, budget - HEADROOM_BYTES, time_limit_s=60)
    assert exact.recompute_seconds == pytest.approx(direct.recompute_seconds)
    assert exact.min_peak_bytes == low
    with pytest.raises(InfeasibleBudgetError, match="MILP certifies"):
        plan_pass(jg, low - 1, PlanConfig(solver="milp"), _CPU)


def test_the_milp_refuses_big_graphs() -> None:
    from graphckpt.examples import gpt_example

    model, inputs = gpt_example(batch=1, seq=8, n_layer=4, n_embd=16, n_head=2, vocab_size=32)
    jg = capture_joint_graphs(model, inputs)[0]
    with pytest.raises(ValueError, match="solver='search'"):
        plan_pass(jg, 1 << 40, PlanConfig(solver="milp"), _CPU)
    with pytest.raises(ValueError, match="solver"):
        PlanConfig(solver="exact")  # type: ignore[arg-type]
