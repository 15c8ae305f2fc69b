"""Inductor's seeded random draws in the joint graph, before planning (``exact_rng=False``).

Inductor normally rewrites ATen random ops on the joint graph, before its partitioner runs:
each draw becomes ``prims.inductor_random(shape, seed, "rand")`` with its seed looked up in one
``prims.inductor_seeds`` tensor per device. Only ``inductor_seeds`` draws from torch's
generator; a draw is then a pure function of its seed and shape, so backward can recompute a
dropout mask inside its own fused kernels instead of keeping it. ``graphckpt.backend`` partitions
the joint graph itself, so it runs the same rewrite here, before the planner, which then keeps
the seeds (a random op, pinned) and may recompute the draws like any other op.

With ``exact_rng`` the random ops stay ATen's, and :func:`keep_unread_draws` makes sure
inductor runs a draw whose result nothing reads (eager draws it all the same).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from passes.meta import PARTITIONER_TAG, is_random
from passes.trace import JointGraph

__all__ = ["keep_unread_draws", "seed_draws_in", "seed_random_draws"]


@torch.library.custom_op("graphckpt::drawn", mutates_args=("draw",))
def _drawn(draw: torch.Tensor) -> None:
    """Does nothing. Its schema says it writes ``draw``, so inductor keeps the op that made it."""


def keep_unread_draws(gm: fx.GraphModule) -> int:
    """Make inductor run every random op of ``gm``, read or not, in place.

    A random op whose result nothing reads (a dropout whose output is unused) still advances
    the generator in eager, so later masks depend on it. Fx keeps such an op (with inductor's
    ``fallback_random``), but inductor's scheduler removes the kernel that makes a buffer no one
    reads. Each such op gets one reader, ``graphckpt::drawn``, whose schema declares a write to
    its argument (so it is never removed) and which does nothing.

    Args:
        gm: a forward or inference graph about to be compiled by inductor.

    Returns:
        How many draws got a reader.

    Example:
        >>> # GraphCkptBackend, before compile_fx_inner with exact_rng: keep_unread_draws(gm)
    """
    unread = [
        n
        for n in gm.graph.nodes
        if n.op == "call_function"
        and is_random(n)
        and not n.users
        and isinstance(n.meta.get("val"), torch.Tensor)
    ]
    for node in unread:
        with gm.graph.inserting_after(node):
            reader = gm.graph.call_function(torch.ops.graphckpt.drawn.default, (node,))
        reader.meta["val"] = None
    if unread:
        gm.graph.lint()
        gm.recompile()
    return len(unread)


def seed_draws_in(gm: fx.GraphModule, fake_mode: Any) -> int:
    """Rewrite ``gm``'s ATen random ops into inductor's seeded draws, in place, as compile_fx
    does (the nodes it adds get no role; :func:`seed_random_draws` tags a joint graph's).

    Args:
        gm: a graph whose nodes carry fake-tensor values.
        fake_mode: the fake mode of those values.

    Returns:
        How many rewrites were made.

    Example:
        >>> # an inference graph, before compile_fx_inner: seed_draws_in(gm, fake_mode)
    """
    from torch._inductor.fx_passes import replace_random
    from torch._inductor.virtualized import V

    with V.set_fake_mode(fake_mode):
        count = replace_random.patterns.apply(gm)
        count += replace_random.fuse_seed_creation_pass(gm.graph)
    if count:
        gm.graph.lint()
        gm.recompile()
    return int(count)


def seed_random_draws(jg: JointGraph) -> int:
    """Rewrite ``jg``'s ATen random ops into inductor's seeded draws, in place.

    New nodes are tagged forward when a forward output depends on them, backward otherwise,
    and ``jg``'s role lists are refreshed. Call it with inductor's ``fallback_random`` off (with
    it on, inductor leaves random ops to ATen and this returns 0).

    Args:
        jg: the joint graph; its nodes carry fake-tensor values (``meta["val"]``).

    Returns:
        How many rewrites were made (0: the graph draws no random numbers).

    Example:
        >>> # in GraphCkptBackend's partitioner, before planning: seed_random_draws(jg)
    """
    from torch._guards import detect_fake_mode

    count = seed_draws_in(jg.gm, detect_fake_mode([n.meta.get("val") for n in jg.primals]))
    if not count:
        return 0
    jg.refresh()
    _tag_new_nodes(jg)
    return int(count)


def _tag_new_nodes(jg: JointGraph) -> None:
    """Give the rewrite's untagged nodes a role: forward if a forward output reads them."""
    needed: set[fx.Node] = set()
    stack = list(jg.fwd_outputs)
    while stack:
        node = stack.pop()
        if node not in needed:
            needed.add(node)
            stack.extend(node.all_input_nodes)
    untagged = [
        n
        for n in jg.gm.graph.nodes
        if n.op in ("call_function", "get_attr") and PARTITIONER_TAG not in n.meta
    ]
    for node in untagged:
        node.meta[PARTITIONER_TAG] = "is_forward" if node in needed else "is_backward"
    if untagged:
        jg.refresh()
