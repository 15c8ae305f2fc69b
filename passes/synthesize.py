"""Before planning, for deep models: build the N-layer joint graph from the period of the 2- and
3-layer ones (``passes/periodic.py``), instead of tracing N layers.

Layer 0 and the code outside the layers are emitted as traced, layers 1..N-2 copy layer 1, layer
N-1 copies layer 2; nodes are named in order, as tracing names them. The result is trusted only if
the same construction rebuilds the traced 2- and 3-layer graphs exactly (names, ops, arguments,
shapes, module paths). Copies share their template's fake tensors (same shapes, dtypes, strides,
not the same storages): the graph is for planning, never to run. Writes ``val``,
``nn_module_stack``, ``fwd_nn_module_stack`` and ``partitioner_tag`` on the new graph (module
stacks keyed by path where Dynamo keys them by module id).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx
from torch.utils._pytree import tree_unflatten

from passes.periodic import (
    FIXED,
    STACK_KEYS,
    TOP,
    Item,
    OutEntry,
    Period,
    PeriodError,
    Ref,
    exact_key,
    flat_args,
    item_name,
    items_of,
    learn_period,
    shifted_stack,
)
from passes.trace import JointGraph

__all__ = ["periodic_graph", "same_graph", "synthesize"]

_SUFFIX = re.compile(r"_\d+$")


@dataclass
class _Builder:
    """Emits the items of a ``num_layers`` graph into a new fx graph, in order."""

    period: Period
    num_layers: int
    graph: fx.Graph = field(default_factory=fx.Graph)
    emitted: dict[tuple[int, int], fx.Node] = field(default_factory=dict)
    outputs: list[fx.Node | None] = field(default_factory=list)
    placeholders: dict[str, int] = field(default_factory=dict)
    made: list[int] = field(default_factory=list)
    """Positions of the placeholders emitted, in order."""

    def resolve(self, ref: Ref, layer: int) -> fx.Node:
        kind, q, delta = ref
        try:
            if kind == "fixed":
                return self.emitted[q, -1]
            top = self.num_layers - 1
            at = {"item": layer, "one": 1, "top": top}[kind] + delta
            if at == 0:
                return self.emitted[self.period.below[q], -1]
            return self.emitted[(self.period.top_of[q], top) if at == top else (q, at)]
        except KeyError as e:
            raise PeriodError(f"no layer version of item {q} for {self.num_layers} layers") from e

    def emit(self, p: int, layer: int) -> None:
        period = self.period
        item = period.items[p]
        refs = iter(period.refs[p])
        leaves, spec = period.flat[p]
        leaves = [self.resolve(next(refs), layer) if isinstance(a, fx.Node) else a for a in leaves]
        if isinstance(item, OutEntry):
            self.outputs.append(leaves[0])
            return
        args, kwargs = tree_unflatten(leaves, spec)
        if item.op == "placeholder":
            prefix = _SUFFIX.sub("", item.name)
            self.placeholders[prefix] = count = self.placeholders.get(prefix, 0) + 1
            name = f"{prefix}_{count}"
            node = self.graph.create_node("placeholder", name, name=name)
            self.made.append(p)
        else:
            node = self.graph.create_node(
                item.op, item.target, args, kwargs, name=_SUFFIX.sub("", item.name)
            )
        node.meta = dict(item.meta)
        if layer >= 0:
            low = period.items[period.twin_of.get(p, p)]
            high = period.items[period.top_of.get(p, p)]
            assert isinstance(low, fx.Node) and isinstance(high, fx.Node)
            for key in STACK_KEYS:
                if key in item.meta:
                    node.meta[key] = shifted_stack(low.meta[key], high.meta[key], layer)
        self.emitted[p, layer] = node

    def run(self) -> None:
        period, top = self.period, self.num_layers - 1
        starts = {start: (k, ascending) for start, k, ascending in period.blocks}
        for p, role in enumerate(period.role):
            if role == FIXED:
                self.emit(p, -1)
            elif role == TOP:
                self.emit(p, top)
            elif p in starts:
                k, ascending = starts[p]
                layers = range(1, top) if ascending else range(top - 1, 0, -1)
                for layer in layers:
                    for i in range(k):
                        self.emit(p + i, layer)


def synthesize(period: Period, num_layers: int) -> JointGraph:
    """The joint graph of the same model with ``num_layers`` layers in its stack.

    Layer 0 and the code outside the layers are the traced ones, layers 1..N-2 copy layer 1,
    layer N-1 copies layer 2; names are given in order, as tracing gives them.

    Args:
        period: from :func:`learn_period`.
        num_layers: the depth to build, at least 2.

    Returns:
        A JointGraph for planning (its copies share layer 1's and layer 2's fake tensors).

    Raises:
        PeriodError: a reference has no counterpart at this depth.

    Example:
        >>> # jg = synthesize(learn_period(g2, g3), 48)
    """
    if num_layers < 2:
        raise PeriodError(f"num_layers must be >= 2, got {num_layers}")
    builder = _Builder(period, num_layers)
    builder.run()
    builder.graph.output(builder.outputs)
    source = period.jg
    kwargs = dict(source.partition_kwargs)
    static = kwargs.get("static_lifetime_input_indices")
    if static is not None:
        placeholders = [p for p, i in enumerate(period.items) if _is_placeholder(i)]
        flagged = {placeholders[i] for i in static}
        kwargs["static_lifetime_input_indices"] = [
            i for i, p in enumerate(builder.made) if p in flagged
        ]
    gm = fx.GraphModule(source.gm, builder.graph)
    return JointGraph(gm, source.num_fwd_outputs, kwargs, source.index, source.untraced_bytes)


def _is_placeholder(item: Item) -> bool:
    return isinstance(item, fx.Node) and item.op == "placeholder"


def _describe(item: Item) -> tuple[Any, ...]:
    if isinstance(item, OutEntry):
        return ("out", None if item.node is None else item.node.name)
    leaves, spec = flat_args(item)
    args = tuple(a.name if isinstance(a, fx.Node) else repr(a) for a in leaves)
    stacks = tuple(
        tuple((p, c) for p, c in (item.meta.get(key) or {}).values()) for key in STACK_KEYS
    )
    return (item.name, exact_key(item), args, str(spec), stacks)


def same_graph(a: JointGraph, b: JointGraph) -> str | None:
    """The first difference between two joint graphs (names, ops, arguments, shapes, module
    stacks, roles), or None when they are the same.

    Example:
        >>> # assert same_graph(synthesize(period, 2), g2) is None
    """
    if (a.num_fwd_outputs, a.partition_kwargs) != (b.num_fwd_outputs, b.partition_kwargs):
        return "forward outputs or partitioner arguments differ"
    items_a, items_b = items_of(a.gm), items_of(b.gm)
    if len(items_a) != len(items_b):
        return f"{len(items_a)} items against {len(items_b)}"
    for x, y in zip(items_a, items_b):
        if _describe(x) != _describe(y):
            return f"{item_name(x)} differs from {item_name(y)}"
    return None


def periodic_graph(g2: JointGraph, g3: JointGraph, num_layers: int) -> JointGraph:
    """The ``num_layers``-deep joint graph, built from ``g2`` and ``g3`` and checked on them.

    Args:
        g2, g3: joint graphs of the model with 2 and 3 layers in its stack.
        num_layers: the depth of the real model.

    Returns:
        The synthesized JointGraph.

    Raises:
        PeriodError: the graphs are not periodic, or rebuilding ``g2`` or ``g3`` from the
            period does not give them back exactly.

    Example:
        >>> # jg = periodic_graph(g2, g3, 48)
    """
    period = learn_period(g2, g3)
    for depth, traced in ((2, g2), (3, g3)):
        difference = same_graph(synthesize(period, depth), traced)
        if difference is not None:
            raise PeriodError(f"rebuilding the {depth}-layer graph: {difference}")
    return synthesize(period, num_layers)
