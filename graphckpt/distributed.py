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
import pickle
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


def _store_keys(group: Any, ranks: list[int]) -> tuple[Any, str]:
    """The store every rank of ``group`` reaches, and this group's key prefix in it."""
    store = dist.distributed_c10d._get_default_store()
    name = getattr(group or dist.group.WORLD, "group_name", "")
    return store, f"graphckpt/plan_check/{name}/{','.join(map(str, ranks))}"


def _exchange_summaries(
    summary: PlanSummary, group: Any, ranks: list[int], timeout_s: float
) -> list[PlanSummary]:
    """Every rank's summary, in ``ranks`` order, through the process group's store.

    Each rank posts its summary under the number of checks it has made so far, then waits at
    most ``timeout_s`` for the others' (the store's own wait: every rank, any backend, is
    bounded by ``timeout_s``, not by the group's collective timeout). A rank that times out
    leaves a mark, so a rank arriving after it gave up fails too instead of training alone.
    The last rank to read deletes the keys.
    """
    store, prefix = _store_keys(group, ranks)
    me = dist.get_rank()
    check = store.add(f"{prefix}/count/{me}", 1)
    keys = [f"{prefix}/{check}/summary/{r}" for r in ranks]
    store.set(keys[ranks.index(me)], pickle.dumps(summary))
    try:
        store.wait(keys, datetime.timedelta(seconds=timeout_s))
    except RuntimeError as e:  # DistStoreError on timeout, RuntimeError from older stores
        missing = [r for r, key in zip(ranks, keys, strict=True) if not store.check([key])]
        if not missing:  # the last rank arrived as the wait ended
            return _exchange_read(store, prefix, check, keys)
        store.set(f"{prefix}/{check}/gave_up/{me}", b"1")
        raise PlanAgreementTimeoutError(
            f"rank {me}: ranks {missing} did not reach graphckpt's plan check (check {check} "
            f"of this group) within {timeout_s:g} s. Every rank must run the first training "
            "step of the same planned model; if planning is just slow on some rank, raise "
            "PlanConfig.plan_check_timeout_s"
        ) from e
    gave_up = [r for r in ranks if store.check([f"{prefix}/{check}/gave_up/{r}"])]
    if gave_up:
        raise PlanAgreementTimeoutError(
            f"rank {me}: ranks {gave_up} stopped waiting for this rank at graphckpt's plan check "
            f"(check {check} of this group) before it arrived (see their errors); raise "
            "PlanConfig.plan_check_timeout_s if planning is just slow on some rank"
        )
    return _exchange_read(store, prefix, check, keys)


def _exchange_read(store: Any, prefix: str, check: int, keys: list[str]) -> list[PlanSummary]:
    summaries = [pickle.loads(store.get(key)) for key in keys]
    if store.add(f"{prefix}/{check}/read", 1) == len(keys):
        for key in [*keys, f"{prefix}/{check}/read"]:
            store.delete_key(key)
    return summaries


def check_plans_agree(plan: Plan, group: Any = None, *, timeout_s: float = 120.0) -> None:
    """Check that every rank of ``group`` made the same ``plan``; all ranks must call this.

    Does nothing unless torch.distributed is initialised and the group has more than one rank.
    The ranks exchange plan hashes through the group's store (no collective), so on every rank
    and backend the wait is bounded by ``timeout_s``.

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
    ranks = dist.get_process_group_ranks(group) if group is not None else list(range(world))
    # The planner runs inside AOTAutograd's fake-tensor tracing; keep its modes off the store.
    with _disable_current_modes():
        summaries = _exchange_summaries(summarize_plan(plan), group, ranks, timeout_s)
    _raise_on_mismatch(summaries, ranks)
