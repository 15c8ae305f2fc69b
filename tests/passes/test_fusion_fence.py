"""Tests of passes/fusion_fence.py: inductor fuses horizontally only within a recompute segment."""

from __future__ import annotations

import doctest
import importlib
from types import SimpleNamespace

import torch
import torch.fx as fx

from passes.fusion_fence import _Fence, mark_segments, segment_fence
from passes.meta import RECOMPUTED, SEGMENT


def _chain(n: int) -> fx.GraphModule:
    def f(x: torch.Tensor) -> torch.Tensor:
        for _ in range(n):
            x = x + 1
        return x

    return fx.symbolic_trace(f)


def test_each_run_of_recompute_nodes_starts_a_segment() -> None:
    gm = _chain(7)
    ops = [n for n in gm.graph.nodes if n.op == "call_function"]
    for i in (1, 2, 4, 6):  # runs: [1, 2], [4], [6]
        ops[i].meta[RECOMPUTED] = True
    assert mark_segments(gm) == 3
    assert [n.meta[SEGMENT] for n in ops] == [0, 1, 1, 1, 2, 2, 3]
    placeholder = next(iter(gm.graph.nodes))
    assert placeholder.meta[SEGMENT] == 0


def test_a_graph_without_recompute_is_one_segment() -> None:
    gm = _chain(3)
    assert mark_segments(gm) == 0
    assert {n.meta[SEGMENT] for n in gm.graph.nodes} == {0}


def _op(
    name: str, segment: int | None, *, recomputed: bool = True, ancestors=()
) -> SimpleNamespace:
    """A stand-in for one of inductor's scheduler ops, lowered from one fx node."""
    (origin,) = [n for n in _chain(1).graph.nodes if n.op == "call_function"]
    if segment is not None:
        origin.meta[SEGMENT] = segment
    origin.meta[RECOMPUTED] = recomputed
    op = SimpleNamespace(
        node=SimpleNamespace(origins={origin}), ancestors=set(ancestors), get_name=lambda: name
    )
    op.get_nodes = lambda: [op]
    return op


def _fused(*ops: SimpleNamespace) -> SimpleNamespace:
    return SimpleNamespace(get_nodes=lambda: list(ops))


def _scheduler(*ops: SimpleNamespace) -> SimpleNamespace:
    return SimpleNamespace(name_to_node={op.get_name(): op for op in ops})


def test_two_layers_recompute_is_not_fused() -> None:
    """The measured case: two layers' recomputed softmaxes read one causal mask."""
    a, b = _op("a", 1), _op("b", 2)
    assert _Fence().refuses(_scheduler(a, b), a, b)
    assert _Fence().refuses(_scheduler(a, b), b, a)


def test_a_fusion_that_pulls_recompute_along_is_refused() -> None:
    """A gradient op of segment 2 that reads segment 2's recompute would drag it up to 1."""
    recompute = _op("r", 2)
    grad = _op("g", 2, recomputed=False, ancestors={"r"})
    early = _op("e", 1, recomputed=False)
    assert _Fence().refuses(_scheduler(recompute, grad, early), early, grad)


def test_a_fusion_that_moves_no_recompute_is_left_to_inductor() -> None:
    earlier_recompute = _op("r", 1)
    grad = _op("g", 2, recomputed=False, ancestors={"r"})
    early = _op("e", 1, recomputed=False)
    sched = _scheduler(earlier_recompute, grad, early)
    assert not _Fence().refuses(sched, early, grad)
    # Overlapping segment ranges, or nodes inductor made itself (no segment): no opinion.
    assert not _Fence().refuses(sched, _fused(_op("x", 1), _op("y", 3)), _op("z", 2))
    assert not _Fence().refuses(sched, _op("n", None), _op("m", 2))


def test_the_fence_is_scoped_to_the_compile() -> None:
    from torch._inductor.virtualized import V

    before = type(V.choices)
    a, b = _op("a", 1), _op("b", 2)
    with segment_fence():
        fenced = V.choices
        assert type(fenced) is not before
        assert not fenced.can_fuse_horizontal(_scheduler(a, b), a, b, 0)
    assert type(V.choices) is before


def test_docstring_examples() -> None:
    module = importlib.import_module("passes.fusion_fence")
    assert doctest.testmod(module).failed == 0
