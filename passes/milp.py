"""Exact reference solver for the planner's keep/recompute decision (issue 5), beside stage 3.

A Checkmate-style mixed-integer program (Jain et al. 2020, formulated here from scratch) over the
same decisions as ``passes/plan.py``: which forward values to keep for backward, everything else
recomputed just in time. Solved with HiGHS through ``scipy.optimize.milp``; every answer is then
replayed by ``passes/simulate.py``, the ground truth. For small graphs only (~100 nodes).

Formulation. Stages ``t`` are the backward nodes in order. Binaries ``k[v]`` (forward value ``v``
kept) and ``U[t, v]`` (``v`` recomputed at or before stage ``t``); ``U`` is pinned to exactly the
simulator's just-in-time closure: ``U[t, v] = (1 - k[v]) and (U[t-1, v] or b_t reads v or some
forward consumer u has U[t, u])``, so ``sum_t R[t, v] = U[T-1, v]`` and the objective is
``sum_v seconds[v] * U[T-1, v]``. Memory, one row per forward step and per backward stage:
resident inputs + saved RNG states + backward values live at ``b_t`` + kept forward storages
``S[w] >= k[v]`` (``v`` in ``w``'s view class) + recomputed copies ``U[t, v]``, each counted up to
the last stage any of its forward descendants is read by backward.

Difference from the simulator (conservative: the model's peak is never below the simulated one):
a value recomputed in stage ``t`` is counted through the whole stage even when it dies inside it,
a kept or recomputed value lives until its descendants' last backward read rather than its own
last actual read, every forward node is assumed to run, and tuple ops charge all their outputs
while recomputed. A solution the simulator still rejects is cut off and the model re-solved.

Tuple-returning ops (``native_layer_norm``, batch norm) are never kept themselves, only their
``getitem`` outputs: the simulator charges a kept tuple op just its unread outputs and lets its
getitems be "recomputed" for free in backward, so keeping the op would hold its outputs across
the gap between forward and backward at no charge, which no real schedule can do.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from graphckpt.errors import GraphCkptError, InfeasibleBudgetError
from passes.simulate import (
    BACKWARD,
    FORWARD,
    PRIMAL,
    TANGENT,
    StepGraph,
    resident_bytes,
    simulate,
)

__all__ = ["MilpResult", "milp_min_peak", "solve_milp"]

_MIB = float(1 << 20)


@dataclass(frozen=True)
class MilpResult:
    """The MILP's answer, replayed by the simulator.

    ``recompute_seconds`` and ``peak_bytes`` are the simulator's numbers for ``saved``;
    ``model_peak_bytes`` is the MILP's own (conservative) peak estimate.
    """

    saved: frozenset[int]
    recompute_seconds: float
    peak_bytes: int
    optimal: bool
    model_peak_bytes: int = 0


@dataclass
class _Model:
    """Index maps and the linear memory rows of one step graph (no budget applied yet)."""

    cand: list[int]
    stages: list[int]
    num_vars: int
    k: dict[int, int]
    u: dict[tuple[int, int], int]
    s: dict[int, int]
    rows: list[tuple[dict[int, float], float, float]]
    """Logic rows: (coefficients, lower, upper)."""
    mem: list[tuple[dict[int, float], float]]
    """Memory rows: (coefficients, constant bytes); the row's value is constant + coefs . x."""
    cost: np.ndarray


def _candidates(sg: StepGraph) -> list[int]:
    """Forward values backward reads, and their forward ancestors (the only ones ever needed)."""
    todo = [a for b in sg.backward for a in sg.inputs[b] if sg.kind[a] == FORWARD]
    seen = set(todo)
    while todo:
        for a in sg.inputs[todo.pop()]:
            if sg.kind[a] == FORWARD and a not in seen:
                seen.add(a)
                todo.append(a)
    return [v for v in sg.forward if v in seen]


def _storage(sg: StepGraph, x: int) -> int:
    """The node owning ``x``'s storage as backward sees it (views resolved, forward kept as is)."""
    while sg.kind[x] == BACKWARD and sg.base[x] != x and sg.inputs[x]:
        x = sg.inputs[x][0]
    return sg.base[x] if sg.kind[x] in (PRIMAL, TANGENT) else x


