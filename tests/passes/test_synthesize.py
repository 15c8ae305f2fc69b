"""Tests of passes/synthesize.py: graphs built from the period equal the traced ones."""

from __future__ import annotations

import pytest
import torch

from passes.periodic import learn_period
from passes.synthesize import periodic_graph, same_graph, synthesize
from tests.passes._periodic_models import DeepMLP, gpt, joint


@pytest.mark.parametrize("dropout", [0.1, 0.0])
def test_eight_gpt_layers_built_from_two_and_three_equal_the_trace(dropout: float) -> None:
    built = periodic_graph(joint(*gpt(2, dropout)), joint(*gpt(3, dropout)), 8)
    traced = joint(*gpt(8, dropout))
    assert same_graph(built, traced) is None
    assert [n.name for n in built.forward] == [n.name for n in traced.forward]
    assert built.partition_kwargs == traced.partition_kwargs


def test_nested_stack_without_dropout_equals_the_trace() -> None:
    x = torch.randn(4, 16)
    two, three = joint(DeepMLP(depth=2), (x,)), joint(DeepMLP(depth=3), (x,))
    assert same_graph(periodic_graph(two, three, 9), joint(DeepMLP(depth=9), (x,))) is None


def test_same_graph_reports_a_difference() -> None:
    period = learn_period(joint(*gpt(2)), joint(*gpt(3)))
    assert same_graph(synthesize(period, 4), synthesize(period, 4)) is None
    assert same_graph(synthesize(period, 4), synthesize(period, 5)) is not None


def test_copies_carry_their_own_layer_path() -> None:
    built = synthesize(learn_period(joint(*gpt(2)), joint(*gpt(3))), 6)
    paths = {p for n in built.forward for p, _c in (n.meta.get("nn_module_stack") or {}).values()}
    assert {f"L['model'].blocks.{i}" for i in range(6)} <= paths
