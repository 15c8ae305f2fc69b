"""Part of stage 2 (cost): time the forward ops that backward may recompute, on this CPU.

The roofline (``passes/cost.py``) prices an op at the device's peak matmul rate or memory
bandwidth, whichever binds: a lower bound on its time. Some CPU kernels run far slower than
that. On the benchmark U-Net, ``max_pool2d_with_indices`` of an (8, 16, 64, 64) input took
1.5 ms alone on a quiet machine, where the roofline says 0.19 ms, and the planner chose to
recompute it as the cheapest way to free 1.5 MiB; the step then ran 1-3% slower than
recomputing a whole layer. So, when asked (``PlanConfig.measure_op_seconds``) and the rewritten
graphs run eagerly on this CPU, each distinct forward op is run alone on random tensors of its
shapes (``passes/real_run.py``), and the cost model takes the larger of the two.
Reads ``val``; writes nothing.
"""

from __future__ import annotations

import math
import operator
import time
import warnings
from collections.abc import Hashable, Iterable
from typing import Any

import torch
import torch.fx as fx
from torch.utils._pytree import tree_leaves

from graphckpt.options import DeviceSpec, PlanConfig
from passes.meta import is_random, is_seeded_draw, is_view, node_val
from passes.real_run import node_key, real_inputs, real_mode

__all__ = ["measurable", "measure_op_seconds", "measures_op_seconds"]


def measurable(node: fx.Node) -> bool:
    """Whether ``node`` is an ATen op on CPU tensors that running alone can time: not a view
    or ``getitem`` (they move no data), not a random op (running it would draw numbers, and its
    price is the draw rate), with at least one tensor output.

    Example:
        >>> g = fx.Graph()
        >>> x = g.placeholder("x")
        >>> x.meta["val"] = torch.empty(4)
        >>> y = g.call_function(torch.ops.aten.relu.default, (x,))
        >>> y.meta["val"] = torch.empty(4)
        >>> measurable(y), measurable(x)
        (True, False)
    """
    if node.op != "call_function" or node.target is operator.getitem:
        return False
    if not isinstance(node.target, torch._ops.OpOverload):
        return False
    if is_view(node) or is_random(node) or is_seeded_draw(node):
        return False
    outputs = [v for v in tree_leaves(node_val(node)) if isinstance(v, torch.Tensor)]
    inputs = [node_val(a) for a in node.all_input_nodes]
    tensors = outputs + [v for v in inputs if isinstance(v, torch.Tensor)]
    return bool(outputs) and all(t.device.type == "cpu" for t in tensors)


def _seconds(node: fx.Node, generator: torch.Generator, repeats: int) -> float:
    """The fastest of ``repeats`` timed calls, after one untimed call (which pays one-time
    setup such as oneDNN's primitive creation)."""
    op: Any = node.target
    with real_mode():
        args, kwargs = real_inputs(node, generator)
        op(*args, **kwargs)
        best = math.inf
        for _ in range(repeats):
            start = time.perf_counter()
            op(*args, **kwargs)
            best = min(best, time.perf_counter() - start)
    return best


def measure_op_seconds(
    nodes: Iterable[fx.Node], *, repeats: int = 3, max_total_s: float = 10.0
) -> dict[fx.Node, float]:
    """Seconds each :func:`measurable` node's op takes when run alone on this CPU.

    Each distinct (op, tensor shapes/strides/dtypes, other arguments) is timed once, so the
    identical layers of a model share their measurements (and so their plans stay identical).
    Measuring stops after ``max_total_s`` of it, with a warning: the nodes not reached get no
    entry (the roofline alone prices them).

    Args:
        nodes: joint-graph nodes whose ``val`` holds (fake) CPU tensors; usually the forward.
        repeats: timed calls per distinct op (the fastest counts).
        max_total_s: the most time all measurements together may take.

    Returns:
        Seconds per measured node. A node whose op fails on random inputs gets no entry.

    Example:
        >>> from passes.trace import capture_joint_graphs
        >>> jg = capture_joint_graphs(torch.nn.Conv2d(3, 8, 3), (torch.randn(2, 3, 16, 16),))[0]
        >>> seconds = measure_op_seconds(jg.forward)
        >>> all(s > 0 for s in seconds.values())
        True
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    generator = torch.Generator().manual_seed(0)
    cache: dict[Hashable, float | None] = {}
    seconds: dict[fx.Node, float] = {}
    start = time.perf_counter()
    for node in nodes:
        if not measurable(node):
            continue
        key = node_key(node)
        if key not in cache:
            if time.perf_counter() - start > max_total_s:
                warnings.warn(
                    f"timing the graph's ops took over {max_total_s:.0f} s; the rest, from "
                    f"{node.format_node()} on, are priced by the roofline alone",
                    stacklevel=2,
                )
                break
            try:
                cache[key] = _seconds(node, generator, repeats)
            except Exception:  # an op that rejects random inputs: the roofline prices it
                cache[key] = None
        value = cache[key]
        if value is not None:
            seconds[node] = value
    return seconds


def measures_op_seconds(config: PlanConfig, device: torch.device, spec: DeviceSpec) -> bool:
    """Whether to time forward ops on this CPU (``PlanConfig.measure_op_seconds``)."""
    if not config.measure_op_seconds:
        return False
    if device.type == "cpu" and spec.type == "cpu" and not config.fused_pointwise:
        return True
    warnings.warn(
        "PlanConfig.measure_op_seconds=True is ignored: op times are measured only for a "
        f"model on this CPU planned for a CPU and run eagerly (device {device.type}, "
        f"planned for {spec.type}, fused_pointwise={config.fused_pointwise})",
        stacklevel=3,
    )
    return False
