"""Stage 2 of the pipeline: price every node of the joint graph.

For each node: the bytes its output allocates (0 for views), the FLOPs it performs
(FlopCounterMode's formulas, plus graphckpt's for ops it misses), and its estimated seconds on the
target device from a roofline that charges memory traffic as well as FLOPs (or, when asked, the
time its kernel was measured to take on this CPU where that is longer: ``passes/op_seconds.py``),
and, when asked, the scratch memory its kernel allocates and frees while it runs (measured on
this CPU by ``passes/scratch.py``). Reads ``val``; writes nothing.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch.utils._pytree import tree_leaves, tree_map

from graphckpt.flops import flop_formulas
from graphckpt.options import DeviceSpec
from passes.meta import is_random, is_seeded_draw, is_view, node_val, tensor_bytes
from passes.op_seconds import measure_op_seconds
from passes.scratch import measure_scratch_bytes

__all__ = ["NodeCost", "estimate_costs", "node_flops"]


@dataclass(frozen=True)
class NodeCost:
    """What one node costs: bytes it allocates, FLOPs, estimated seconds, whether it is random."""

    out_bytes: int
    flops: int
    seconds: float
    random: bool
    scratch_bytes: int = 0
    """Bytes the op's kernel allocates beyond its outputs and frees before it returns (live
    only while the node runs); 0 unless measured."""
    keep_seconds: float = 0.0
    """Extra seconds that keeping this output for backward costs: under a fusing compiler, the
    write of a pointwise output that would otherwise live only inside a fused kernel."""


def _formula_table() -> dict[Any, Callable[..., int]]:
    from torch.utils.flop_counter import flop_registry, shape_wrapper

    table: dict[Any, Callable[..., int]] = dict(flop_registry)
    # torch's registry entries take tensors; graphckpt's formulas take shapes, as
    # FlopCounterMode's custom_mapping expects, so wrap them the way it does.
    table.update(
        {
            op: f if getattr(f, "_get_raw", False) else shape_wrapper(f)
            for op, f in flop_formulas().items()
        }
    )
    return table


def node_flops(node: fx.Node, formulas: dict[Any, Callable[..., int]]) -> int:
    """FLOPs of ``node`` by the same formulas ``FlopCounterMode`` applies (0 when none exists)."""
    target = node.target
    packet = getattr(target, "overloadpacket", None)
    formula = formulas.get(packet) if packet is not None else None
    if formula is None:
        return 0

    def to_val(a: Any) -> Any:
        return node_val(a) if isinstance(a, fx.Node) else a

    args = tree_map(to_val, node.args)
    kwargs = tree_map(to_val, dict(node.kwargs))
    try:
        return int(formula(*args, **kwargs, out_val=node_val(node)))
    except Exception as e:  # a formula that rejects these shapes: report the node, not a bare error
        raise RuntimeError(f"FLOP formula failed on {node.format_node()}") from e


def _drawn_elements(node: fx.Node) -> int:
    """Random numbers a random op draws: one per element of its (first) output."""
    leaves = [v for v in tree_leaves(node_val(node)) if isinstance(v, torch.Tensor)]
    return int(leaves[0].numel()) if leaves else 0


def _moved_bytes(node: fx.Node) -> int:
    inputs = sum(tensor_bytes(node_val(a)) for a in node.all_input_nodes if a.op != "get_attr")
    outputs = sum(tensor_bytes(v) for v in tree_leaves(node_val(node)))
    return inputs + outputs


# Ops whose output lives in a storage larger than the output itself: PyTorch's mse_loss
# returns a 0-dim view into an input-sized buffer of squared differences, which the loss
# tensor keeps alive. The fake tensors in the graph cannot show this.
_INPUT_SIZED_STORAGE = frozenset({torch.ops.aten.mse_loss.default})


def _allocated_bytes(node: fx.Node) -> int:
    """Bytes ``node`` allocates. A tuple-returning op is charged only for the outputs no
    ``getitem`` reads (they live for that one step); read outputs are charged to their getitem."""
    value = node_val(node)
    if is_view(node):
        return 0
    if node.target in _INPUT_SIZED_STORAGE and isinstance(node.args[0], fx.Node):
        return max(tensor_bytes(value), tensor_bytes(node_val(node.args[0])))
    if isinstance(value, torch.Tensor):
        return tensor_bytes(value)
    if isinstance(value, (tuple, list)):
        read = {u.args[1] for u in node.users if u.target is operator.getitem}
        return sum(tensor_bytes(v) for i, v in enumerate(value) if i not in read)
    return 0


def _fusible_ops() -> Callable[[fx.Node], bool]:
    """Whether a node is an op inductor fuses into its neighbours' kernels: torch's own
    partitioner's list of fusible ops, less random ops (graphckpt replays those) and views, plus
    inductor's seeded draws (generated inside the kernels that read them)."""
    from torch._functorch.partitioners import get_default_op_list

    op_types = get_default_op_list()

    def fusible(node: fx.Node) -> bool:
        if node.op != "call_function" or is_view(node) or is_random(node):
            return False
        if is_seeded_draw(node):
            return True
        if node.target is operator.getitem:
            parent = node.args[0]
            return isinstance(parent, fx.Node) and fusible(parent)
        return bool(op_types.is_fusible(node)) and not op_types.is_random(node)

    return fusible


