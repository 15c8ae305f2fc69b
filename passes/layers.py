"""Find the model's layers in a joint graph: the repeated blocks the planner reasons about.

Forward nodes are grouped by the module they were traced in (``nn_module_stack``). The layer
container is the module path whose numbered children cover the most nodes (``blocks.0``,
``blocks.1``, ... or ``transformer.h.0``, ...), unless the user names it. Nodes before the first
layer form a ``pre`` segment, nodes after the last a ``post`` segment. Layers with the same
structure share a signature, so the planner solves each distinct layer once. Reads
``nn_module_stack`` and ``val``; writes nothing.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass

import torch
import torch.fx as fx

from passes.meta import module_paths, node_val, tensor_bytes

__all__ = ["Segment", "find_segments"]


@dataclass(frozen=True, eq=False)
class Segment:
    """A run of forward nodes: one layer of the model, or the code before or after the layers."""

    name: str
    nodes: list[fx.Node]
    signature: int
    """Equal for segments with the same structure (their nodes correspond by position)."""


def _dotted(path: str) -> str:
    return re.sub(r"\[(?:'([^']*)'|(\d+))\]", lambda m: "." + (m.group(1) or m.group(2)), path)


# Dynamo names the traced root ``L['self']`` (a compiled module), ``L['model']`` (the model
# argument of passes.trace.fresh_module_call, which auto_checkpoint and graphckpt.plan compile)
# or ``L['fn'].args[0]`` (a compiled partial bound to the module).
_ROOT = re.compile(r"^L\.(?:self|model|fn\.args\.\d+)(?:\.|$)")


def _relative(dotted: str) -> str:
    match = _ROOT.match(dotted)
    return dotted[match.end() :].strip(".") if match else ""


def _relative_paths(node: fx.Node) -> list[str]:
    """Module paths relative to the root module: ``L['self'].blocks[3]`` -> ``blocks.3``."""
    return [rel for rel in (_relative(_dotted(p)) for p in module_paths(node)) if rel]


def _layer_of(node: fx.Node, containers: list[str]) -> str | None:
    for p in _relative_paths(node):
        for container in containers:
            prefix = f"{container}." if container else ""
            if p.startswith(prefix):
                rest = p[len(prefix) :].split(".")[0]
                if rest.isdigit():
                    return f"{prefix}{rest}"
    return None


def _is_primitive(cls: object) -> bool:
    """A built-in torch.nn leaf module (Linear, ReLU, Conv2d, ...), not a block of modules."""
    containers = (torch.nn.Sequential, torch.nn.ModuleList, torch.nn.ModuleDict)
    return (
        isinstance(cls, type)
        and cls.__module__.startswith("torch.nn.modules")
        and not issubclass(cls, containers)
    )


def _detect_containers(nodes: list[fx.Node]) -> list[str]:
    """Module lists with at least two numbered children, at least one of them a block of its own
    (a list of bare Linear/ReLU modules is one chain to the planner, not layers: a min-cut per
    single op could not recompute across ops)."""
    coverage: Counter[str] = Counter()
    indices: dict[str, set[str]] = {}
    composite: set[str] = set()
    for node in nodes:
        stack = list((node.meta.get("nn_module_stack") or {}).values())
        classes = {_relative(_dotted(path)): cls for path, cls in stack}
        for path in _relative_paths(node):
            parts = path.split(".")
            for i, part in enumerate(parts):
                if part.isdigit():
                    prefix = ".".join(parts[:i])
                    indices.setdefault(prefix, set()).add(part)
                    coverage[prefix] += 1
                    if not _is_primitive(classes.get(".".join(parts[: i + 1]))):
                        composite.add(prefix)
                    break
    return [p for p in coverage if len(indices[p]) >= 2 and p in composite]


def _signature(nodes: list[fx.Node]) -> int:
    position = {n: i for i, n in enumerate(nodes)}
    parts = []
    for n in nodes:
        val = node_val(n)
        shape = (tuple(val.shape), str(val.dtype)) if isinstance(val, torch.Tensor) else None
        refs = tuple(position.get(a, a.op == "placeholder") for a in n.all_input_nodes)
        args = tuple(a for a in n.args if not isinstance(a, (fx.Node, list, tuple)))
        parts.append((str(n.target), shape, refs, repr(args)))
    return hash(tuple(parts))


def _chunks(forward: list[fx.Node]) -> list[Segment]:
    """Without repeated layers: about sqrt(n) contiguous chunks of equal activation bytes.

    A min-cut over one undivided graph only finds "keep all" or "keep inputs only" on a uniform
    chain (its objective is linear along it); chunks let the search keep some chunk boundaries
    and recompute inside others, which lowers the peak in between (sqrt(n) checkpointing).
    """
    sizes = [tensor_bytes(node_val(n)) for n in forward]
    total = sum(sizes)
    count = max(1, min(32, round(math.sqrt(sum(1 for b in sizes if b) or 1))))
    if count == 1 or total == 0:
        return [Segment("model", forward, _signature(forward))]
    groups: list[list[fx.Node]] = [[]]
    running = 0
    for node, size in zip(forward, sizes):
        if running >= total * len(groups) / count and len(groups) < count:
            groups.append([])
        groups[-1].append(node)
        running += size
    return [Segment(f"part.{i}", g, _signature(g)) for i, g in enumerate(groups) if g]


def find_segments(forward: list[fx.Node], layers: str | None = None) -> list[Segment]:
    """Split forward nodes into ``pre``, one segment per layer, and ``post``, in forward order.

    Args:
        forward: the joint graph's forward nodes, in order.
        layers: module path of the layer container (``"blocks"``); when None, every module
            list with at least two numbered children traced in the graph is a layer container.

    Returns:
        Segments covering every forward node exactly once. A model without repeated layers
        is cut into about sqrt(n) chunks of equal activation bytes (``part.0``, ...).

    Raises:
        ValueError: ``layers`` names a path no forward node was traced in.

    Example:
        >>> find_segments([])
        []
    """
    if not forward:
        return []
    containers = [layers] if layers else _detect_containers(forward)
    if not containers:
        return _chunks(list(forward))
    labels = [_layer_of(n, containers) for n in forward]
    if layers is not None and not any(labels):
        raise ValueError(
            f"layers={layers!r} matches no module in the traced graph; pass the attribute path "
            "of the ModuleList holding the layers (e.g. 'blocks' or 'transformer.h')"
        )
    # Nodes traced outside any layer (glue in the parent's forward) join the layer before them.
    current = "pre"
    seen_layer = False
    names: list[str] = []
    for label in labels:
        if label is not None:
            current, seen_layer = label, True
        names.append(current)
    last_layer = max((i for i, label in enumerate(labels) if label), default=-1)
    for i in range(last_layer + 1, len(names)):
        if seen_layer:
            names[i] = "post"
    groups: dict[str, list[fx.Node]] = {}
    for name, node in zip(names, forward):
        groups.setdefault(name, []).append(node)
    return [Segment(name, nodes, _signature(nodes)) for name, nodes in groups.items()]
