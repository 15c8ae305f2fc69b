"""Tensor-parallel partitioned saves in the plan: which kept tensors each rank keeps 1/world of.

Runs around ``passes/plan.py`` when ``PlanConfig.tp_group`` has more than one rank. A
partitioned tensor costs an all-gather in backward (``DeviceSpec.collective_*``) and frees
(world-1)/world of its bytes between forward and backward, so under one budget the planner
weighs it against recompute: it plans keep/recompute/offload under a ladder of looser budgets,
partitions the largest kept tensors of each plan until the step simulator
(``passes/simulate.py``) puts it under the real budget, and returns the plan with the least
recompute plus all-gather time.
"""

from __future__ import annotations

import dataclasses

import torch
from torch._prims_common import is_non_overlapping_and_dense_or_false

from graphckpt.errors import InfeasibleBudgetError
from graphckpt.options import DeviceSpec, PlanConfig
from graphckpt.partition import group_rank_and_size, should_partition
from graphckpt.plan import Plan
from passes.headroom import headroom_bytes
from passes.meta import node_val
from passes.plan import build_search, plan_pass
from passes.simulate import FORWARD, StepGraph, read_in_backward, simulate
from passes.trace import JointGraph

__all__ = ["gather_seconds", "plan_for_group", "plan_with_partitions"]

_NUM_RUNGS = 6
"""How many looser budgets, between the budget and the keep-all peak, are planned."""


def gather_seconds(nbytes: int, world_size: int, spec: DeviceSpec) -> float:
    """Estimated time of all-gathering a tensor of ``nbytes`` from ``world_size`` slices.

    Example:
        >>> spec = DeviceSpec(collective_bytes_per_s=1e9, collective_latency_s=0)
        >>> gather_seconds(2 * 10**9, 2, spec)
        1.0
    """
    received = nbytes * (world_size - 1) / world_size
    return spec.collective_latency_s + received / spec.collective_bytes_per_s


