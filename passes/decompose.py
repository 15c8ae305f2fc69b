"""Before planning: split training-mode dropout so its mask can be kept apart from its output.

``native_dropout`` produces its output and its boolean mask in one op. Split into
``bernoulli`` (the random draw) -> ``ne`` (the bool mask) -> ``x * mask * scale``, the planner
can keep the 1-byte mask and recompute the output with two cheap multiplies, instead of keeping
the 4-byte output or replaying the generator (slow on CPU). The draws, the mask, the output and
the generator state afterwards are bitwise those of ``native_dropout``. This rewrite mutates the
joint graph; it reads ``val`` and writes ``val``, ``partitioner_tag`` and ``nn_module_stack``.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode

from passes.meta import PARTITIONER_TAG, VAL, node_val
from passes.trace import JointGraph

__all__ = ["split_dropout"]

_aten = torch.ops.aten


def _add(graph: fx.Graph, like: fx.Node, target: Any, args: tuple[Any, ...]) -> fx.Node:
    node = graph.call_function(target, args)
    node.meta = {k: v for k, v in like.meta.items() if k not in (VAL,)}
    node.meta[PARTITIONER_TAG] = "is_forward"
    vals = tuple(node_val(a) if isinstance(a, fx.Node) else a for a in args)
    fake_mode = detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])
    assert fake_mode is not None, "joint graph nodes carry fake tensors"
    with fake_mode:
        node.meta[VAL] = target(*vals)
    return node


def split_dropout(jg: JointGraph) -> int:
    """Replace each training-mode ``native_dropout`` in ``jg`` by bernoulli, mask and multiply.

    Args:
        jg: the joint graph (mutated, then its role lists refreshed).

    Returns:
        How many dropouts were split.

    Example:
        >>> # in a partitioner, before planning: split_dropout(jg)
    """
    graph = jg.gm.graph
    count = 0
    for node in list(jg.forward):
        if node.target is not _aten.native_dropout.default:
            continue
        x, p, train = node.args[0], node.args[1], node.args[2]
        if train is False or not isinstance(p, float) or not 0.0 <= p < 1.0:
            continue
        outputs = {u.args[1]: u for u in node.users if u.target is operator.getitem}
        if len(outputs) != len(node.users):
            continue
        with graph.inserting_before(node):
            draw = _add(graph, node, _aten.bernoulli.p, (x, 1.0 - p))
            mask = _add(graph, node, _aten.ne.Scalar, (draw, 0))
            kept = _add(graph, node, _aten.mul.Tensor, (x, mask))
            out = _add(graph, node, _aten.mul.Tensor, (kept, 1.0 / (1.0 - p)))
        for index, replacement in ((0, out), (1, mask)):
            if index in outputs:
                outputs[index].replace_all_uses_with(replacement)
                graph.erase_node(outputs[index])
        graph.erase_node(node)
        count += 1
    if count:
        graph.lint()
        jg.gm.recompile()
        jg.refresh()
    return count
