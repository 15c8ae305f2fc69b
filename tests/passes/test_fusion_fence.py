"""Tests of passes/fusion_fence.py: inductor fuses horizontally only within a recompute segment."""

from __future__ import annotations

import doctest
import importlib
from types import SimpleNamespace

import torch
import torch.fx as fx

from passes.fusion_fence import _apart, mark_segments, segment_fence
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


def _scheduler_node(*segments: int | None) -> SimpleNamespace:
    """A stand-in for inductor's scheduler node: lowered from fx nodes in ``segments``."""
    gm = _chain(len(segments))
    origins = [n for n in gm.graph.nodes if n.op == "call_function"]
    for node, segment in zip(origins, segments, strict=True):
        if segment is not None:
            node.meta[SEGMENT] = segment
    parts = [SimpleNamespace(node=SimpleNamespace(origins={o})) for o in origins]
    return SimpleNamespace(get_nodes=lambda: parts)


def test_nodes_are_apart_only_when_their_segment_ranges_are_disjoint() -> None:
    assert _apart(_scheduler_node(1), _scheduler_node(2))
    assert _apart(_scheduler_node(0, 1), _scheduler_node(3))
    assert not _apart(_scheduler_node(1), _scheduler_node(1))
    assert not _apart(_scheduler_node(1, 3), _scheduler_node(2))
    # Nodes inductor made itself carry no segment: no opinion, inductor decides.
    assert not _apart(_scheduler_node(None), _scheduler_node(2))


def test_the_fence_is_scoped_to_the_compile() -> None:
    from torch._inductor.virtualized import V

    before = type(V.choices)
    with segment_fence():
        fenced = V.choices
        assert type(fenced) is not before
        assert not fenced.can_fuse_horizontal(None, _scheduler_node(1), _scheduler_node(2), 0)
    assert type(V.choices) is before


def test_docstring_examples() -> None:
    module = importlib.import_module("passes.fusion_fence")
    assert doctest.testmod(module).failed == 0
