"""Tests of passes/decompose.py: split dropout draws, masks and outputs exactly as before."""

from __future__ import annotations

import torch

from passes.decompose import split_dropout
from passes.trace import capture_joint_graphs


def test_split_dropout_is_bitwise_native_dropout() -> None:
    x = torch.randn(4, 8, 16)
    torch.manual_seed(0)
    out, mask = torch.ops.aten.native_dropout.default(x, 0.1, True)
    after = torch.get_rng_state()
    torch.manual_seed(0)
    draw = torch.ops.aten.bernoulli.p(x, 0.9)
    split_mask = torch.ops.aten.ne.Scalar(draw, 0)
    split_out = x * split_mask * (1.0 / 0.9)
    assert torch.equal(mask, split_mask) and torch.equal(out, split_out)
    assert torch.equal(after, torch.get_rng_state())


def test_split_dropout_rewrites_the_joint_graph(tiny_gpt) -> None:
    model, inputs = tiny_gpt
    jg = capture_joint_graphs(model, inputs)[0]
    before = sum(1 for n in jg.forward if "native_dropout" in str(n.target))
    assert before > 0
    assert split_dropout(jg) == before
    targets = [str(n.target) for n in jg.gm.graph.nodes]
    assert not any(t == "aten.native_dropout.default" for t in targets)
    assert sum(t == "aten.bernoulli.p" for t in targets) == before
    assert all(
        n.meta.get("nn_module_stack") is not None
        for n in jg.forward
        if "bernoulli" in str(n.target)
    )