def _backward_profile(sg: StepGraph) -> tuple[list[int], dict[int, int]]:
    """Bytes of backward values and tangents live at each stage, and each forward node's last
    backward stage reading it (directly or through backward views; -1 when none)."""
    num = len(sg.backward)
    birth: dict[int, int] = {v: 0 for v, k in enumerate(sg.kind) if k == TANGENT}
    # Tangents live through backward, as in the simulator: the caller's backward call holds them.
    death: dict[int, int] = {v: num - 1 for v in birth}
    last_read: dict[int, int] = {}
    for t, b in enumerate(sg.backward):
        for g in (b, *sg.outputs[b]):
            if _storage(sg, g) == g:
                birth.setdefault(g, t)
                death[g] = max(death.get(g, t), t)
        for a in sg.inputs[b]:
            key = _storage(sg, a)
            if sg.kind[key] == FORWARD:
                last_read[key] = t
            elif sg.kind[key] != PRIMAL:
                death[key] = max(death.get(key, t), t)
    for o in sg.bwd_outputs:
        key = _storage(sg, o)
        if sg.kind[key] == FORWARD:
            last_read[key] = num - 1
        elif sg.kind[key] != PRIMAL:
            death[key] = num - 1
    live = [0] * num
    for key, t0 in birth.items():
        for t in range(t0, death[key] + 1):
            live[t] += sg.nbytes[key]
    return live, last_read


def _forward_profile(sg: StepGraph) -> tuple[dict[int, tuple[int, int]], set[int]]:
    """Forward storages with their (birth, natural death) positions, and those the forward
    returns (alive to the end of the step)."""
    pos = {v: i for i, v in enumerate(sg.forward)}
    span: dict[int, tuple[int, int]] = {}
    for i, v in enumerate(sg.forward):
        for g in (v, *sg.outputs[v]):
            if sg.base[g] == g:
                b, d = span.get(g, (i, i))
                span[g] = (min(b, i), max(d, i))
        for a in sg.inputs[v]:
            w = sg.base[a]
            if sg.kind[w] == FORWARD:
                b, d = span.get(w, (pos[w], pos[w]))
                span[w] = (b, max(d, i))
    returned = {sg.base[o] for o in sg.fwd_outputs if sg.kind[sg.base[o]] == FORWARD}
    return span, returned


