"""Stage 3 of the pipeline: choose what to keep and what to recompute under a byte budget.

Each distinct layer is solved once by min-cut (``passes/mincut.py``) into a list of policies
from "keep all" to "keep least". A greedy search then moves layers to cheaper-in-memory policies
in order of recompute seconds per byte freed (earlier layers first on ties: their activations
live longest), and a binary search over that sequence finds the first state whose simulated
whole-step peak (``passes/simulate.py``) fits the budget. A per-tensor local search
(``passes/refine.py``) then lowers that plan's recompute, or finds a plan when no layer-level one
fits, and gives the smallest feasible peak. Returns a Plan; mutates nothing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from graphckpt.errors import InfeasibleBudgetError
from graphckpt.options import DeviceSpec, PlanConfig
from graphckpt.plan import LayerPlan, Plan, TensorDecision
from passes.cost import estimate_costs
from passes.headroom import headroom_bytes, smallest_budget
from passes.layers import Segment, find_segments
from passes.milp import milp_min_peak, solve_milp
from passes.mincut import Policy, segment_policies
from passes.offload_plan import hidden_offload_prefix
from passes.op_seconds import measures_op_seconds
from passes.refine import Refined, lowest_peak, refine
from passes.simulate import FORWARD, Simulation, StepGraph, read_in_backward, simulate
from passes.trace import JointGraph

__all__ = ["MILP_MAX_NODES", "PlanSearch", "plan_pass", "rng_state_bytes"]

_MIB = float(1 << 20)


def rng_state_bytes(device_type: str) -> int:
    """Bytes of one saved generator state: the CPU Mersenne state, or CUDA's seed+offset."""
    return 5056 if device_type == "cpu" else 16


@dataclass(frozen=True)
class State:
    """A candidate plan: each segment's policy, and the segments whose kept tensors offload."""

    choice: tuple[int, ...]
    offloaded: frozenset[int] = frozenset()


@dataclass
class PlanSearch:
    """The planner's working state for one joint graph: indexed graph, segments, policies."""

    sg: StepGraph
    segments: list[Segment]
    members: list[list[int]]
    policies: list[list[Policy]]
    link_bytes_per_s: float = 0.0
    min_offload_bytes: int = 0

    def saved_for(self, state: State) -> set[int]:
        """Union of what each segment keeps under its chosen policy."""
        saved: set[int] = set()
        for seg, p in enumerate(state.choice):
            saved |= self.policies[seg][p].saved
        return saved

    def offloaded_for(self, state: State) -> set[int]:
        """Kept tensors of the offloaded segments that are large enough to be worth a copy."""
        sg, out = self.sg, set()
        for seg in state.offloaded:
            mine = set(self.members[seg])
            out |= {
                v
                for v in self.policies[seg][state.choice[seg]].saved
                if v in mine and sg.base[v] == v and sg.nbytes[v] >= max(self.min_offload_bytes, 1)
            }
        return out

    def run(self, state: State) -> Simulation:
        """Simulate the whole step under ``state``."""
        return simulate(
            self.sg,
            self.saved_for(state),
            offloaded=self.offloaded_for(state),
            link_bytes_per_s=self.link_bytes_per_s,
        )


def _map_policy(sg: StepGraph, policy: Policy, rep: list[int], seg: list[int]) -> Policy:
    """Carry a policy solved on layer ``rep`` over to the identical layer ``seg``."""
    mapping = dict(zip(rep, seg))
    for r, s in zip(rep, seg):
        for a, b in zip(sg.inputs[r], sg.inputs[s]):
            mapping.setdefault(a, b)
    return Policy(
        saved=frozenset(mapping.get(v, v) for v in policy.saved),
        recomputed=frozenset(mapping.get(v, v) for v in policy.recomputed),
        saved_bytes=policy.saved_bytes,
        recompute_seconds=policy.recompute_seconds,
        keep_seconds=policy.keep_seconds,
    )


def build_search(
    jg: JointGraph,
    config: PlanConfig,
    spec: DeviceSpec,
    *,
    measure_scratch: bool = False,
    measure_seconds: bool = False,
) -> PlanSearch:
    """Index the graph, find its layers and solve each distinct layer's min-cut once.

    ``measure_scratch`` prices kernel scratch memory by running those ops on this CPU
    (``passes/scratch.py``), ``measure_seconds`` times the forward ops there
    (``passes/op_seconds.py``); both only right when the model runs on this CPU.
    """
    search = _solve_segments(jg, config, spec, measure_scratch, measure_seconds)
    if config.offload_allowed(spec):
        search.link_bytes_per_s = spec.host_link_bytes_per_s
        search.min_offload_bytes = config.min_offload_bytes
    return search


