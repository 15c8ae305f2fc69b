"""Part of stage 2 (cost): measure the scratch memory an op allocates and frees inside its kernel.

Some CPU kernels allocate more than their outputs while they run: oneDNN convolutions (forward
and backward) reorder their operands into temporary buffers, batch-norm backward and
``mse_loss`` make input-sized temporaries. A dispatch-mode tracker and the fake tensors of the
graph cannot see this memory; the CPU allocator does. This module runs each such op once on
random real tensors of the node's recorded shapes, strides and dtypes under
:func:`graphckpt.allocator.cpu_allocator_peak`, and reports the op's peak above what its outputs
hold when it returns. Measured on the CPU running the planner, so only meaningful when the model
runs on this CPU; callers pass nothing here when planning for CUDA or for meta models.
Reads ``val``; writes nothing.
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Iterable
from typing import Any

import torch
import torch.fx as fx
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils._pytree import tree_map

from graphckpt.allocator import cpu_allocator_peak
from passes.meta import node_val

__all__ = ["SCRATCH_OPS", "measure_scratch_bytes"]

SCRATCH_OPS: frozenset[Any] = frozenset(
    {
        torch.ops.aten.convolution.default,
        torch.ops.aten.convolution_backward.default,
        torch.ops.aten.native_batch_norm_backward.default,
        torch.ops.aten.native_layer_norm_backward.default,
        torch.ops.aten.native_dropout_backward.default,
        torch.ops.aten.mse_loss.default,
    }
)
"""Ops measured: those found to allocate transient memory on CPU (torch 2.13) in the U-Net
benchmark's graph, by running every op of it alone at the allocator. Other ops found there
(pointwise, pooling, concatenation, batch-norm forward) allocate at most a few bytes beyond
their outputs. Layer-norm and dropout backward were found by the fuzz test
(``tests/test_fuzz.py``): layer-norm backward with no input gradient asked for allocated 144
bytes beyond its outputs on a (2, 9) input; dropout backward turns its mask into an
input-sized temporary (65,548 bytes beyond its output on a (64, 256) float input)."""


def _describe(value: Any) -> Hashable:
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), tuple(value.stride()), value.dtype)
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_describe(v) for v in value))
    if isinstance(value, (int, float, bool, str, type(None), torch.dtype, torch.device)):
        return value
    return repr(value)


def _node_key(node: fx.Node) -> Hashable:
    """What the op's allocations depend on: the op, tensor shapes/strides/dtypes, other args."""

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


def _measure(node: fx.Node, generator: torch.Generator) -> int:
    """Run ``node``'s op once under the allocator; the bytes it allocated and freed again.

    Planning runs inside torch.compile, under AOTAutograd's fake tensor mode; every mode is
    suspended here, or the "real" tensors would be fake and allocate nothing. So is autocast
    (the user's step may run under it): the graph's ops already carry their dtypes.
    """
    with _disable_current_modes(), torch.autocast("cpu", enabled=False):
        return _measure_real(node, generator)


def _measure_real(node: fx.Node, generator: torch.Generator) -> int:
    def real(a: Any) -> Any:
        return _real(node_val(a), generator) if isinstance(a, fx.Node) else a

    args = tree_map(real, node.args)
    kwargs = tree_map(real, dict(node.kwargs))
    op: Any = node.target
    held: list[Any] = []
    with torch.no_grad():
        peak = cpu_allocator_peak(lambda: held.append(op(*args, **kwargs)))
    # What is still allocated at the end is the op's outputs (which the cost model charges
    # already) and any one-time state a first call leaves (oneDNN's primitive cache); the rest
    # of the peak was transient. A warm second call was measured to peak the same.
    return max(peak.peak_bytes - peak.final_bytes, 0)


def measure_scratch_bytes(nodes: Iterable[fx.Node]) -> dict[fx.Node, int]:
    """Measure the transient bytes each node of :data:`SCRATCH_OPS` allocates while it runs.

    Each distinct (op, tensor shapes/strides/dtypes, non-tensor arguments) is run once on random
    CPU tensors; nodes with the same key share the result. The cache
    lives only for this call. Every other node gets no entry (its scratch is taken as 0).

    Args:
        nodes: joint-graph nodes whose ``val`` holds (fake) CPU tensors.

    Returns:
        Scratch bytes per measured node: the op's allocator peak minus what its outputs hold
        when it returns.

    An op that cannot be measured (it fails on random inputs, or a profiler is already
    running) gets 0 bytes and a warning naming the node.

    Example:
        >>> from passes.trace import capture_joint_graphs
        >>> jg = capture_joint_graphs(torch.nn.Conv2d(3, 8, 3), (torch.randn(2, 3, 16, 16),))[0]
        >>> scratch = measure_scratch_bytes(jg.forward)
        >>> all(v >= 0 for v in scratch.values())
        True
    """
    generator = torch.Generator().manual_seed(0)
    cache: dict[Hashable, int] = {}
    scratch: dict[fx.Node, int] = {}
    for node in nodes:
        if node.op != "call_function" or node.target not in SCRATCH_OPS:
            continue
        key = _node_key(node)
        if key not in cache:
            try:
                cache[key] = _measure(node, generator)
            except Exception as e:  # a kernel that rejects random inputs, a profiler running
                warnings.warn(
                    f"could not measure the scratch memory of {node.format_node()} ({e}); "
                    "taking 0 bytes, so the step may exceed the planned peak by that op's "
                    "scratch; leave a margin in the budget",
                    stacklevel=2,
                )
                cache[key] = 0
        scratch[node] = cache[key]
    return scratch
