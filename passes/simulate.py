"""Peak-memory simulator of one training step, used by the planner to check every candidate.

It replays what the rewriter builds: the forward graph in order, then the backward graph with
each recomputed value inserted just before its first use, every storage freed after its last
use (views share their base's storage), parameters and inputs resident throughout, gradients
kept from creation to the end. A node's kernel scratch memory (``NodeCost.scratch_bytes``) is
live only while that node runs: in forward, in backward and when it is recomputed. Pure data in,
numbers out; no graph is touched.
"""

from __future__ import annotations

import bisect
import math
import operator
from collections.abc import Collection, Mapping
from dataclasses import dataclass

import torch.fx as fx
from torch._functorch._aot_autograd.descriptors import InputMutationAOTOutput

from passes.cost import NodeCost
from passes.meta import is_view
from passes.trace import JointGraph
from passes.transfers import schedule_offloads, schedule_reloads

__all__ = [
    "INVALID_PEAK",
    "Simulation",
    "StepGraph",
    "first_backward_reads",
    "read_in_backward",
    "resident_bytes",
    "simulate",
]

PRIMAL, FORWARD, TANGENT, BACKWARD = 0, 1, 2, 3


@dataclass(frozen=True)
class StepGraph:
    """An integer-indexed copy of a joint graph: what the simulator and planner iterate over."""

    nodes: list[fx.Node]
    kind: list[int]
    inputs: list[tuple[int, ...]]
    base: list[int]
    """Index of the node whose storage this node's output lives in (itself unless a view)."""
    outputs: list[tuple[int, ...]]
    """For a tuple-returning op, its getitem nodes: their storages are born when the op runs."""
    nbytes: list[int]
    seconds: list[float]
    flops: list[int]
    random: list[bool]
    forward: list[int]
    backward: list[int]
    fwd_outputs: list[int]
    bwd_outputs: list[int]
    rng_state_bytes: int
    released_outputs: tuple[int, ...] = ()
    """Forward outputs that are new values of mutated inputs (BatchNorm's running statistics):
    the runtime copies them into the inputs and drops them when forward ends."""
    scratch: tuple[int, ...] = ()
    """Per node, bytes its kernel allocates and frees while it runs (empty: none anywhere)."""
    untraced_bytes: int = 0
    """Resident through the step but in no node: inputs the graph dropped as unused."""
    keep_seconds: tuple[float, ...] = ()
    """Per node, seconds that keeping its output costs (``NodeCost.keep_seconds``; empty: 0)."""
    pinned: frozenset[int] = frozenset()
    """Nodes backward must never recompute (random ops the compiler cannot replay): a plan that
    would is invalid, and simulates as never fitting (``INVALID_PEAK``)."""

    @classmethod
    def build(
        cls,
        jg: JointGraph,
        costs: dict[fx.Node, NodeCost],
        rng_state_bytes: int,
        block_bytes: int = 1,
        *,
        pin_random: bool = False,
    ) -> StepGraph:
        """Index ``jg``'s primals, forward, tangents and backward, with their costs.

        ``block_bytes`` rounds every allocation up the way the device allocator does (512 for
        CUDA's caching allocator; 1 on CPU, where the tracker counts exact storage bytes).
        ``pin_random`` forbids recomputing random ops (``pinned``).
        """
        ordered = [*jg.primals, *jg.forward, *jg.tangents, *jg.backward]
        index = {n: i for i, n in enumerate(ordered)}
        kinds = (
            [PRIMAL] * len(jg.primals)
            + [FORWARD] * len(jg.forward)
            + [TANGENT] * len(jg.tangents)
            + [BACKWARD] * len(jg.backward)
        )
        inputs = [tuple(index[a] for a in n.all_input_nodes if a in index) for n in ordered]
        base = list(range(len(ordered)))
        for i, n in enumerate(ordered):
            if is_view(n) and inputs[i]:
                base[i] = base[inputs[i][0]]
        outputs: list[list[int]] = [[] for _ in ordered]
        for i, n in enumerate(ordered):
            if n.target is operator.getitem and base[i] == i and inputs[i]:
                outputs[inputs[i][0]].append(i)
        zero = NodeCost(0, 0, 0.0, False)
        cost = [costs.get(n, zero) for n in ordered]
        return cls(
            nodes=ordered,
            kind=kinds,
            inputs=inputs,
            base=base,
            outputs=[tuple(o) for o in outputs],
            nbytes=[-(-c.out_bytes // block_bytes) * block_bytes for c in cost],
            seconds=[c.seconds for c in cost],
            flops=[c.flops for c in cost],
            random=[c.random for c in cost],
            forward=[index[n] for n in jg.forward],
            backward=[index[n] for n in jg.backward],
            fwd_outputs=[index[n] for n in jg.fwd_outputs if n in index],
            bwd_outputs=[index[n] for n in jg.bwd_outputs if n in index],
            rng_state_bytes=rng_state_bytes,
            released_outputs=tuple(index[n] for n in _input_mutation_outputs(jg) if n in index),
            scratch=tuple(-(-c.scratch_bytes // block_bytes) * block_bytes for c in cost)
            if any(c.scratch_bytes for c in cost)
            else (),
            untraced_bytes=jg.untraced_bytes,
            keep_seconds=tuple(c.keep_seconds for c in cost)
            if any(c.keep_seconds for c in cost)
            else (),
            pinned=frozenset(i for i, c in enumerate(cost) if c.random and pin_random),
        )

    def index_of(self) -> dict[fx.Node, int]:
        """Map from node to its index."""
        return {n: i for i, n in enumerate(self.nodes)}


def resident_bytes(sg: StepGraph) -> int:
    """Bytes resident through the whole step: the graph's inputs (parameters, buffers, user
    inputs; views of another input not counted again) and the untraced ones."""
    own = sum(sg.nbytes[v] for v, k in enumerate(sg.kind) if k == PRIMAL and sg.base[v] == v)
    return own + sg.untraced_bytes


def _input_mutation_outputs(jg: JointGraph) -> list[fx.Node]:
    """The joint graph's outputs that AOTAutograd describes as new values of mutated inputs."""
    output = next(n for n in reversed(jg.gm.graph.nodes) if n.op == "output")
    descs = output.meta.get("desc") or ()
    values = output.args[0]
    return [
        v
        for v, d in zip(values, descs)
        if isinstance(v, fx.Node) and isinstance(d, InputMutationAOTOutput)
    ]


@dataclass(frozen=True)
class Simulation:
    """Result of simulating one step under a set of saved values."""

    peak_bytes: int
    forward_peak_bytes: int
    saved_bytes: int
    recomputed: list[int]
    """Forward node indices recomputed in backward, in the order they are recomputed."""
    recompute_seconds: float
    recompute_flops: int
    timeline: list[int] | None
    offload_bytes: int = 0
    offload_stall_seconds: float = 0.0
    """Seconds compute waits for the host link (0 when every copy hides behind compute)."""
    reload_before: dict[int, int] | None = None
    """For each offloaded tensor, the backward node its reload is issued just before."""
    keep_seconds: float = 0.0
    """What keeping the kept tensors costs in time (``StepGraph.keep_seconds``)."""


def _backward_schedule(sg: StepGraph, saved: Collection[int]) -> tuple[list[int], list[int]]:
    """Backward execution order: each backward node preceded by the recompute it first needs.

    Recomputed values are encoded as ``-1 - index`` so they differ from the originals.
    """
    order: list[int] = []
    recomputed: list[int] = []
    done: set[int] = set()
    kind = sg.kind

    def need(v: int) -> None:
        stack = [(v, False)]
        while stack:
            u, expanded = stack.pop()
            if u in done:
                continue
            if expanded:
                done.add(u)
                order.append(-1 - u)
                recomputed.append(u)
                continue
            stack.append((u, True))
            for a in sg.inputs[u]:
                if kind[a] == FORWARD and a not in saved and a not in done:
                    stack.append((a, False))

    for b in sg.backward:
        for a in sg.inputs[b]:
            if kind[a] == FORWARD and a not in saved:
                need(a)
        order.append(b)
    return order, recomputed


def _forward_needed(sg: StepGraph, saved: Collection[int]) -> list[int]:
    # random ops run even when unused: they advance the generator, as in eager
    live = set(sg.fwd_outputs) | set(saved) | {v for v in sg.forward if sg.random[v]}
    for v in reversed(sg.forward):
        if v in live:
            live.update(sg.inputs[v])
    return [v for v in sg.forward if v in live]


def first_backward_reads(sg: StepGraph, bwd: list[int], values: set[int]) -> dict[int, int]:
    """For each of ``values``, the position in the backward schedule ``bwd`` that reads it first.

    Example:
        >>> # first_backward_reads(sg, bwd, {3}) == {3: 0} when bwd's first node reads node 3
    """
    first: dict[int, int] = {}
    for i, e in enumerate(bwd):
        for a in sg.inputs[-1 - e if e < 0 else e]:
            if a in values:
                first.setdefault(a, i)
    return first


def read_in_backward(sg: StepGraph, saved: Collection[int]) -> set[int]:
    """The kept tensors that backward (recompute included) reads when exactly ``saved`` is kept.

    Example:
        >>> # read_in_backward(sg, {3, 5}) == {3} when backward never reads node 5
    """
    keep = {v for v in saved if sg.kind[v] == FORWARD and not sg.outputs[v]}
    bwd, _ = _backward_schedule(sg, keep)
    return set(first_backward_reads(sg, bwd, keep))


def _reload_points(
    sg: StepGraph, bwd: list[int], offloaded: set[int], link: float
) -> tuple[dict[int, int], dict[int, int], float]:
    """Where each offloaded tensor's reload goes in backward: the step its device copy is
    born (the start of the group of recompute copies before the anchor node) and the anchor."""
    first_use: dict[int, int] = {}
    for i, e in enumerate(bwd):
        for a in sg.inputs[-1 - e if e < 0 else e]:
            if a in offloaded:
                first_use.setdefault(a, i)
    seconds = [sg.seconds[-1 - e if e < 0 else e] for e in bwd]
    nbytes = {v: sg.nbytes[v] for v in first_use}
    plan = schedule_reloads(seconds, first_use, nbytes, link)
    group_start, start = [0] * len(bwd), 0
    for i, e in enumerate(bwd):
        group_start[i] = start
        if e >= 0:
            start = i + 1
    originals = [i for i, e in enumerate(bwd) if e >= 0]
    born, anchor = {}, {}
    for v, r in plan.step.items():
        at = originals[bisect.bisect_left(originals, min(r, first_use[v]))]
        born[v], anchor[v] = group_start[at], bwd[at]
    return born, anchor, plan.stall_seconds


INVALID_PEAK = 1 << 62
"""The peak an invalid plan simulates at (one that recomputes a pinned node): it fits no
budget, so no search keeps it."""


def _invalid(sg: StepGraph, saved: Collection[int], recomputed: list[int]) -> Simulation:
    return Simulation(
        peak_bytes=INVALID_PEAK,
        forward_peak_bytes=INVALID_PEAK,
        saved_bytes=sum(sg.nbytes[sg.base[v]] for v in saved),
        recomputed=recomputed,
        recompute_seconds=math.inf,
        recompute_flops=sum(sg.flops[v] for v in recomputed),
        timeline=[INVALID_PEAK],
    )


def simulate(
    sg: StepGraph,
    saved: Collection[int],
    *,
    offloaded: Collection[int] = (),
    link_bytes_per_s: float = 0.0,
    timeline: bool = False,
    partitioned: Mapping[int, int] | None = None,
) -> Simulation:
    """Simulate the memory of one forward+backward step when exactly ``saved`` is kept.

    Every forward value that backward reads and that is not in ``saved`` is recomputed.
    Tensors in ``offloaded`` (a subset of ``saved``) leave device memory once their copy to
    host has finished and forward no longer reads them, and come back before backward needs
    them (``passes/transfers.py``).

    Args:
        sg: the indexed joint graph.
        saved: indices of forward nodes whose outputs are kept for backward.
        offloaded: kept tensors that go to host memory in between.
        link_bytes_per_s: host-link bandwidth (needed when ``offloaded`` is not empty).
        timeline: also return the live bytes after every executed node.
        partitioned: kept tensors of which only a slice is held between forward and backward,
            each with its slice's bytes (``passes/partition_plan.py``): the whole tensor goes
            once forward stops reading it, and is all-gathered again at its first backward use.

    Returns:
        The step's peak (kernel scratch included), the forward's peak, the bytes kept for
        backward, and the recompute. The timeline holds live tensor bytes, without scratch.
    """
    # Inputs/parameters are resident anyway; a tuple-returning op cannot be kept (its getitems
    # are), so keeping one would let its outputs be "recomputed" from nothing.
    saved = {v for v in saved if sg.kind[v] == FORWARD and not sg.outputs[v]}
    off = {v for v in offloaded if v in saved and sg.base[v] == v and sg.nbytes[v] > 0}
    if off and link_bytes_per_s <= 0:
        raise ValueError("offloaded tensors need a host link: link_bytes_per_s must be > 0")
    fwd = _forward_needed(sg, saved)
    bwd, recomputed = _backward_schedule(sg, saved)
    if sg.pinned and not sg.pinned.isdisjoint(recomputed):
        return _invalid(sg, saved, recomputed)
    schedule = fwd + bwd
    kind = sg.kind
    reload_born, reload_anchor, reload_stall = (
        _reload_points(sg, bwd, off, link_bytes_per_s) if off else ({}, {}, 0.0)
    )
    shards = {v: b for v, b in (partitioned or {}).items() if v in saved and v not in off}
    if shards:  # the gathered copy is born at the first backward read, like a reload
        gathered = first_backward_reads(sg, bwd, set(shards))
        shards = {v: b for v, b in shards.items() if v in gathered}  # unread: nothing to slice
        reload_born = {**reload_born, **gathered}
    regained = off | set(shards)  # backward reads a new device copy of these
    # Storage each value lives in, resolved as the schedule runs: a view lives in the storage
    # of the input it was made from, a recomputed copy (key -1 - v) in a new storage.
    in_fwd: dict[int, int] = {}
    in_bwd: dict[int, int] = {}

    def read(a: int, backward: bool) -> int:
        if kind[a] in (PRIMAL, TANGENT):
            return sg.base[a]
        if backward and a in regained:
            return -1 - a  # the reloaded (or gathered) device copy
        if backward and (kind[a] == BACKWARD or a not in saved):
            return in_bwd[a]
        return in_fwd[a]

    birth: dict[int, int] = {-1 - v: len(fwd) + t for v, t in reload_born.items()}
    death: dict[int, int] = dict(birth)
    for t, e in enumerate(schedule):
        backward = t >= len(fwd)
        v = -1 - e if e < 0 else e
        own = e if e >= 0 else -1 - v
        k = read(sg.inputs[v][0], backward) if sg.base[v] != v else own
        (in_bwd if backward else in_fwd)[v] = k
        for g in (v, *sg.outputs[v]):
            kg = k if g == v else (g if e >= 0 else -1 - g)
            birth.setdefault(kg, t)
            death[kg] = max(death.get(kg, t), t)
        for a in sg.inputs[v]:
            ka = read(a, backward)
            death[ka] = max(death.get(ka, t), t)
    base = {**{v: k for v, k in in_fwd.items()}, **in_bwd}
    for v, k in enumerate(kind):  # gradients of the outputs arrive when backward starts
        if k == TANGENT:  # held by the caller's backward call (autograd.backward) throughout
            birth[v] = len(fwd)  # also when a view of it (a transpose) was born later
            death[v] = len(schedule) - 1
    released = set(sg.released_outputs)
    for v in sg.fwd_outputs:
        k = in_fwd.get(v, sg.base[v])
        death[k] = max(death.get(k, 0), len(fwd) - 1) if v in released else len(schedule)
    for v in sg.bwd_outputs:
        death[base.get(v, sg.base[v])] = len(schedule)
    for v in saved - regained:  # held by autograd from the end of forward until backward reads it
        k = in_fwd[v]
        death[k] = max(death[k], len(fwd))
    offload_stall = 0.0
    if off:  # an offloaded tensor's device memory goes once its copy to host is done
        position = {v: t for t, v in enumerate(fwd)}
        sent = schedule_offloads(
            [sg.seconds[v] for v in fwd],
            {v: position[v] for v in off},
            {v: sg.nbytes[v] for v in off},
            link_bytes_per_s,
        )
        offload_stall = sent.stall_seconds
        for v, t in sent.step.items():
            death[in_fwd[v]] = max(death[in_fwd[v]], t)

    extra = [(fwd.index(v), len(fwd) + reload_born[v], b) for v, b in shards.items()]
    rng_bytes = sg.rng_state_bytes * sum(1 for v in recomputed if sg.random[v])
    resident = resident_bytes(sg) + rng_bytes
    delta = [0] * (len(schedule) + 2)
    for k, t0 in birth.items():
        size = sg.nbytes[-1 - k] if k < 0 else (0 if kind[k] == PRIMAL else sg.nbytes[k])
        if size:
            delta[t0] += size
            delta[death[k] + 1] -= size
    for t0, t1, size in extra:  # a slice lives from its tensor's birth until gathered
        delta[t0] += size
        delta[t1 + 1] -= size
    live = peak = fwd_peak = resident
    trace: list[int] | None = [] if timeline else None
    scratch = sg.scratch or (0,) * len(kind)
    for t, e in enumerate(schedule):
        live += delta[t]
        # The running node's scratch sits on top of its inputs and outputs, then is freed.
        peak = max(peak, live + scratch[-1 - e if e < 0 else e])
        if t < len(fwd):
            fwd_peak = peak
        if trace is not None:
            trace.append(live)
    kept = {in_fwd[v] for v in saved if kind[in_fwd[v]] == FORWARD and v not in shards}
    return Simulation(
        peak_bytes=peak,
        forward_peak_bytes=fwd_peak,
        saved_bytes=sum(sg.nbytes[b] for b in kept) + sum(shards.values()) + rng_bytes,
        recomputed=recomputed,
        recompute_seconds=sum(sg.seconds[v] for v in recomputed),
        recompute_flops=sum(sg.flops[v] for v in recomputed),
        timeline=trace,
        offload_bytes=sum(sg.nbytes[v] for v in off if v not in shards),
        offload_stall_seconds=offload_stall + reload_stall,
        reload_before=reload_anchor,
        keep_seconds=sum(sg.keep_seconds[b] for b in kept) if sg.keep_seconds else 0.0,
    )