def _build(sg: StepGraph) -> _Model:
    cand = _candidates(sg)
    cset = set(cand)
    stages = list(range(len(sg.backward)))
    num_t = len(stages)
    n = 0
    k: dict[int, int] = {}
    u: dict[tuple[int, int], int] = {}
    for v in cand:
        k[v] = n
        n += 1
    for t in stages:
        for v in cand:
            u[t, v] = n
            n += 1
    owners = sorted({sg.base[v] for v in cand if sg.kind[sg.base[v]] == FORWARD})
    s = {w: n + i for i, w in enumerate(owners)}
    n += len(owners)
    consumers: dict[int, list[int]] = {v: [] for v in cand}
    for x in cand:
        for a in sg.inputs[x]:
            if a in cset:
                consumers[a].append(x)
    bwd_live, last_read = _backward_profile(sg)
    reach = {v: last_read.get(v, -1) for v in cand}  # last stage a descendant is read
    for v in reversed(cand):
        for x in consumers[v]:
            reach[v] = max(reach[v], reach[x])
    rows: list[tuple[dict[int, float], float, float]] = []
    direct = [{a for a in sg.inputs[b] if a in cset} for b in sg.backward]
    for t in stages:
        for v in cand:
            x = u[t, v]
            rows.append(({x: 1.0, k[v]: 1.0}, -np.inf, 1.0))  # kept values are never recomputed
            reasons = [u[t - 1, v]] if t else []
            reasons += [u[t, c] for c in consumers[v]]
            if v in direct[t]:
                rows.append(({x: 1.0, k[v]: 1.0}, 1.0, np.inf))
            else:  # recomputed only for a reason: earlier, or a recomputed consumer needs it
                rows.append(({x: 1.0, **{r: -1.0 for r in reasons}}, -np.inf, 0.0))
            for r in reasons:  # each reason forces it unless kept
                rows.append(({x: 1.0, r: -1.0, k[v]: 1.0}, 0.0, np.inf))
    for v in cand:
        if sg.outputs[v]:  # keep a tuple op's getitems, never the op (see module docstring)
            rows.append(({k[v]: 1.0}, 0.0, 0.0))
        w = sg.base[v]
        if w in s:
            rows.append(({s[w]: 1.0, k[v]: -1.0}, 0.0, np.inf))
    resident = resident_bytes(sg)
    rng = {u[num_t - 1, v]: float(sg.rng_state_bytes) for v in cand if sg.random[v] and num_t}
    span, returned = _forward_profile(sg)
    mem: list[tuple[dict[int, float], float]] = []
    for i in range(len(sg.forward)):
        const = resident + sum(sg.nbytes[w] for w, (b, d) in span.items() if b <= i <= d)
        coefs = dict(rng)
        for w in owners:
            if w not in returned and span[w][1] < i:
                coefs[s[w]] = coefs.get(s[w], 0.0) + sg.nbytes[w]
        mem.append((coefs, float(const)))
    ret_bytes = sum(sg.nbytes[w] for w in returned)
    w_reach = {w: 0 for w in owners}
    for v in cand:
        if sg.base[v] in w_reach:
            w_reach[sg.base[v]] = max(w_reach[sg.base[v]], reach[v])
    for t in stages:
        coefs = dict(rng)
        for w in owners:
            if w not in returned and t <= w_reach[w]:
                coefs[s[w]] = coefs.get(s[w], 0.0) + sg.nbytes[w]
        for v in cand:
            size = sg.nbytes[v] + sum(sg.nbytes[g] for g in sg.outputs[v])
            if sg.base[v] == v and size and t <= max(reach[v], 0):
                coefs[u[t, v]] = coefs.get(u[t, v], 0.0) + size
        mem.append((coefs, float(resident + ret_bytes + bwd_live[t])))
    cost = np.zeros(n)
    if num_t:
        for v in cand:
            cost[u[num_t - 1, v]] = sg.seconds[v]
    return _Model(cand, stages, n, k, u, s, rows, mem, cost)