def _shard_bytes(sg: StepGraph, v: int, world_size: int) -> int:
    val = node_val(sg.nodes[v])
    return -(-val.numel() // world_size) * val.element_size()


def _candidates(sg: StepGraph, saved: set[int], world_size: int) -> list[int]:
    """Kept tensors worth partitioning, largest first: floating-point base tensors that backward
    reads, big enough to split, whose storage nothing else holds (no kept view of it, not a
    forward output)."""
    shared = {sg.base[u] for u in saved if sg.base[u] != u} | set(sg.fwd_outputs)
    found = []
    for v in read_in_backward(sg, saved):
        val = node_val(sg.nodes[v])
        if (
            sg.kind[v] == FORWARD
            and sg.base[v] == v
            and not sg.outputs[v]
            and v not in shared
            and isinstance(val, torch.Tensor)
            and should_partition(val, world_size)
            and is_non_overlapping_and_dense_or_false(val)
        ):
            found.append(v)
    return sorted(found, key=lambda v: (-sg.nbytes[v], v))


def _fewest_partitions(
    sg: StepGraph, saved: set[int], order: list[int], world_size: int, room: int
) -> dict[int, int] | None:
    """The shortest prefix of ``order`` to partition so the step peaks within ``room`` bytes
    (binary search: more partitions never raise the peak here), as ``{node: slice bytes}``."""

    def shards(k: int) -> dict[int, int]:
        return {v: _shard_bytes(sg, v, world_size) for v in order[:k]}

    def fits(k: int) -> bool:
        return simulate(sg, saved, partitioned=shards(k)).peak_bytes <= room

    if not fits(len(order)):
        return None
    lo, hi = 0, len(order)
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(mid):
            hi = mid
        else:
            lo = mid + 1
    return shards(lo)


def _describe(
    plan: Plan,
    sg: StepGraph,
    saved: set[int],
    shards: dict[int, int],
    world_size: int,
    spec: DeviceSpec,
) -> Plan:
    """``plan`` (which keeps ``saved``) with ``shards`` turned from keep into partition, and the
    step's new peak."""
    names = {sg.nodes[v].name: v for v in shards}
    tensors = [
        dataclasses.replace(t, action="partition") if t.node in names else t for t in plan.tensors
    ]
    layers = []
    for layer in plan.layers:
        mine = [names[t.node] for t in plan.tensors if t.node in names and t.layer == layer.name]
        whole = sum(sg.nbytes[v] for v in mine)
        layers.append(
            dataclasses.replace(
                layer,
                kept_bytes=layer.kept_bytes - whole + sum(shards[v] for v in mine),
                partition_bytes=whole,
                partition_seconds=sum(gather_seconds(sg.nbytes[v], world_size, spec) for v in mine),
            )
        )
    peak = simulate(sg, saved, partitioned=shards).peak_bytes
    return dataclasses.replace(plan, layers=layers, tensors=tensors, predicted_peak_bytes=peak)


def _cost(plan: Plan) -> tuple[float, int]:
    return (
        plan.recompute_seconds + sum(layer.partition_seconds for layer in plan.layers),
        len(plan.partitioned_nodes()),
    )


def plan_with_partitions(
    jg: JointGraph, budget_bytes: int, config: PlanConfig, device: torch.device, world_size: int
) -> Plan:
    """Plan one joint graph under ``budget_bytes`` with partitioned saves allowed.

    Args:
        jg: the captured joint graph.
        budget_bytes: the step's budget (DESIGN.md).
        config: planner options; offload is not combined with partitioning here.
        device: where the model runs.
        world_size: ranks of the tensor-parallel group (each keeps 1/world of a partitioned
            tensor).

    Returns:
        The cheapest plan found, by recompute plus all-gather seconds, that fits.

    Raises:
        InfeasibleBudgetError: no plan fits, even with every candidate tensor partitioned.
    """
    spec = config.device_for(device)
    config = dataclasses.replace(config, allow_offload=False)
    try:
        plans = [plan_pass(jg, budget_bytes, config, device)]
        floor, failure = budget_bytes, None
    except InfeasibleBudgetError as e:
        plans, floor, failure = [], e.min_feasible_bytes, e
    sg = build_search(jg, config, spec).sg
    top = plans[0].max_peak_bytes if plans else plan_pass(jg, floor, config, device).max_peak_bytes
    for k in range(1, _NUM_RUNGS + 1):
        looser = floor + (top - floor) * k // _NUM_RUNGS
        if looser > budget_bytes:
            plans.append(plan_pass(jg, looser, config, device))
    room = budget_bytes - headroom_bytes(budget_bytes, config)
    best: Plan | None = None
    for plan in plans:
        keep = plan.saved_nodes()
        saved = {v for v, n in enumerate(sg.nodes) if n.name in keep}
        order = _candidates(sg, saved, world_size)
        shards = _fewest_partitions(sg, saved, order, world_size, room)
        if shards is None:
            continue
        found = _describe(plan, sg, saved, shards, world_size, spec)
        found = dataclasses.replace(found, budget_bytes=budget_bytes)
        if best is None or _cost(found) < _cost(best):
            best = found
    if best is None:
        assert failure is not None, "the plan at the budget itself fits"
        raise failure
    return best


def plan_for_group(
    jg: JointGraph, budget_bytes: int, config: PlanConfig, device: torch.device
) -> Plan:
    """``plan_pass``, or :func:`plan_with_partitions` when ``config.tp_group`` has more than
    one rank: the one entry point ``graphckpt.plan`` and the compile-time partitioner share.

    Example:
        >>> # plan_for_group(jg, budget, PlanConfig(tp_group=group), torch.device("cpu"))
    """
    world_size = group_rank_and_size(config.tp_group)[1] if config.tp_group is not None else 1
    if world_size > 1:
        return plan_with_partitions(jg, budget_bytes, config, device, world_size)
    return plan_pass(jg, budget_bytes, config, device)