def _solve_segments(
    jg: JointGraph, config: PlanConfig, spec: DeviceSpec, measure_scratch: bool, measure_s: bool
) -> PlanSearch:
    nodes = [*jg.primals, *jg.forward, *jg.tangents, *jg.backward]
    costs = estimate_costs(
        nodes,
        spec,
        measure_scratch=measure_scratch,
        measure_seconds=measure_s,
        fused_pointwise=bool(config.fused_pointwise),
        backward=jg.backward,
    )
    sg = StepGraph.build(
        jg,
        costs,
        rng_state_bytes(spec.type),
        512 if spec.type == "cuda" else 1,
        pin_random=not config.recompute_random,
    )
    index = sg.index_of()
    segments = find_segments(jg.forward, config.layers)
    members = [[index[n] for n in s.nodes] for s in segments]
    needed = {a for b in sg.backward for a in sg.inputs[b] if sg.kind[a] == FORWARD}
    solved: dict[int, int] = {}
    policies: list[list[Policy]] = []
    for i, seg in enumerate(segments):
        rep = solved.get(seg.signature)
        if rep is not None and len(members[rep]) == len(members[i]):
            policies.append([_map_policy(sg, p, members[rep], members[i]) for p in policies[rep]])
            continue
        solved[seg.signature] = i
        found = segment_policies(sg, members[i], needed & set(members[i]), config.num_lambda_points)
        policies.append(found if config.allow_recompute else found[:1])
    return PlanSearch(sg, segments, members, policies)


def _offload_states(search: PlanSearch) -> list[State]:
    """Keep-all states offloading the first 1, 2, ... segments, as long as the copies hide."""
    if search.link_bytes_per_s <= 0:
        return []
    sg = search.sg
    keep_all = State(tuple([0] * len(search.policies)))
    seconds = [sum(sg.seconds[v] for v in mine) for mine in search.members]
    sizes = [
        sum(sg.nbytes[v] for v in search.offloaded_for(State(keep_all.choice, frozenset({i}))))
        for i in range(len(search.members))
    ]
    count = hidden_offload_prefix(seconds, sizes, search.link_bytes_per_s)
    return [State(keep_all.choice, frozenset(range(j))) for j in range(1, count + 1)]


def greedy_sequence(search: PlanSearch) -> list[State]:
    """States from keep-all to keep-least: first offloads whose copies hide (free), then one
    policy step at a time, cheapest recompute seconds per byte freed first."""
    offloads = _offload_states(search)
    offloaded = offloads[-1].offloaded if offloads else frozenset()
    steps: list[tuple[float, int, int]] = []
    for seg, pols in enumerate(search.policies):
        for p in range(1, len(pols)):
            freed = max(pols[p - 1].saved_bytes - pols[p].saved_bytes, 1)
            cost = pols[p].seconds - pols[p - 1].seconds
            steps.append((cost / freed, seg, p))
    steps.sort()
    choice = [0] * len(search.policies)
    states = [State(tuple(choice)), *offloads]
    for _ratio, seg, p in steps:
        choice[seg] = max(choice[seg], p)
        states.append(State(tuple(choice), offloaded))
    return states


def prefix_states(search: PlanSearch) -> list[State]:
    """Megatron's block method inside the planner's space: the first k segments at their
    keep-least policy, the rest keeping everything, for k = 1..n."""
    states, choice = [], [0] * len(search.policies)
    for seg, pols in enumerate(search.policies):
        choice[seg] = len(pols) - 1
        states.append(State(tuple(choice)))
    return states


def _cost(search: PlanSearch, sim: Simulation) -> tuple[float, int]:
    seconds = sim.recompute_seconds + sim.offload_stall_seconds + sim.keep_seconds
    return (seconds, sim.recompute_flops)


def _first_fitting(
    search: PlanSearch, states: list[State], budget: int, num_probes: int = 12
) -> tuple[int | None, int, int]:
    """Index of the first state along ``states`` whose peak fits, the least peak seen, and
    the index of the state that had it.

    The peak is not monotone along the sequence (recompute transients can outweigh what a step
    frees), so evenly spaced probes are simulated first; the first fitting probe is then
    narrowed down by bisection against the probe before it.
    """
    last = len(states) - 1
    probes = sorted({round(i * last / (num_probes - 1)) for i in range(num_probes)})
    peaks = {i: search.run(states[i]).peak_bytes for i in probes}
    at = min(peaks, key=lambda i: (peaks[i], i))
    least = peaks[at]
    fitting = [i for i in probes if peaks[i] <= budget]
    if not fitting:
        return None, least, at
    hi = fitting[0]
    lo = max((i for i in probes if i < hi), default=hi) + (0 if hi == 0 else 1)
    while lo < hi:
        mid = (lo + hi) // 2
        peak = search.run(states[mid]).peak_bytes
        if peak < least:
            least, at = peak, mid
        if peak <= budget:
            hi = mid
        else:
            lo = mid + 1
    return hi, least, at


