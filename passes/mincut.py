"""Per-layer keep/recompute trade-offs by minimum cut, for the planner's search.

For one segment (a layer) and a price ``lam`` in seconds per byte kept, a minimum s-t cut picks
the set of tensors to keep that minimises ``lam * bytes kept + seconds recomputed`` (plus the
seconds keeping costs, ``StepGraph.keep_seconds``, under a fusing compiler) such that
everything backward reads can be recomputed from what is kept. Sweeping ``lam`` gives the lower
convex hull of the layer's memory/recompute trade-off. Inputs from outside the segment can be
kept but never recomputed here; parameters cost nothing to keep.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import networkx as nx

from passes.meta import must_keep
from passes.simulate import FORWARD, PRIMAL, StepGraph

__all__ = ["Policy", "segment_policies"]

_INF = float("inf")


@dataclass(frozen=True)
class Policy:
    """One way to treat a segment: what it keeps and what its backward recomputes."""

    saved: frozenset[int]
    """Positions (indices into the StepGraph) kept for backward, including segment inputs."""
    recomputed: frozenset[int]
    saved_bytes: int
    recompute_seconds: float
    keep_seconds: float = 0.0
    """What keeping ``saved`` costs in time (``StepGraph.keep_seconds``; 0 unless fused)."""

    @property
    def seconds(self) -> float:
        """The policy's time cost: recompute plus keep seconds."""
        return self.recompute_seconds + self.keep_seconds


def _storage_bytes(sg: StepGraph, v: int) -> int:
    b = sg.base[v]
    return 0 if sg.kind[b] == PRIMAL else sg.nbytes[b]


def _keep_s(sg: StepGraph, v: int) -> float:
    return sg.keep_seconds[v] if sg.keep_seconds else 0.0


def _cut(
    sg: StepGraph, members: list[int], needed: set[int], lam: float, tuples: set[int]
) -> tuple[frozenset[int], frozenset[int]]:
    inside = set(members)
    g = nx.DiGraph()
    g.add_node("s")
    g.add_node("t")
    for v in members:
        # Keeping a view keeps its base: views and tuples are recomputed (free), never kept.
        keepable = sg.base[v] == v and v not in tuples
        keep_cost = lam * _storage_bytes(sg, v) + _keep_s(sg, v) if keepable else _INF
        g.add_edge(("in", v), ("out", v), capacity=keep_cost)
        pinned = must_keep(sg.nodes[v]) or v in sg.pinned
        recompute_cost = _INF if pinned else sg.seconds[v] + 1e-12
        g.add_edge("s", ("in", v), capacity=recompute_cost)
        for a in sg.inputs[v]:
            if a not in inside:
                external_cost = lam * _storage_bytes(sg, a) if sg.kind[a] == FORWARD else 0.0
                g.add_edge(("in", a), ("out", a), capacity=external_cost)
                g.add_edge("s", ("in", a), capacity=_INF)
            g.add_edge(("out", a), ("in", v), capacity=_INF)
        if v in needed:
            g.add_edge(("out", v), "t", capacity=_INF)
    _, (source_side, _sink_side) = nx.minimum_cut(g, "s", "t")
    candidates = {n[1] for n in g.nodes if isinstance(n, tuple)}
    saved = frozenset(
        v for v in candidates if ("in", v) in source_side and ("out", v) not in source_side
    )
    recomputed = frozenset(v for v in members if ("in", v) not in source_side)
    return saved, recomputed


def segment_policies(
    sg: StepGraph, members: list[int], needed: set[int], num_points: int
) -> list[Policy]:
    """The distinct min-cut policies of one segment, from keeping most to keeping least.

    Args:
        sg: the indexed joint graph.
        members: the segment's forward node indices.
        needed: the members backward reads directly.
        num_points: how many prices per byte to try (log-spaced).

    Returns:
        Policies sorted by bytes kept, decreasing; the first keeps everything needed (no
        recompute), the last keeps the least the cut can reach.
    """
    tuples = {v for v in members if sg.outputs[v]}
    total_seconds = sum(sg.seconds[v] for v in members) or 1e-6
    total_bytes = sum(_storage_bytes(sg, v) for v in members) or 1
    mid = total_seconds / total_bytes
    # The first price is tiny, not zero: at zero every cut that recomputes nothing is optimal,
    # including ones that keep tensors backward never reads; a tiny price picks the leanest.
    prices = [mid * 1e-9] + [
        mid * 10 ** (-3 + 7 * i / (num_points - 2)) for i in range(num_points - 1)
    ]
    seen: dict[frozenset[int], Policy] = {}
    for lam in prices:
        saved, recomputed = _cut(sg, members, needed, lam, tuples)
        if saved in seen:
            continue
        kept = {sg.base[v] for v in saved if sg.kind[sg.base[v]] == FORWARD}
        seen[saved] = Policy(
            saved=saved,
            recomputed=recomputed,
            saved_bytes=sum(sg.nbytes[b] for b in kept),
            recompute_seconds=sum(sg.seconds[v] for v in recomputed),
            keep_seconds=sum(_keep_s(sg, b) for b in kept),
        )
    policies = sorted(seen.values(), key=lambda p: (-p.saved_bytes, p.seconds))
    # Keep the lower hull: a policy that keeps more and also recomputes more is never useful.
    hull: list[Policy] = []
    for p in policies:
        if hull and p.seconds <= hull[-1].seconds + 1e-15:
            hull[-1] = p if p.saved_bytes <= hull[-1].saved_bytes else hull[-1]
            continue
        hull.append(p)
    assert math.isfinite(sum(p.seconds for p in hull))
    return hull
