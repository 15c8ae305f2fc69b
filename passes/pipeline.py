"""The whole pipeline as one partitioner: plan each joint graph, then rewrite it.

``planning_partitioner`` is what ``auto_checkpoint`` (and later the compile backend) hands to
``passes.trace.joint_backend``: for each joint graph AOTAutograd produces it runs the planner
under the budget, checks that every rank of a distributed job made the same Plan, reports it,
and returns the rewritten forward and backward graphs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.fx as fx

from graphckpt.distributed import check_plans_agree
from graphckpt.graph_offload import GraphOffloader
from graphckpt.graph_partition import GraphPartitioner
from graphckpt.options import PlanConfig
from graphckpt.plan import Plan
from passes.batch_norm import drop_unread_batch_norm_stats
from passes.decompose import split_dropout
from passes.partition_plan import plan_for_group
from passes.rewrite import rewrite_pass
from passes.trace import JointGraph, Partitioner

__all__ = ["planning_partitioner"]


def planning_partitioner(
    budget_bytes: int,
    config: PlanConfig,
    device: torch.device,
    on_plan: Callable[[Plan], None],
    offloader: GraphOffloader | None = None,
) -> Partitioner:
    """A partitioner that plans each joint graph under ``budget_bytes`` and rewrites it.

    Args:
        budget_bytes: peak bytes of the whole step (DESIGN.md's budget).
        config: planner options.
        device: the device the model runs on.
        on_plan: called with each Plan as it is made.
        offloader: what offload nodes call (a new one when None).

    Returns:
        A callable ``JointGraph -> (forward_gm, backward_gm)``.
    """

    host = offloader or GraphOffloader()
    parts = GraphPartitioner(config.tp_group) if config.tp_group is not None else None

    def partition(jg: JointGraph) -> tuple[fx.GraphModule, fx.GraphModule]:
        split_dropout(jg)
        drop_unread_batch_norm_stats(jg)
        plan = plan_for_group(jg, budget_bytes, config, device)
        if config.check_plans:
            check_plans_agree(plan, config.plan_group, timeout_s=config.plan_check_timeout_s)
        on_plan(plan)
        keep = plan.saved_nodes()
        by_name = {n.name: n for n in jg.gm.graph.nodes}
        offload = {by_name[v]: by_name[a] for v, a in plan.offloaded_nodes().items()}
        saved = [n for n in jg.forward if n.name in keep]
        partitioned = [by_name[v] for v in sorted(plan.partitioned_nodes())]
        return rewrite_pass(
            jg, saved, offload, host, partitioned, parts, replay_random=config.recompute_random
        )

    return partition