def _fused_costs(
    node: fx.Node, fusible: Callable[[fx.Node], bool], device: DeviceSpec, backward: set[fx.Node]
) -> tuple[float, float]:
    """``(recompute seconds, keep seconds)`` of a fusible node under a fusing compiler.

    Recomputed in backward, it is fused into the kernels that read it, unless one of its
    backward readers is not fusible (a matmul): then it is written out once. Kept, it costs a
    write in forward, unless a non-fusible forward reader needs it written out anyway.
    """
    write = tensor_bytes(node_val(node)) / device.bytes_per_s
    readers = _readers(node)
    recompute = write if any(u in backward and not fusible(u) for u in readers) else 0.0
    materialized = any(u not in backward and u.op != "output" and not fusible(u) for u in readers)
    return recompute, 0.0 if materialized else write


def _seeded_draws_read(node: fx.Node) -> int:
    """Numbers of inductor's seeded draws ``node`` is, or reads directly (a dropout mask)."""
    sources = [node, *node.all_input_nodes]
    return sum(_drawn_elements(n) for n in sources if is_seeded_draw(n))


def _readers(node: fx.Node) -> list[fx.Node]:
    """The nodes that read ``node``'s data: its users, looking through views (``detach``)."""
    out, stack, seen = [], list(node.users), set()
    while stack:
        user = stack.pop()
        if user in seen:
            continue
        seen.add(user)
        if user.op == "call_function" and is_view(user):
            stack.extend(user.users)
        else:
            out.append(user)
    return out


def estimate_costs(
    nodes: Iterable[fx.Node],
    device: DeviceSpec,
    *,
    measure_scratch: bool = False,
    measure_seconds: bool = False,
    fused_pointwise: bool = False,
    backward: Iterable[fx.Node] = (),
) -> dict[fx.Node, NodeCost]:
    """Price each node: allocated bytes, FLOPs, and roofline seconds on ``device``.

    Seconds are ``op_overhead + max(flops / flops_per_s, bytes_moved / bytes_per_s,
    random draws / random_elements_per_s)`` for real ops; views and ``getitem`` cost nothing
    (they move no data).

    With ``fused_pointwise`` (inductor runs the rewritten graphs) a fusible op (pointwise ops
    and the reductions torch's partitioner also treats as free to recompute) is priced as its
    fused kernels make it: recomputing it costs nothing unless a non-fusible backward reader
    needs it written out, and keeping it costs a forward write (``keep_seconds``) unless a
    non-fusible forward reader needs that write anyway. ``backward`` names the backward nodes.

    With ``measure_scratch`` the ops known to use kernel scratch memory (convolutions, see
    ``passes.scratch.SCRATCH_OPS``) are run once on random CPU tensors of their shapes and
    their transient bytes recorded; without it (planning for CUDA, or a meta model) every
    ``scratch_bytes`` is 0.

    With ``measure_seconds`` each distinct forward op (not in ``backward``) is timed alone on
    this CPU (``passes.op_seconds``) and priced at the larger of its roofline and its measured
    time: the roofline is a lower bound, and some kernels (CPU max pooling) run far below it.
    Ignored with ``fused_pointwise``: inductor runs kernels of its own, not the ones timed.

    Args:
        nodes: the nodes to price (usually a joint graph's forward and backward).
        device: the target device's roofline numbers.
        measure_scratch: measure kernel scratch memory on this CPU (only right when the model
            runs on this CPU).
        measure_seconds: time the forward ops on this CPU (only right when the model runs on
            this CPU and the rewritten graphs run eagerly).
        fused_pointwise: price fusible ops as a fusing compiler (inductor) runs them.
        backward: the joint graph's backward nodes (read with ``fused_pointwise``).

    Returns:
        A NodeCost per node.

    Example:
        >>> g = fx.symbolic_trace(torch.nn.Linear(4, 4))  # any graph whose nodes carry "val"
        >>> isinstance(estimate_costs([], DeviceSpec()), dict)
        True
    """
    formulas = _formula_table()
    nodes = list(nodes)
    fusible = _fusible_ops() if fused_pointwise else None
    in_backward = set(backward)
    scratch = measure_scratch_bytes(nodes) if measure_scratch else {}
    timed: dict[fx.Node, float] = {}
    if measure_seconds and not fused_pointwise:
        timed = measure_op_seconds(n for n in nodes if n not in in_backward)
    costs: dict[fx.Node, NodeCost] = {}
    for node in nodes:
        if node.target is operator.getitem or is_view(node) or node.op != "call_function":
            costs[node] = NodeCost(_allocated_bytes(node), 0, 0.0, False)
            continue
        flops = node_flops(node, formulas)
        random = is_random(node)
        seconds = device.op_overhead_s + max(
            flops / device.flops_per_s,
            _moved_bytes(node) / device.bytes_per_s,
            _drawn_elements(node) / device.random_elements_per_s if random else 0.0,
        )
        seconds = max(seconds, timed.get(node, 0.0))
        keep_seconds = 0.0
        if fusible is not None and fusible(node):
            seconds, keep_seconds = _fused_costs(node, fusible, device, in_backward)
            draws = _seeded_draws_read(node)
            if draws:
                # Regenerating the numbers inside backward's kernels costs their generation.
                # Keeping the draw (or a mask made from it) costs more than its write: inductor
                # stores it from a loop of its own, which generates the numbers again at about
                # a third of the fused loop's speed (measured on the benchmark GPT: 6.7 ms
                # against 2.7 ms for one layer's attention dropout on this CPU).
                draw_seconds = draws / device.random_elements_per_s
                if is_seeded_draw(node):
                    seconds += draw_seconds
                keep_seconds += draw_seconds
        costs[node] = NodeCost(
            _allocated_bytes(node),
            flops,
            seconds,
            random,
            scratch_bytes=scratch.get(node, 0),
            keep_seconds=keep_seconds,
        )
    return costs
