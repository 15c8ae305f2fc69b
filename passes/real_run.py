"""Part of stage 2 (cost): run one joint-graph node alone on random real CPU tensors.

What the cost model measures rather than models goes through here: kernel scratch memory
(``passes/scratch.py``) and kernel run time (``passes/op_seconds.py``). A node's inputs are made
as random CPU tensors of the shapes, strides and dtypes its ``val`` records, outside every
dispatch mode (planning runs under AOTAutograd's fake tensor mode) and outside autocast.
Measurements that depend only on those are cached by :func:`node_key`. Reads ``val``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Hashable, Iterator
from typing import Any

import torch
import torch.fx as fx
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils._pytree import tree_map

from passes.meta import node_val

__all__ = ["node_key", "real_inputs", "real_mode"]


def _describe(value: Any) -> Hashable:
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), tuple(value.stride()), value.dtype)
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_describe(v) for v in value))
    if isinstance(value, (int, float, bool, str, type(None), torch.dtype, torch.device)):
        return value
    return repr(value)


def node_key(node: fx.Node) -> Hashable:
    """What running the node alone depends on: the op, its tensors' shapes/strides/dtypes, and
    its other arguments. Nodes with equal keys measure the same.

    Example:
        >>> g = fx.Graph()
        >>> a, b = g.placeholder("a"), g.placeholder("b")
        >>> a.meta["val"] = b.meta["val"] = torch.empty(2, 3)
        >>> x, y = g.call_function(torch.ops.aten.relu.default, (a,)), g.call_function(
        ...     torch.ops.aten.relu.default, (b,))
        >>> node_key(x) == node_key(y)
        True
    """

    def val(a: Any) -> Any:
        return node_val(a) if isinstance(a, fx.Node) else a

    return (
        node.target,
        _describe(tree_map(val, node.args)),
        _describe(tuple(sorted(tree_map(val, dict(node.kwargs)).items()))),
    )


def _real(value: Any, generator: torch.Generator) -> Any:
    """A CPU tensor with ``value``'s shape, strides and dtype, filled with random numbers.

    Filled through a flat storage, then strided: expanded tensors (stride 0) overlap, and
    in-place fills refuse those.
    """
    if not isinstance(value, torch.Tensor):
        return value
    shape, stride = tuple(value.shape), tuple(value.stride())
    span = 1 + sum((n - 1) * s for n, s in zip(shape, stride)) if all(shape) else 0
    flat = torch.empty(span, dtype=value.dtype, device="cpu")
    if flat.is_floating_point():
        flat.normal_(generator=generator)
    else:
        flat.zero_()
    return flat.as_strided(shape, stride)


def real_inputs(node: fx.Node, generator: torch.Generator) -> tuple[tuple[Any, ...], dict]:
    """``node``'s arguments with every node replaced by a random real CPU tensor of its shape.

    Call it under :func:`real_mode`, or the tensors are made fake by the mode planning runs in.
    """

    def real(a: Any) -> Any:
        return _real(node_val(a), generator) if isinstance(a, fx.Node) else a

    return tuple(tree_map(real, node.args)), tree_map(real, dict(node.kwargs))


@contextlib.contextmanager
def real_mode() -> Iterator[None]:
    """Suspend every dispatch mode (AOTAutograd's fake tensor mode among them), autocast (the
    graph's ops already carry their dtypes) and autograd, so an op runs as a plain CPU kernel."""
    with _disable_current_modes(), torch.autocast("cpu", enabled=False), torch.no_grad():
        yield
