"""Local search over single tensors after the layer-level search (stage 3, beside plan.py).

The layer search (``passes/plan.py``) gives each layer a policy from its min-cut hull, so some
plans are out of its reach: keeping one more tensor the budget still has room for, keeping a
tensor of one layer while recomputing one of another, or a peak lower than any combination of
per-layer policies reaches. This pass starts from the layer search's choice and moves one tensor
at a time, every move checked by the simulator (``passes/simulate.py``):

1. while the simulated peak is over ``room``: take the move (keep a recomputed tensor, or stop
   keeping a kept one) that lowers the peak most;
2. then, while some move lowers the estimated recompute time and the peak still fits: keep a
   recomputed tensor, or swap a kept tensor for a recomputed one.

It is deterministic (moves are tried in a fixed order) and bounded: it stops after
``max_node_visits`` simulated nodes, so big graphs get few moves and small graphs many. Offloaded
tensors, and values a recompute cannot reproduce (``passes.meta.must_keep``), stay kept. Reads
the StepGraph only; mutates nothing.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from passes.meta import must_keep
from passes.simulate import FORWARD, Simulation, StepGraph, simulate

__all__ = ["Refined", "lowest_peak", "refine"]


@dataclass(frozen=True)
class Refined:
    """What the local search ended with: the kept set and its simulation."""

    saved: frozenset[int]
    sim: Simulation
    num_simulations: int


def _cost(sim: Simulation) -> tuple[float, int]:
    seconds = sim.recompute_seconds + sim.offload_stall_seconds + sim.keep_seconds
    return (seconds, sim.recompute_flops)


@dataclass
class _Search:
    sg: StepGraph
    offloaded: frozenset[int]
    link_bytes_per_s: float
    visits_left: int
    num_simulations: int = 0

    def run(self, saved: frozenset[int], *, start: bool = False) -> Simulation | None:
        """Simulate (with the timeline), or None once the visit budget is spent; a start's
        simulation is always made and not charged."""
        cost = len(self.sg.nodes)
        if not start:
            if self.visits_left < cost:
                return None
            self.visits_left -= cost
        self.num_simulations += 1
        return simulate(
            self.sg,
            saved,
            offloaded=self.offloaded,
            link_bytes_per_s=self.link_bytes_per_s,
            timeline=True,
        )

    def storage_of(self, v: int) -> int:
        """What a value's memory goes with: its base storage, or for the outputs of one tuple
        op (a layer norm's output, mean and rstd) the op, since keeping only some of them
        still recomputes it."""
        sg = self.sg
        parent = sg.inputs[v][0] if sg.inputs[v] else v
        return parent if v in sg.outputs[parent] else sg.base[v]

    def keepable(self, v: int) -> bool:
        """A forward value with its own storage that is not a tuple op (whose getitems are kept)."""
        sg = self.sg
        return sg.kind[v] == FORWARD and sg.base[v] == v and not sg.outputs[v] and sg.nbytes[v] > 0

    def adds(self, saved: frozenset[int], sim: Simulation) -> list[frozenset[int]]:
        """Groups of recomputed values worth keeping (``storage_of``), most seconds first."""
        sg = self.sg
        groups: dict[int, set[int]] = {}
        for v in sim.recomputed:
            if v not in saved and self.keepable(v):
                groups.setdefault(self.storage_of(v), set()).add(v)
        return sorted(
            _with_singles(groups.values()), key=lambda g: (-sum(sg.seconds[u] for u in g), min(g))
        )

    def drops(self, saved: frozenset[int]) -> list[frozenset[int]]:
        """Groups of kept values that may stop being kept, largest first. Values that share a
        storage (a tensor and its views, ``storage_of``) go together: only then is it freed."""
        sg = self.sg
        groups: dict[int, set[int]] = {}
        for v in saved:
            if sg.kind[v] == FORWARD:
                groups.setdefault(self.storage_of(v), set()).add(v)
        fixed = {
            v for v in saved if v in self.offloaded or v in sg.pinned or must_keep(sg.nodes[v])
        }
        return sorted(
            (g for g in _with_singles(groups.values()) if not g & fixed),
            key=lambda g: (-sum(sg.nbytes[b] for b in {sg.base[v] for v in g}), min(g)),
        )


def _with_singles(groups: Iterable[set[int]]) -> list[frozenset[int]]:
    """Each group, and each member of a bigger group on its own (a layer norm's mean and rstd
    can go while its output stays)."""
    out = {frozenset(g) for g in groups}
    out |= {frozenset({v}) for g in groups for v in g}
    return list(out)


def _excess(sim: Simulation, room: int) -> int:
    """Bytes over ``room`` summed over the step's timeline: falls with every move that helps,
    even while the peak itself sits on a plateau several steps wide."""
    assert sim.timeline is not None
    return sum(live - room for live in sim.timeline if live > room)


def _lower_peak(
    s: _Search, saved: frozenset[int], sim: Simulation, room: int
) -> tuple[frozenset[int], Simulation]:
    """Greedy descent to ``room``: each round takes the move with the least added recompute
    per byte of excess removed (moves that also cut recompute first), until the peak fits or
    no single move removes excess."""
    while sim.peak_bytes > room:
        over, cost = _excess(sim, room), _cost(sim)[0]
        best: tuple[tuple[float, int, int], frozenset[int], Simulation] | None = None
        adds, drops = s.adds(saved, sim), s.drops(saved)
        moves = itertools.chain((saved | g for g in adds), (saved - g for g in drops))
        for cand in moves:
            got = s.run(cand)
            if got is None:
                break
            freed = over - _excess(got, room)
            if freed <= 0:
                continue
            key = ((_cost(got)[0] - cost) / freed, got.peak_bytes, got.recompute_flops)
            if best is None or key < best[0]:
                best = (key, cand, got)
        if best is None:
            return saved, sim
        saved, sim = best[1], best[2]
    return saved, sim


def lowest_peak(
    sg: StepGraph,
    starts: Sequence[Iterable[int]],
    *,
    max_node_visits: int,
    offloaded: Iterable[int] = (),
    link_bytes_per_s: float = 0.0,
) -> Refined:
    """Steepest descent on the simulated peak from each start in turn, one group of tensors at
    a time, until no single move lowers it (or the work budget is spent): the smallest peak
    the planner can offer, and the plan that has it. Other arguments as for ``refine``."""
    s = _Search(sg, frozenset(offloaded), link_bytes_per_s, max_node_visits)

    def key(got: Simulation) -> tuple[int, int, float, int]:
        assert got.timeline is not None
        return (got.peak_bytes, got.timeline.count(got.peak_bytes), *_cost(got))

    found: list[tuple[frozenset[int], Simulation]] = []
    for start in starts:
        kept = frozenset(start)
        sim = s.run(kept, start=True)
        assert sim is not None
        while True:
            moves = [kept | g for g in s.adds(kept, sim)] + [kept - g for g in s.drops(kept)]
            best: tuple[frozenset[int], Simulation] | None = None
            for cand in moves:
                got = s.run(cand)
                if got is None:
                    break
                if key(got) < key(best[1] if best else sim):
                    best = (cand, got)
            if best is None:
                break
            kept, sim = best
        found.append((kept, sim))
    kept, sim = min(found, key=lambda f: key(f[1]))
    return Refined(kept, sim, s.num_simulations)


def _refill(
    s: _Search, saved: frozenset[int], sim: Simulation, room: int
) -> tuple[frozenset[int], Simulation] | None:
    """Keep recomputed groups, most seconds first, while the peak fits (None: budget spent)."""
    added = True
    while added:
        added = False
        for g in s.adds(saved, sim):
            got = s.run(saved | g)
            if got is None:
                return None
            if got.peak_bytes <= room and _cost(got) < _cost(sim):
                saved, sim, added = saved | g, got, True
                break
    return saved, sim


def _cut_cost(
    s: _Search, saved: frozenset[int], sim: Simulation, room: int
) -> tuple[frozenset[int], Simulation]:
    """Descent on recompute cost, the peak kept within ``room``: keep a recomputed group, or
    keep one instead of a kept storage; when neither helps, stop keeping one kept group and
    refill the room it leaves (a move of any depth)."""
    while True:
        better = _refill(s, saved, sim, room)
        if better is None:
            return saved, sim
        saved, sim = better
        adds, drops = s.adds(saved, sim), s.drops(saved)
        # Lazily: on big graphs the work budget ends the search long before the last pair.
        moves = itertools.chain(
            ((saved - d) | g for g in adds for d in drops), (saved - d for d in drops)
        )
        for cand in moves:
            got = s.run(cand)
            if got is None:
                return saved, sim
            if got.peak_bytes > room:
                continue
            refilled = _refill(s, cand, got, room) if _cost(got) >= _cost(sim) else (cand, got)
            if refilled is None:
                return saved, sim
            if _cost(refilled[1]) < _cost(sim):
                saved, sim = refilled
                break
        else:
            return saved, sim


def refine(
    sg: StepGraph,
    saved: Iterable[int],
    room: int,
    *,
    max_node_visits: int,
    keep_all: Iterable[int] = (),
    offloaded: Iterable[int] = (),
    link_bytes_per_s: float = 0.0,
) -> Refined:
    """Improve a kept set one tensor at a time: first fit ``room``, then cut recompute.

    Args:
        sg: the indexed joint graph.
        saved: the starting kept set (the layer search's choice).
        keep_all: a second start, e.g. everything backward reads (the search then descends
            from the top with the least recompute per byte too); empty: one start.
        room: the simulated peak the result must not exceed (budget minus headroom).
        max_node_visits: simulation work allowed, in simulated nodes (0: no search).
        offloaded: kept tensors sent to host; they stay kept.
        link_bytes_per_s: host-link bandwidth, needed when ``offloaded`` is not empty.

    Returns:
        The best kept set found and its simulation. Its peak fits ``room`` whenever the
        starting set's did, and its cost is never above the starting set's then.

    Example:
        >>> # refine(search.sg, search.saved_for(state), budget - 64, max_node_visits=200_000)
    """
    s = _Search(sg, frozenset(offloaded), link_bytes_per_s, max_node_visits)
    results: list[tuple[frozenset[int], Simulation]] = []
    for start in (frozenset(saved), frozenset(keep_all)):
        if results and s.visits_left < len(sg.nodes):
            break
        sim = s.run(start, start=True)
        assert sim is not None
        kept, sim = _lower_peak(s, start, sim, room)
        if sim.peak_bytes <= room:
            kept, sim = _cut_cost(s, kept, sim, room)
        results.append((kept, sim))
        if not keep_all:
            break
    fitting = [r for r in results if r[1].peak_bytes <= room]
    kept, sim = (
        min(fitting, key=lambda r: _cost(r[1]))
        if fitting
        else min(results, key=lambda r: r[1].peak_bytes)
    )
    return Refined(kept, sim, s.num_simulations)