def _solve(
    model: _Model,
    cost: np.ndarray,
    budget: float | None,
    cuts: list[frozenset[int]],
    time_limit_s: float,
) -> tuple[np.ndarray | None, bool, float]:
    """One HiGHS solve. ``budget`` None adds a peak variable P (last column) bounding every
    memory row. Returns (solution or None, proven optimal, model peak)."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import lil_matrix

    n = model.num_vars + (1 if budget is None else 0)
    num_rows = len(model.rows) + len(model.mem) + len(cuts)
    a = lil_matrix((num_rows, n))
    lo = np.empty(num_rows)
    hi = np.empty(num_rows)
    for r, (coefs, low, up) in enumerate(model.rows):
        for j, c in coefs.items():
            a[r, j] = c
        lo[r], hi[r] = low, up
    base = len(model.rows)
    for r, (coefs, const) in enumerate(model.mem):
        for j, c in coefs.items():
            a[base + r, j] = c
        lo[base + r] = -np.inf
        if budget is None:
            a[base + r, n - 1] = -1.0
            hi[base + r] = -const
        else:
            hi[base + r] = budget - const
    base += len(model.mem)
    for r, kept in enumerate(cuts):  # no-good: differ from a rejected keep-set somewhere
        for v, j in model.k.items():
            a[base + r, j] = -1.0 if v in kept else 1.0
        lo[base + r], hi[base + r] = 1.0 - len(kept), np.inf
    integrality = np.ones(n)
    upper = np.ones(n)
    if budget is None:
        integrality[-1], upper[-1] = 0, np.inf
        cost = np.append(cost, 1.0)
    res = milp(
        cost,
        constraints=LinearConstraint(a.tocsr(), lo, hi),
        integrality=integrality,
        bounds=Bounds(np.zeros(n), upper),
        options={"time_limit": time_limit_s, "mip_rel_gap": 1e-9},
    )
    if res.x is None:
        if res.status == 1:
            raise GraphCkptError(
                f"the MILP found no feasible plan within time_limit_s={time_limit_s}; "
                "raise the time limit or use a smaller graph"
            )
        return None, True, 0.0
    x = np.round(res.x)
    peak = max((const + sum(c * x[j] for j, c in coefs.items()) for coefs, const in model.mem))
    return x, res.status == 0, peak


def _kept(model: _Model, x: np.ndarray) -> frozenset[int]:
    return frozenset(v for v, j in model.k.items() if x[j] > 0.5)


def solve_milp(sg: StepGraph, budget_bytes: int, *, time_limit_s: float = 60) -> MilpResult:
    """The cheapest keep-set (least recompute seconds) whose step fits ``budget_bytes``.

    Args:
        sg: the indexed joint graph (small: up to ~100 forward+backward nodes).
        budget_bytes: bound on the whole step's peak, parameters and inputs included.
        time_limit_s: HiGHS wall-clock limit per solve; hitting it gives ``optimal=False``.

    Returns:
        The kept forward nodes with the simulator's peak and recompute seconds for them.

    Raises:
        InfeasibleBudgetError: no keep-set fits under the MILP's (conservative) memory model.

    Example:
        >>> import torch
        >>> from graphckpt.options import DeviceSpec
        >>> from passes.cost import estimate_costs
        >>> from passes.trace import capture_joint_graphs
        >>> jg = capture_joint_graphs(torch.nn.Linear(4, 4), (torch.randn(2, 4),))[0]
        >>> nodes = [*jg.primals, *jg.forward, *jg.tangents, *jg.backward]
        >>> sg = StepGraph.build(jg, estimate_costs(nodes, DeviceSpec()), 5056)
        >>> r = solve_milp(sg, 1 << 30)
        >>> r.peak_bytes <= 1 << 30 and r.optimal
        True
    """
    model = _build(sg)
    cuts: list[frozenset[int]] = []
    for _ in range(64):
        x, optimal, model_peak = _solve(model, model.cost, float(budget_bytes), cuts, time_limit_s)
        if x is None:
            least = milp_min_peak(sg, time_limit_s=time_limit_s)
            raise InfeasibleBudgetError(
                f"budget {budget_bytes / _MIB:.3f} MiB is below the smallest peak the MILP can "
                f"certify, {least.model_peak_bytes / _MIB:.3f} MiB; raise the budget",
                min_feasible_bytes=least.model_peak_bytes,
            )
        kept = _kept(model, x)
        sim = simulate(sg, kept)
        if sim.peak_bytes <= budget_bytes:
            return MilpResult(
                kept, sim.recompute_seconds, sim.peak_bytes, optimal, round(model_peak)
            )
        cuts.append(kept)  # the model was not conservative here: exclude this answer
    raise GraphCkptError("the MILP's answers kept failing the simulator; model is too loose")


def milp_min_peak(sg: StepGraph, *, time_limit_s: float = 60) -> MilpResult:
    """The keep-set with the least peak under the MILP's memory model (ties: least recompute).

    Args:
        sg: the indexed joint graph.
        time_limit_s: HiGHS wall-clock limit.

    Returns:
        The keep-set, replayed by the simulator (``peak_bytes`` is the simulated peak, which
        never exceeds ``model_peak_bytes``).

    Example:
        >>> # with ``sg`` as in solve_milp's example
        >>> # milp_min_peak(sg).peak_bytes <= solve_milp(sg, 1 << 30).peak_bytes
    """
    model = _build(sg)
    # Peak in bytes dominates; seconds (~1e-6 each) only break ties.
    x, optimal, model_peak = _solve(model, model.cost * 1e-3, None, [], time_limit_s)
    assert x is not None, "the peak-minimising MILP is always feasible"
    kept = _kept(model, x)
    sim = simulate(sg, kept)
    return MilpResult(kept, sim.recompute_seconds, sim.peak_bytes, optimal, round(model_peak))
