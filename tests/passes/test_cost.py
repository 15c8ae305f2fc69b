"""Tests of passes/cost.py: bytes, FLOPs and seconds per node, and fused (inductor) pricing."""

from __future__ import annotations

import doctest
import importlib

import torch
from torch import nn

from graphckpt.options import DeviceSpec
from passes.cost import estimate_costs
from passes.meta import node_val, tensor_bytes
from passes.trace import JointGraph, capture_joint_graphs

_aten = torch.ops.aten


class _MulThenLinear(nn.Module):
    """linear -> relu -> *2 -> linear: relu's output feeds only pointwise ops, the product
    feeds a matmul in forward and in backward."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(64, 64)
        self.b = nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x).relu() * 2).sum()


def _graph() -> JointGraph:
    torch.manual_seed(0)
    (jg,) = capture_joint_graphs(_MulThenLinear(), (torch.randn(32, 64),))
    return jg


def _only(jg: JointGraph, target: object) -> torch.fx.Node:
    (node,) = [n for n in jg.forward if n.target is target]
    return node


def test_unfused_costs_are_a_roofline_and_keeping_is_free() -> None:
    jg = _graph()
    spec = DeviceSpec()
    costs = estimate_costs([*jg.forward, *jg.backward], spec)
    relu = _only(jg, _aten.relu.default)
    nbytes = tensor_bytes(node_val(relu))
    assert costs[relu].out_bytes == nbytes
    assert costs[relu].seconds == spec.op_overhead_s + 2 * nbytes / spec.bytes_per_s
    assert costs[relu].flops == 0
    assert all(c.keep_seconds == 0 for c in costs.values())
    addmm = [n for n in jg.forward if n.target is _aten.addmm.default]
    assert all(costs[n].flops == 2 * 32 * 64 * 64 for n in addmm)


def test_fused_pointwise_recompute_is_free_and_keeping_costs_a_write() -> None:
    jg = _graph()
    spec = DeviceSpec()
    costs = estimate_costs(
        [*jg.forward, *jg.backward], spec, fused_pointwise=True, backward=jg.backward
    )
    relu, mul = _only(jg, _aten.relu.default), _only(jg, _aten.mul.Tensor)
    write = tensor_bytes(node_val(relu)) / spec.bytes_per_s
    # relu feeds only pointwise ops (the multiply; threshold_backward in backward): inductor
    # fuses its recompute for free, and keeping it costs a write forward would not make.
    assert costs[relu].seconds == 0.0
    assert costs[relu].keep_seconds == write
    # The product feeds a matmul in forward (written out anyway: free to keep) and in backward
    # (recomputed, it must be written out there).
    assert costs[mul].keep_seconds == 0.0
    assert costs[mul].seconds == write
    # Matmuls are priced as without fusion.
    unfused = estimate_costs([*jg.forward, *jg.backward], spec)
    for n in jg.forward:
        if n.target is _aten.addmm.default:
            assert costs[n] == unfused[n]


class _SinCos(nn.Module):
    """Backward reads y = a(x), sin(y) and cos(sin(y)); sin(y) is recomputable from y."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(64, 64)
        self.b = nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x).sin().cos()).sum()


def test_fused_plans_keep_less_for_no_more_cost() -> None:
    """With fused pricing the cheapest plan recomputes pointwise ops instead of keeping them."""
    import graphckpt

    torch.manual_seed(0)
    model, x = _SinCos(), torch.randn(32, 64)
    plain = graphckpt.plan(model, (x,), budget_gb=1.0)
    fused = graphckpt.plan(model, (x,), budget_gb=1.0, fused_pointwise=True)
    assert plain.recompute_flops == fused.recompute_flops == 0
    assert {t.node for t in plain.tensors if t.action == "keep"} >= {"sin"}
    assert fused.kept_bytes == plain.kept_bytes - 32 * 64 * 4
    assert "sin" in {t.node for t in fused.tensors if t.action == "recompute"}


def test_docstring_examples() -> None:
    result = doctest.testmod(importlib.import_module("passes.cost"))
    assert result.failed == 0
