"""Stage 4 of the pipeline: turn a joint graph and a keep/recompute decision into the forward
and backward graphs that run.

Every forward value backward needs is either kept (an output of the forward graph) or recomputed:
a copy of its producer is inserted into backward just before its first use, so recompute
happens layer by layer as backward reaches it, never all at once. A recomputed random op (dropout)
runs in forward under ``run_and_save_rng_state`` and is replayed in backward with
``run_with_rng_state``, so its mask is bitwise identical. This is the only pass that mutates a
graph. Reads ``val`` and ``partitioner_tag``; writes ``partitioner_tag`` on the nodes it adds.
"""

from __future__ import annotations

import operator
from collections.abc import Collection
from typing import Any

import torch
import torch.fx as fx
from torch._functorch.partitioners import _extract_fwd_bwd_modules
from torch._guards import detect_fake_mode
from torch._prims.rng_prims import run_and_save_rng_state, run_with_rng_state
from torch.utils._ordered_set import OrderedSet
from torch.utils._pytree import tree_map

from graphckpt.graph_offload import GraphOffloader
from graphckpt.graph_partition import GraphPartitioner
from passes.meta import PARTITIONER_TAG, RECOMPUTED, VAL, is_forward, is_random, node_val
from passes.partition_rewrite import insert_partitions
from passes.trace import JointGraph

__all__ = ["recompute_closure", "rewrite_pass"]


def _is_forward_op(node: fx.Node) -> bool:
    """A forward computation (never a placeholder: inputs and parameters are always resident)."""
    return node.op == "call_function" and is_forward(node)


def recompute_closure(jg: JointGraph, saved: Collection[fx.Node]) -> list[fx.Node]:
    """Forward nodes backward must recompute when exactly ``saved`` is kept, in recompute order."""
    saved_set = set(saved)
    done: set[fx.Node] = set()
    order: list[fx.Node] = []

    def need(node: fx.Node) -> None:
        for a in node.all_input_nodes:
            if _is_forward_op(a) and a not in saved_set and a not in done:
                need(a)
        done.add(node)
        order.append(node)

    for b in jg.backward:
        for a in b.all_input_nodes:
            if _is_forward_op(a) and a not in saved_set and a not in done:
                need(a)
    return order


