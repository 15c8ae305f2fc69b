"""Tests of passes/replicate.py: plans from the built graph equal plans from the full trace."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from torch import nn

import graphckpt
from graphckpt.options import PlanConfig
from graphckpt.plan import Plan
from passes.batch_norm import drop_unread_batch_norm_stats
from passes.decompose import split_dropout
from passes.plan import plan_pass
from passes.replicate import capture_for_planning, find_layer_stack, shortened
from passes.synthesize import same_graph
from passes.trace import JointGraph, capture_joint_graphs
from tests.passes._periodic_models import DeepMLP, gpt

_CPU = torch.device("cpu")


def _plan(jg: JointGraph, budget_bytes: int) -> Plan:
    split_dropout(jg)
    drop_unread_batch_norm_stats(jg)
    return plan_pass(jg, budget_bytes, PlanConfig(), _CPU)


def _decisions(plan: Plan) -> dict[str, Any]:
    data = json.loads(plan.to_json())
    data.pop("planning_seconds")
    return data


def _halfway(model: nn.Module, inputs: tuple[Any, ...]) -> int:
    wide = _plan(capture_joint_graphs(model, inputs)[0], 1 << 40)
    assert wide.min_peak_bytes < wide.max_peak_bytes
    return (wide.min_peak_bytes + wide.max_peak_bytes) // 2


@pytest.fixture
def traced_depths(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Records the depth of the layer stack of every model passes.replicate traces."""
    import passes.replicate as replicate

    depths: list[int] = []
    real = replicate.capture_joint_graphs

    def counting(m: nn.Module, *args: Any, **kwargs: Any) -> list[JointGraph]:
        path = find_layer_stack(m, None, 2)
        depths.append(len(m.get_submodule(path)) if path is not None else -1)
        return real(m, *args, **kwargs)

    monkeypatch.setattr(replicate, "capture_joint_graphs", counting)
    return depths


@pytest.mark.parametrize("dropout", [0.1, 0.0])
def test_gpt_plan_from_the_built_graph_equals_the_full_trace(
    dropout: float, traced_depths: list[int]
) -> None:
    model, inputs = gpt(8, dropout)
    budget = _halfway(model, inputs)
    full = _plan(capture_joint_graphs(model, inputs)[0], budget)
    fast = _plan(capture_for_planning(model, inputs)[0], budget)
    assert traced_depths == [2, 3]
    assert any(t.action == "recompute" for t in full.tensors)  # the budget binds
    assert _decisions(fast) == _decisions(full)


def test_public_plan_takes_the_fast_path_and_matches(traced_depths: list[int]) -> None:
    model, inputs = gpt(8)
    budget = _halfway(model, inputs)
    full = _plan(capture_joint_graphs(model, inputs)[0], budget)
    got = graphckpt.plan(model, inputs, budget_gb=budget / (1 << 30))
    assert traced_depths == [2, 3]
    assert _decisions(got) == _decisions(full) | {"budget_bytes": got.budget_bytes}


def test_a_layer_dependent_loop_falls_back_to_the_full_trace(traced_depths: list[int]) -> None:
    model, x = DeepMLP(depth=8, scale_by_depth=True), torch.randn(4, 16)
    got = capture_for_planning(model, (x,))[0]
    assert traced_depths == [2, 3, 8]
    assert same_graph(got, capture_joint_graphs(model, (x,))[0]) is None


def test_layer_stack_needs_enough_identical_blocks() -> None:
    assert find_layer_stack(DeepMLP(depth=8), None, 8) == "trunk.layers"
    assert find_layer_stack(DeepMLP(depth=8), "trunk.layers", 8) == "trunk.layers"
    assert find_layer_stack(DeepMLP(depth=7), None, 8) is None
    assert find_layer_stack(DeepMLP(depth=8), "trunk", 8) is None
    assert find_layer_stack(DeepMLP(depth=8), "no.such.path", 8) is None
    odd = DeepMLP(depth=8)
    odd.trunk.layers[5].fc1 = nn.Linear(16, 32, bias=False)
    assert find_layer_stack(odd, None, 8) is None


def test_shortened_model_shares_blocks_and_leaves_the_model_alone() -> None:
    model = DeepMLP(depth=8)
    short = shortened(model, "trunk.layers", 3)
    assert len(short.trunk.layers) == 3 and len(model.trunk.layers) == 8
    assert short.trunk.layers[2] is model.trunk.layers[2] and short.inp is model.inp


def test_a_layer_number_attribute_may_differ_between_blocks() -> None:
    model = DeepMLP(depth=8)
    for i, layer in enumerate(model.trunk.layers):
        layer.layer_idx = i
    assert find_layer_stack(model, None, 8) == "trunk.layers"
    model.trunk.layers[3].layer_idx = 7
    assert find_layer_stack(model, None, 8) is None
