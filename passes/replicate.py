"""Stage 1 for planning deep models: trace 2 and 3 layers of the layer stack, build N from them.

Tracing costs about a millisecond per op, so a 48-layer model takes seconds to trace. When the
model holds one stack of at least ``min_layers`` identical blocks (a ``ModuleList`` or
``Sequential``; the ``layers`` hint names it), ``capture_for_planning`` traces shortened copies of
the model with 2 and 3 blocks (the same block objects, nothing copied or run) and builds the
N-layer joint graph from their period (``passes/periodic.py``, ``passes/synthesize.py``). Any
doubt (several stacks, blocks that differ, graphs that are not periodic, a shortened model that
does not trace) falls back to tracing the whole model. For planning only: the runtime path traces
the real model.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from torch import nn

from graphckpt.errors import TraceError
from passes.periodic import PeriodError
from passes.synthesize import periodic_graph
from passes.trace import JointGraph, capture_joint_graphs

__all__ = ["capture_for_planning", "find_layer_stack", "shortened"]

_SIMPLE = (bool, int, float, str, type(None))


def _block_fingerprint(block: nn.Module) -> tuple[dict[tuple[str, str], Any], tuple[Any, ...]]:
    """What must be equal between two blocks for their traced graphs to be copies: simple
    attributes by (submodule, name), and the submodules' classes, tensor shapes and hooks."""
    attrs: dict[tuple[str, str], Any] = {}
    parts: list[Any] = []
    for name, module in block.named_modules():
        for key, value in vars(module).items():
            if not key.startswith("_") and isinstance(value, _SIMPLE):
                attrs[name, key] = (type(value), value)
        own = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        tensors = [(n, tuple(t.shape), t.dtype, t.requires_grad) for n, t in own]
        hooks = (len(module._forward_hooks), len(module._forward_pre_hooks))
        parts.append((name, type(module), tuple(tensors), hooks))
    return attrs, tuple(parts)


def _is_layer_stack(module: nn.Module, min_layers: int) -> bool:
    if not isinstance(module, (nn.ModuleList, nn.Sequential)) or len(module) < min_layers:
        return False
    blocks = list(module)
    if not all(len(b._modules) > 0 for b in blocks):  # bare Linear/ReLU lists are one chain
        return False
    prints = [_block_fingerprint(b) for b in blocks]
    # An int attribute equal to the block's position in every block is a layer number
    # (``layer_idx``): it may differ. Whether the graph depends on it, the period check sees.
    numbers = {
        key for key in prints[0][0] if all(p[0].get(key) == (int, i) for i, p in enumerate(prints))
    }
    first = {k: v for k, v in prints[0][0].items() if k not in numbers}, prints[0][1]
    return all(({k: v for k, v in a.items() if k not in numbers}, s) == first for a, s in prints)


def find_layer_stack(model: nn.Module, layers: str | None, min_layers: int) -> str | None:
    """The module path of the model's one stack of at least ``min_layers`` identical blocks.

    Args:
        model: the model to plan.
        layers: the PlanConfig hint (the stack's path); searched for when None.
        min_layers: the smallest stack worth building from a period.

    Returns:
        The path (``""`` when ``model`` itself is the stack), or None when there is no such
        stack, more than one, or its blocks differ.

    Example:
        >>> from graphckpt.examples.gpt import GPT, GPTConfig
        >>> find_layer_stack(GPT(GPTConfig(n_layer=8)), None, 8)
        'blocks'
    """
    if layers is not None:
        try:
            stack = model.get_submodule(layers)
        except AttributeError:
            return None
        return layers if _is_layer_stack(stack, min_layers) else None
    found = [name for name, m in model.named_modules() if _is_layer_stack(m, min_layers)]
    return found[0] if len(found) == 1 else None


def _shallow(module: nn.Module) -> nn.Module:
    """A new module object sharing everything with ``module`` but its own child table."""
    twin = copy.copy(module)
    twin._modules = dict(module._modules)
    return twin


def shortened(model: nn.Module, path: str, num_layers: int) -> nn.Module:
    """``model`` with only the first ``num_layers`` blocks of the stack at ``path``.

    Modules on the path to the stack are shallow copies; everything else, the blocks included,
    is shared with ``model``, which is not modified.

    Example:
        >>> from graphckpt.examples.gpt import GPT, GPTConfig
        >>> model = GPT(GPTConfig(n_layer=8))
        >>> len(shortened(model, "blocks", 2).blocks), len(model.blocks)
        (2, 8)
    """
    root = _shallow(model)
    parent, parts = root, path.split(".") if path else []
    for part in parts:
        child = _shallow(parent._modules[part])  # type: ignore[arg-type]
        parent._modules[part] = child
        parent = child
    names = list(parent._modules)[:num_layers]
    parent._modules = {name: parent._modules[name] for name in names}
    return root


def _periodic(
    model: nn.Module, args: Sequence[Any], kwargs: dict[str, Any], path: str
) -> list[JointGraph] | None:
    num_layers = len(model.get_submodule(path))
    try:
        g2 = capture_joint_graphs(shortened(model, path, 2), args, kwargs)
        g3 = capture_joint_graphs(shortened(model, path, 3), args, kwargs)
    except TraceError:
        return None  # the full trace says what does not trace
    if len(g2) != 1 or len(g3) != 1:
        return None
    try:
        return [periodic_graph(g2[0], g3[0], num_layers)]
    except PeriodError:
        return None


def capture_for_planning(
    model: nn.Module,
    args: Sequence[Any],
    kwargs: dict[str, Any] | None = None,
    *,
    layers: str | None = None,
    min_layers: int = 8,
) -> list[JointGraph]:
    """The model's joint graph for planning: built from 2 and 3 traced layers when the model
    has one stack of at least ``min_layers`` identical blocks, else traced in full.

    Args:
        model: the module to plan.
        args, kwargs: one training call's inputs.
        layers: module path of the layer stack (PlanConfig.layers); searched for when None.
        min_layers: the smallest stack built from its period.

    Returns:
        What :func:`passes.trace.capture_joint_graphs` returns for the whole model.

    Raises:
        TraceError: the model cannot be captured.

    Example:
        >>> from graphckpt.examples import gpt_example
        >>> model, inputs = gpt_example(n_layer=8, n_embd=32, seq=16, batch=2)
        >>> len(capture_for_planning(model, inputs)[0].primals)
        102
    """
    kwargs = dict(kwargs or {})
    path = find_layer_stack(model, layers, min_layers)
    graphs = _periodic(model, args, kwargs, path) if path is not None else None
    if graphs is not None:
        return graphs
    return capture_joint_graphs(model, args, kwargs)