def _fake_val(target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    vals = tree_map(lambda a: node_val(a) if isinstance(a, fx.Node) else a, (args, kwargs))
    fake_mode = detect_fake_mode(vals)
    assert fake_mode is not None, "joint graph nodes carry fake tensors"
    with fake_mode:
        return target(*vals[0], **vals[1])


def _tag(node: fx.Node, tag: str, val: Any) -> fx.Node:
    node.meta[PARTITIONER_TAG] = tag
    node.meta[VAL] = val
    return node


def _save_rng_state(graph: fx.Graph, node: fx.Node) -> tuple[fx.Node, fx.Node]:
    """Replace random ``node`` in forward by one that also returns the generator state it used.

    Returns ``(state, output)`` nodes; ``node`` itself is erased.
    """
    args, kwargs = (node.target, *node.args), dict(node.kwargs)
    with graph.inserting_before(node):
        pair = graph.call_function(run_and_save_rng_state, args, kwargs)
        _tag(pair, "is_forward", _fake_val(run_and_save_rng_state, args, kwargs))
        state = _tag(graph.call_function(operator.getitem, (pair, 0)), "is_forward", None)
        out = _tag(graph.call_function(operator.getitem, (pair, 1)), "is_forward", None)
    state.meta[VAL], out.meta[VAL] = node_val(pair)
    out.meta.update({k: v for k, v in node.meta.items() if k not in (VAL, PARTITIONER_TAG)})
    node.replace_all_uses_with(out)
    graph.erase_node(node)
    return state, out


def _clone_into_backward(
    jg: JointGraph,
    saved: set[fx.Node],
    recompute: set[fx.Node],
    replay: dict[fx.Node, tuple[fx.Node, Any, tuple[Any, ...], dict[str, Any]]],
) -> set[fx.Node]:
    """Insert recompute copies before their first backward consumer and rewire consumers.

    A recomputed tuple-returning op has all its needed outputs extracted right after it runs,
    so the tuple (which keeps every output alive) dies at once.
    """
    graph = jg.gm.graph
    copies: dict[fx.Node, fx.Node] = {}

    def mapped(a: Any) -> Any:
        return copies.get(a, a) if isinstance(a, fx.Node) else a

    def ensure(node: fx.Node, before: fx.Node) -> fx.Node:
        if node in copies:
            return copies[node]
        if node in replay:
            state, target, args, kwargs = replay[node]
            sources = [a for a in (*args, *kwargs.values()) if isinstance(a, fx.Node)]
        elif _is_training_batch_norm(node):
            sources = [a for a in node.args[:3] if isinstance(a, fx.Node)]
        else:
            sources = node.all_input_nodes
        for a in sources:
            if _is_forward_op(a) and a not in saved:
                ensure(a, before)
        with graph.inserting_before(before):
            if node in replay:
                new = graph.call_function(
                    run_with_rng_state,
                    (state, target, *tree_map(mapped, args)),
                    tree_map(mapped, kwargs),
                )
            elif _is_training_batch_norm(node):
                new = _batch_norm_without_stats(graph, node, mapped)
            else:
                new = graph.node_copy(node, mapped)
        new.meta = {**node.meta, **new.meta, PARTITIONER_TAG: "is_backward", RECOMPUTED: True}
        copies[node] = new
        for user in node.users:
            if user.target is operator.getitem and user in recompute and user not in copies:
                ensure(user, before)
        return new

    for b in list(jg.backward):
        for a in list(b.all_input_nodes):
            if _is_forward_op(a) and a not in saved:
                b.replace_input_with(a, ensure(a, b))
    return set(copies.values())


_BATCH_NORM = torch.ops.aten._native_batch_norm_legit_functional.default


def _is_training_batch_norm(node: fx.Node) -> bool:
    return node.target is _BATCH_NORM and node.args[5] is True


def _batch_norm_without_stats(graph: fx.Graph, node: fx.Node, mapped: Any) -> fx.Node:
    """Recompute a training-mode batch norm without reading or updating running statistics.

    In training mode its output depends on the batch alone; the functional op also reads the
    running-stat buffers, which forward's epilogue then updates in place, so a recompute that
    read them would see (and trip autograd's version check on) the updated buffers.
    """
    x, weight, bias = (mapped(a) for a in node.args[:3])
    momentum, eps = node.args[6], node.args[7]
    new = graph.call_function(
        torch.ops.aten._native_batch_norm_legit.no_stats,
        (x, weight, bias, True, momentum, eps),
    )
    new.meta[VAL] = tuple(node_val(node)[:3])  # kept over node's own meta by the caller
    return new


def _host_val(node: fx.Node) -> Any:
    val = node_val(node)
    fake_mode = detect_fake_mode([val])
    assert fake_mode is not None, "joint graph nodes carry fake tensors"
    with fake_mode:
        return torch.empty_like(val, device="cpu")


def _insert_offloads(
    jg: JointGraph,
    offload: dict[fx.Node, fx.Node],
    offloader: GraphOffloader,
    copies: set[fx.Node],
) -> None:
    """Send each tensor in ``offload`` to host after it is made; in backward, start its copy
    back before the recompute group of its anchor node, and wait for it at first use."""
    graph = jg.gm.graph
    position = {n: i for i, n in enumerate(graph.nodes)}
    for node, anchor in offload.items():
        readers = [u for u in node.users if u.meta.get(PARTITIONER_TAG) == "is_backward"]
        if not readers:
            continue
        first = min(readers, key=position.__getitem__)
        start = anchor
        while start.prev in copies:
            start = start.prev
        if position.get(start, -1) > position[first]:
            start = first
        with graph.inserting_after(node):
            host = _tag(graph.call_function(offloader.offload, (node,)), "is_forward", None)
        host.meta[VAL] = _host_val(node)
        with graph.inserting_before(start):
            ahead = _tag(graph.call_function(offloader.prefetch, (host,)), "is_backward", None)
        ahead.meta[VAL] = host.meta[VAL]
        with graph.inserting_before(first):
            back = _tag(graph.call_function(offloader.reload, (ahead,)), "is_backward", None)
        back.meta[VAL] = node_val(node)
        for reader in readers:
            reader.replace_input_with(node, back)


def _tensors_of(saved: Collection[fx.Node]) -> set[fx.Node]:
    """``saved`` with each tuple-valued node (batch norm's outputs) replaced by its getitems:
    autograd saves tensors only, and backward then reads the elements it needs directly."""
    out: set[fx.Node] = set()
    for node in saved:
        if isinstance(node_val(node), (tuple, list)):
            out |= {u for u in node.users if u.target is operator.getitem}
        else:
            out.add(node)
    return out


def rewrite_pass(
    jg: JointGraph,
    saved: Collection[fx.Node],
    offload: dict[fx.Node, fx.Node] | None = None,
    offloader: GraphOffloader | None = None,
    partition: Collection[fx.Node] = (),
    partitioner: GraphPartitioner | None = None,
    *,
    replay_random: bool = True,
) -> tuple[fx.GraphModule, fx.GraphModule]:
    """Build the forward and backward graph modules that keep exactly ``saved``.

    Args:
        jg: the joint graph (mutated: recompute copies, RNG and offload nodes are added).
        saved: forward nodes whose outputs backward reads directly; every other forward value
            backward needs is recomputed in backward just before its first use.
        offload: kept tensors that go to host memory in between, each with the backward node
            before whose recompute its copy back starts.
        offloader: the object whose methods the offload nodes call (needed with ``offload``).
        partition: kept tensors of which each rank keeps only a slice until backward
            (``passes/partition_rewrite.py``).
        partitioner: the object whose methods those nodes call (needed with ``partition``).
        replay_random: recompute random ops by replaying their generator state. False when the
            compiler draws its own random numbers (no replay possible): a ``saved`` set that
            leaves a random op to recompute is then an error.

    Returns:
        ``(forward_gm, backward_gm)`` as AOTAutograd's ``partition_fn`` returns them.

    Raises:
        ValueError: with ``replay_random=False``, ``saved`` leaves a random op to recompute.

    Example:
        >>> # inside a partition function: fw, bw = rewrite_pass(jg, saved_nodes)
    """
    graph = jg.gm.graph
    saved_set = _tensors_of(saved)
    recompute = recompute_closure(jg, saved_set)
    replay: dict[fx.Node, tuple[fx.Node, Any, tuple[Any, ...], dict[str, Any]]] = {}
    states: list[fx.Node] = []
    for node in recompute:
        if is_random(node):
            if not replay_random:
                raise ValueError(
                    f"rewrite_pass: the kept set leaves random op {node.name} to recompute, but "
                    "replay_random=False (the compiler's generator cannot be replayed); keep it"
                )
            target, args, kwargs = node.target, node.args, dict(node.kwargs)
            state, out = _save_rng_state(graph, node)
            replay[out] = (state, target, args, kwargs)
            states.append(state)
    jg.refresh()
    copies = _clone_into_backward(jg, saved_set, set(recompute) | set(replay), replay)
    if offload:
        if offloader is None:
            raise ValueError("rewrite_pass: offload needs an offloader (a GraphOffloader)")
        _insert_offloads(jg, offload, offloader, copies)
    if partition:
        if partitioner is None:
            raise ValueError("rewrite_pass: partition needs a partitioner (a GraphPartitioner)")
        insert_partitions(jg, partition, partitioner)
    graph.lint()
    jg.gm.recompile()
    jg.refresh()
    bw_reads = {a for b in jg.backward for a in b.all_input_nodes}
    saved_values = [n for n in jg.primals if n in bw_reads]
    saved_values += [n for n in jg.forward if n in bw_reads]
    saved_values += [s for s in states if s not in saved_values]
    static = jg.partition_kwargs.get("static_lifetime_input_indices") or []
    static_nodes = OrderedSet(p for i, p in enumerate(jg.primals) if i in static)
    fw, bw = _extract_fwd_bwd_modules(
        jg.gm,
        saved_values,
        [],
        num_fwd_outputs=jg.num_fwd_outputs,
        static_lifetime_input_nodes=static_nodes,
    )
    _drop_dead_code(bw)
    return fw, bw


def _drop_dead_code(bw: fx.GraphModule) -> None:
    """Eliminate dead code from the backward graph, counting random ops as pure.

    A draw whose result nothing reads (a dropout whose output is unused) runs in forward, where
    it advances the generator as eager does. The extraction keeps impure nodes wherever their
    inputs exist (with ``fallback_random`` set, dead-code elimination keeps random ops), so one
    whose input is saved for backward would draw a second time there, together with the
    recompute chain that feeds it. A draw that backward does not read has no business there.
    """

    def impure(node: fx.Node) -> bool:
        return node.is_impure(impure_random=False)

    if bw.graph.eliminate_dead_code(is_impure_node=impure):
        bw.recompile()
