"""Part of stage 2 (cost): measure the scratch memory an op allocates and frees inside its kernel.

Some CPU kernels allocate more than their outputs while they run: oneDNN convolutions (forward
and backward) reorder their operands into temporary buffers, batch-norm backward and
``mse_loss`` make input-sized temporaries. A dispatch-mode tracker and the fake tensors of the
graph cannot see this memory; the CPU allocator does. This module runs each such op once on
random real tensors of the node's recorded shapes, strides and dtypes (``passes/real_run.py``)
under :func:`graphckpt.allocator.cpu_allocator_peak`, and reports the op's peak above what its
outputs hold when it returns. Measured on the CPU running the planner, so only meaningful when
the model runs on this CPU; callers pass nothing here when planning for CUDA or for meta models.
Reads ``val``; writes nothing.
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Iterable
from typing import Any

import torch
import torch.fx as fx

from graphckpt.allocator import cpu_allocator_peak
from passes.real_run import node_key, real_inputs, real_mode

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


def _measure(node: fx.Node, generator: torch.Generator) -> int:
    """Run ``node``'s op once under the allocator; the bytes it allocated and freed again."""
    op: Any = node.target
    held: list[Any] = []
    with real_mode():
        args, kwargs = real_inputs(node, generator)
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
        key = node_key(node)
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