def _describe(
    search: PlanSearch, saved: set[int] | frozenset[int], offloaded: set[int], sim: Simulation
) -> tuple[list[LayerPlan], list[TensorDecision]]:
    sg = search.sg
    recomputed = set(sim.recomputed)
    anchors = sim.reload_before or {}
    layers, tensors = [], []
    for seg, segment in enumerate(search.segments):
        mine = search.members[seg]
        kept = [v for v in mine if v in saved and v not in offloaded]
        sent = [v for v in mine if v in offloaded]
        rec = [v for v in mine if v in recomputed]
        layers.append(
            LayerPlan(
                name=segment.name,
                num_kept=len(kept) + len(sent),
                num_recomputed=len(rec),
                kept_bytes=sum(sg.nbytes[v] for v in kept),
                recompute_flops=sum(sg.flops[v] for v in rec),
                recompute_seconds=sum(sg.seconds[v] for v in rec),
                offload_bytes=sum(sg.nbytes[v] for v in sent),
            )
        )
        name = segment.name
        tensors += [TensorDecision(sg.nodes[v].name, name, "keep", sg.nbytes[v]) for v in kept]
        tensors += [
            TensorDecision(
                sg.nodes[v].name, name, "offload", sg.nbytes[v], sg.nodes[anchors[v]].name
            )
            for v in sent
            if v in anchors
        ]
        tensors += [
            TensorDecision(sg.nodes[v].name, name, "recompute", sg.nbytes[v])
            for v in rec
            if sg.nbytes[v]
        ]
    return layers, tensors


def _lowest(search: PlanSearch, state: State, keep_all: State, config: PlanConfig) -> Refined:
    """The lowest-peak plan: the layer search's lowest state and keep-all, lowered per tensor."""
    offloaded = search.offloaded_for(state)
    starts = [search.saved_for(state)] + ([] if offloaded else [search.saved_for(keep_all)])
    return lowest_peak(
        search.sg,
        starts,
        max_node_visits=config.local_search_node_visits if config.allow_recompute else 0,
        offloaded=offloaded,
        link_bytes_per_s=search.link_bytes_per_s,
    )


def _to_plan(
    search: PlanSearch,
    jg: JointGraph,
    saved: frozenset[int],
    offloaded: set[int],
    sim: Simulation,
    bounds: tuple[int, int, Simulation],
    spec: DeviceSpec,
    start: float,
    config: PlanConfig,
) -> Plan:
    """The Plan for ``saved``: ``bounds`` is (budget, smallest feasible budget, keep-all run)."""
    budget_bytes, least, most = bounds
    sg = search.sg
    # A kept tensor that backward never reads (its readers are all kept or recomputed from
    # elsewhere) is not saved by the rewrite; the plan must not count it.
    keepable = {v for v in saved if sg.kind[v] == FORWARD and not sg.outputs[v]}
    unread = keepable - read_in_backward(sg, saved)
    if unread:
        pruned = simulate(
            sg,
            saved - unread,
            offloaded=offloaded - unread,
            link_bytes_per_s=search.link_bytes_per_s,
        )
        if pruned.peak_bytes <= sim.peak_bytes:
            saved, offloaded, sim = saved - unread, offloaded - unread, pruned
    layers, tensors = _describe(search, saved, offloaded, sim)
    return Plan(
        budget_bytes=budget_bytes,
        predicted_peak_bytes=sim.peak_bytes,
        min_peak_bytes=least,
        max_peak_bytes=smallest_budget(most.peak_bytes, config),
        layers=layers,
        tensors=tensors,
        device=spec.type,
        graph_index=jg.index,
        planning_seconds=time.perf_counter() - start,
    )


MILP_MAX_NODES = 400
"""Largest joint graph ``PlanConfig(solver="milp")`` accepts: the MILP grows with nodes x stages."""


