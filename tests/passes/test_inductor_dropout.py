"""Tests of passes/inductor_dropout.py: split dropouts become one native_dropout again, exactly."""

from __future__ import annotations

import operator

import pytest
import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode

from passes.inductor_dropout import merge_dropout

_aten = torch.ops.aten


def _split_dropout_graph(
    *, read_draw: bool = False, read_out: bool = True, scale: float = 1.0 / 0.9
) -> fx.GraphModule:
    """``x -> bernoulli -> ne -> x * mask * scale``, as passes/decompose.py writes it, returning
    ``(out * 2, mask)`` (and the draw itself with ``read_draw``), with fake ``val`` metadata."""
    graph = fx.Graph()
    fake = FakeTensorMode()
    x = graph.placeholder("x")
    x.meta["val"] = fake.from_tensor(torch.empty(4, 8))

    def add(target, *args):
        node = graph.call_function(target, args)
        vals = [a.meta["val"] if isinstance(a, fx.Node) else a for a in args]
        with fake:
            node.meta["val"] = target(*vals)
        return node

    draw = add(_aten.bernoulli.p, x, 0.9)
    mask = add(_aten.ne.Scalar, draw, 0)
    kept = add(_aten.mul.Tensor, x, mask)
    out = add(_aten.mul.Tensor, kept, scale)
    results = [add(_aten.mul.Tensor, out, 2.0) if read_out else mask, mask]
    if read_draw:
        results.append(add(_aten.add.Tensor, draw, 1.0))
    graph.output(tuple(results))
    return fx.GraphModule(torch.nn.Module(), graph)


def _run(gm: fx.GraphModule, x: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    torch.manual_seed(0)
    return gm(x), torch.get_rng_state()


def test_merged_dropout_draws_the_same_mask_output_and_generator_state() -> None:
    gm = _split_dropout_graph()
    x = torch.randn(4, 8)
    before, state_before = _run(gm, x)
    assert merge_dropout(gm) == 1
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert _aten.native_dropout.default in targets
    assert _aten.bernoulli.p not in targets and _aten.ne.Scalar not in targets
    getitems = [n for n in gm.graph.nodes if n.target is operator.getitem]
    assert all(isinstance(n.meta["val"], torch.Tensor) for n in getitems)
    after, state_after = _run(gm, x)
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert torch.equal(state_before, state_after)


@pytest.mark.parametrize(
    "options",
    [{"read_draw": True}, {"read_out": False}, {"scale": 2.0}],
    ids=["draw-read-elsewhere", "output-unread", "other-scale"],
)
def test_chains_that_are_not_a_whole_dropout_stay_split(options) -> None:
    gm = _split_dropout_graph(**options)
    code = gm.code
    assert merge_dropout(gm) == 0
    assert gm.code == code
