"""Plan agreement across the ranks of a ``torch.distributed`` job.

Runs right after the planner, before the first step: every rank hashes its Plan and the ranks
compare hashes, so a rank that planned differently is a clear error, never a silent divergence
or a hang in a later collective. Used by ``passes.pipeline`` for ``auto_checkpoint`` and the
compile backend.
"""

from __future__ import annotations

import datetime
import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

import torch.distributed as dist
from torch.utils._python_dispatch import _disable_current_modes

from graphckpt.errors import PlanAgreementTimeoutError, PlanMismatchError
from graphckpt.plan import Plan

__all__ = [
    "PlanAgreementTimeoutError",
    "PlanMismatchError",
    "PlanSummary",
    "check_plans_agree",
    "summarize_plan",
]

_HEADER_FIELDS = (
    "graph_index",
    "device",
    "budget_bytes",
    "predicted_peak_bytes",
    "min_peak_bytes",
    "max_peak_bytes",
)
"""The Plan's own fields that take part in the hash (``planning_seconds`` does not)."""


@dataclass(frozen=True)
class PlanSummary:
    """What one rank sends the others: a hash of its whole plan and one per layer."""

    digest: str
    header: dict[str, Any]
    layers: list[tuple[str, str, int, int]]
    """Per layer: name, hash of its totals and tensor decisions, kept count, recomputed count."""


def _sha(data: Any) -> str:
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def summarize_plan(plan: Plan) -> PlanSummary:
    """Hash ``plan`` stably: equal plans give equal summaries on every rank and run.

    Args:
        plan: the plan this rank made.

    Returns:
        A PlanSummary; ``digest`` covers everything in ``plan.to_json()`` except timing.

    Example:
        >>> p = Plan(budget_bytes=8, predicted_peak_bytes=4, min_peak_bytes=2, max_peak_bytes=8,
        ...          layers=[], tensors=[])
        >>> summarize_plan(p).digest == summarize_plan(Plan.from_json(p.to_json())).digest
        True
    """
    header = {name: getattr(plan, name) for name in _HEADER_FIELDS}
    layers = []
    for layer in plan.layers:
        decisions = [asdict(t) for t in plan.tensors if t.layer == layer.name]
        digest = _sha([asdict(layer), decisions])
        layers.append((layer.name, digest, layer.num_kept, layer.num_recomputed))
    # Tensors of no listed layer still count in the whole-plan digest.
    digest = _sha([header, layers, [asdict(t) for t in plan.tensors]])
    return PlanSummary(digest=digest, header=header, layers=layers)


def _describe_layer(summaries: list[PlanSummary], ranks: list[int], index: int) -> str:
    parts = []
    for rank, summary in zip(ranks, summaries, strict=True):
        if index < len(summary.layers):
            _, _, kept, recomputed = summary.layers[index]
            parts.append(f"rank {rank} keeps {kept}, recomputes {recomputed}")
        else:
            parts.append(f"rank {rank} has no such layer")
    return "; ".join(parts)


def _first_difference(summaries: list[PlanSummary], ranks: list[int]) -> str:
    """Where the plans of ``summaries`` first differ, in words."""
    reference = summaries[0]
    num_layers = max(len(s.layers) for s in summaries)
    for i in range(num_layers):
        rows = [s.layers[i][:2] if i < len(s.layers) else None for s in summaries]
        if any(row != rows[0] for row in rows):
            names = sorted({row[0] for row in rows if row is not None})
            label = " / ".join(repr(name) for name in names)
            return f"first differing layer {label} ({_describe_layer(summaries, ranks, i)})"
    for name in _HEADER_FIELDS:
        values = [s.header[name] for s in summaries]
        if any(v != reference.header[name] for v in values):
            shown = ", ".join(f"rank {r}: {v}" for r, v in zip(ranks, values, strict=True))
            return f"every layer is the same, but {name} differs ({shown})"
    return "the layers and totals agree; the per-tensor decisions outside any layer differ"


def _raise_on_mismatch(summaries: list[PlanSummary], ranks: list[int]) -> None:
    reference = summaries[0].digest
    differing = [r for r, s in zip(ranks, summaries, strict=True) if s.digest != reference]
    if not differing:
        return
    by_digest: dict[str, list[int]] = {}
    for rank, summary in zip(ranks, summaries, strict=True):
        by_digest.setdefault(summary.digest, []).append(rank)
    groups = "; ".join(f"ranks {rs} made plan {d}" for d, rs in by_digest.items())
    graph = summaries[0].header["graph_index"]
    raise PlanMismatchError(
        f"graphckpt plans differ across ranks for graph {graph}: ranks {differing} differ from "
        f"rank {ranks[0]}; {_first_difference(summaries, ranks)}. {groups}. Every rank must plan "
        "the same model, input shapes, budget and PlanConfig (use a DeviceSpec preset, not "
        "DeviceSpec.calibrate(), whose measurements differ between ranks)"
    )


def _wait_for_all_ranks(group: Any, timeout_s: float) -> None:
    """Bounded barrier: raises PlanAgreementTimeoutError instead of waiting forever."""
    if "gloo" not in str(dist.get_backend(group)):
        # monitored_barrier is gloo-only; other backends are bounded by the group's own timeout.
        return
    try:
        dist.monitored_barrier(
            group, timeout=datetime.timedelta(seconds=timeout_s), wait_all_ranks=True
        )
    except RuntimeError as e:
        raise PlanAgreementTimeoutError(
            f"rank {dist.get_rank()}: not every rank reached graphckpt's plan check within "
            f"{timeout_s:g} s ({e}). Every rank must run the first training step of the same "
            "planned model; if planning is just slow on some rank, raise "
            "PlanConfig.plan_check_timeout_s"
        ) from e


def check_plans_agree(plan: Plan, group: Any = None, *, timeout_s: float = 120.0) -> None:
    """Check that every rank of ``group`` made the same ``plan``; all ranks must call this.

    Does nothing unless torch.distributed is initialised and the group has more than one rank.
    On gloo groups a ``monitored_barrier`` bounds the wait; on other backends the group's own
    timeout does.

    Args:
        plan: this rank's plan.
        group: the process group; None for the default group.
        timeout_s: how long to wait for the other ranks to arrive.

    Raises:
        PlanMismatchError: plans differ; names the ranks and the first differing layer.
        PlanAgreementTimeoutError: a rank did not arrive within ``timeout_s``.

    Example:
        >>> p = Plan(budget_bytes=8, predicted_peak_bytes=4, min_peak_bytes=2, max_peak_bytes=8,
        ...          layers=[], tensors=[])
        >>> check_plans_agree(p)  # no process group: nothing to compare
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    world = dist.get_world_size(group)
    if world < 2:
        return
    summaries: list[Any] = [None] * world
    # The planner runs inside AOTAutograd's fake-tensor tracing; the exchange needs real tensors.
    with _disable_current_modes():
        _wait_for_all_ranks(group, timeout_s)
        try:
            dist.all_gather_object(summaries, summarize_plan(plan), group=group)
        except RuntimeError as e:
            raise PlanAgreementTimeoutError(
                f"rank {dist.get_rank()}: exchanging plan hashes failed ({e}); another rank "
                "left the plan check or the job (see that rank's error)"
            ) from e
    ranks = dist.get_process_group_ranks(group) if group is not None else list(range(world))
    _raise_on_mismatch(summaries, ranks)