def _plan_milp(
    search: PlanSearch,
    jg: JointGraph,
    budget_bytes: int,
    config: PlanConfig,
    spec: DeviceSpec,
    start: float,
) -> Plan:
    """The exact MILP's plan (``passes/milp.py``), described like the search's, leaving the
    same headroom free (:func:`headroom_bytes`)."""
    sg = search.sg
    if len(sg.nodes) > MILP_MAX_NODES:
        raise ValueError(
            f"PlanConfig(solver='milp') is for small graphs: this joint graph has {len(sg.nodes)} "
            f"nodes, more than {MILP_MAX_NODES}; use solver='search'"
        )
    least = smallest_budget(milp_min_peak(sg).peak_bytes, config)
    try:
        found = solve_milp(sg, budget_bytes - headroom_bytes(budget_bytes, config))
    except InfeasibleBudgetError as e:
        raise InfeasibleBudgetError(
            f"budget {budget_bytes / _MIB:.3f} MiB is below the smallest feasible peak "
            f"{least / _MIB:.3f} MiB the MILP certifies for this model and input shape; raise "
            "the budget",
            min_feasible_bytes=least,
        ) from e
    most = search.run(greedy_sequence(search)[0])
    sim = simulate(sg, found.saved)
    bounds = (budget_bytes, least, most)
    return _to_plan(search, jg, found.saved, set(), sim, bounds, spec, start, config)


def plan_pass(
    jg: JointGraph,
    budget_bytes: int,
    config: PlanConfig,
    device: torch.device,
    *,
    measure_scratch: bool | None = None,
) -> Plan:
    """Plan one joint graph under ``budget_bytes`` (the whole step's peak, DESIGN.md).

    Args:
        jg: the captured joint graph.
        budget_bytes: the peak the step must stay under, parameters and inputs included.
        config: what the planner may do.
        device: where the model runs (selects the cost preset when config.device is None).
        measure_scratch: price kernel scratch memory (``passes/scratch.py``); None: when the
            model is on this CPU and planned for a CPU. False gives the scratch-free memory
            model the MILP (``passes/milp.py``) uses, and no op timing either (the costs then
            depend only on the graph and the DeviceSpec; ``PlanConfig.measure_op_seconds``
            decides the timing otherwise).

    Returns:
        The cheapest plan found whose simulated peak fits the budget.

    Raises:
        InfeasibleBudgetError: even the plan that keeps least peaks above the budget.
    """
    start = time.perf_counter()
    spec = config.device_for(device)
    # Kernel scratch is measured only where it can be: a model on this CPU, planned for a CPU
    # (not for CUDA from here, not a meta model, whose shapes may not fit in memory).
    if measure_scratch is None:
        measure_scratch = device.type == "cpu" and spec.type == "cpu"
    measure_seconds = measure_scratch and measures_op_seconds(config, device, spec)
    search = build_search(
        jg, config, spec, measure_scratch=measure_scratch, measure_seconds=measure_seconds
    )
    if config.solver == "milp":
        return _plan_milp(search, jg, budget_bytes, config, spec, start)
    states = greedy_sequence(search)
    most = search.run(states[0])
    room = budget_bytes - headroom_bytes(budget_bytes, config)
    best, least, at = _first_fitting(search, states, room)
    # Megatron's block method is in the planner's space too: never worse than it by the cost
    # model, and sometimes the only fit when the greedy order's peak is not monotone.
    prefixes = prefix_states(search)
    k, least_k, at_k = _first_fitting(search, prefixes, room, num_probes=4)
    fits = [states[best]] if best is not None else []
    fits += [prefixes[k]] if k is not None else []
    lowest_state = states[at] if least <= least_k else prefixes[at_k]
    low = _lowest(search, lowest_state, states[0], config)
    least = smallest_budget(low.sim.peak_bytes, config)  # the smallest budget that plans
    if low.sim.peak_bytes > room:
        raise InfeasibleBudgetError(
            f"budget {budget_bytes / 2**30:.3f} GiB ({budget_bytes / _MIB:.1f} MiB) is below the "
            f"smallest feasible peak {least / 2**30:.3f} GiB ({least / _MIB:.1f} MiB) for this "
            "model and input shape; raise the budget, reduce the batch, or allow more actions "
            "(recompute/offload)",
            min_feasible_bytes=least,
        )
    # Start the per-tensor search from the cheapest layer-level fit, else the lowest plan.
    if fits:
        state = min(fits, key=lambda st: _cost(search, search.run(st)))
        first, offloaded = search.saved_for(state), search.offloaded_for(state)
    else:
        first, offloaded = set(low.saved), search.offloaded_for(lowest_state)
    found = refine(
        search.sg,
        first,
        min(room, most.peak_bytes),  # above keep-all's peak the cheapest plan is known
        max_node_visits=config.local_search_node_visits if config.allow_recompute else 0,
        keep_all=search.saved_for(states[0]) if not offloaded else (),
        offloaded=offloaded,
        link_bytes_per_s=search.link_bytes_per_s,
    )
    bounds = (budget_bytes, least, most)
    return _to_plan(search, jg, found.saved, offloaded, found.sim, bounds, spec, start, config)
