"""When offloaded tensors leave and come back: the host-link schedule the simulator replays.

The link is one serial resource. In forward a tensor's device-to-host copy starts once it is
produced (and the link is free); its device memory can go once the copy has finished and
forward no longer reads it. In backward each tensor's host-to-device copy is scheduled as
late as possible before its first use, the latest-needed first, so device memory is held for
the shortest time. Times come from the cost model's per-node seconds. Pure functions.
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass

__all__ = ["TransferSchedule", "schedule_offloads", "schedule_reloads"]


@dataclass(frozen=True)
class TransferSchedule:
    """For each tensor, the step at which its transfer lets memory go (forward) or begins
    (backward), and the seconds compute had to wait for the link."""

    step: dict[int, int]
    stall_seconds: float


def _ends(step_seconds: list[float]) -> list[float]:
    return list(itertools.accumulate(step_seconds))


def schedule_offloads(
    step_seconds: list[float],
    births: dict[int, int],
    nbytes: dict[int, int],
    link_bytes_per_s: float,
) -> TransferSchedule:
    """Forward: the step after which each tensor's copy to host has finished.

    Args:
        step_seconds: duration of each forward step, in order.
        births: step at which each offloaded tensor is produced.
        nbytes: bytes of each offloaded tensor.
        link_bytes_per_s: host-link bandwidth.

    Returns:
        Per tensor, the first step that ends after its copy finished (the last step if the
        copy outlasts forward; the excess is stall).
    """
    ends = _ends(step_seconds)
    total = ends[-1] if ends else 0.0
    free_at = 0.0
    done: dict[int, int] = {}
    stall = 0.0
    for v in sorted(births, key=lambda u: births[u]):
        start = max(ends[births[v]], free_at)
        free_at = start + nbytes[v] / link_bytes_per_s
        done[v] = min(bisect.bisect_left(ends, free_at), len(ends) - 1)
        stall = max(stall, free_at - total)
    return TransferSchedule(done, stall)


def schedule_reloads(
    step_seconds: list[float],
    first_use: dict[int, int],
    nbytes: dict[int, int],
    link_bytes_per_s: float,
) -> TransferSchedule:
    """Backward: the step at which each tensor's copy back to the device begins.

    Args:
        step_seconds: duration of each backward step, in order.
        first_use: step at which backward first reads each tensor.
        nbytes: bytes of each tensor.
        link_bytes_per_s: host-link bandwidth.

    Returns:
        Per tensor, the step during which its copy starts (0 if it must start before
        backward does; the time before backward's start is stall).
    """
    ends = _ends(step_seconds)
    starts = [e - s for e, s in zip(ends, step_seconds)]
    next_start = float("inf")
    begin: dict[int, int] = {}
    stall = 0.0
    for v in sorted(first_use, key=lambda u: -first_use[u]):
        finish = min(starts[first_use[v]], next_start)
        start = finish - nbytes[v] / link_bytes_per_s
        next_start = start
        begin[v] = max(bisect.bisect_right(starts, start) - 1, 0)
        stall = max(stall, -start)
    return TransferSchedule(begin, stall)
