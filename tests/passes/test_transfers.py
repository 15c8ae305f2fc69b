"""Tests of passes/transfers.py and passes/offload_plan.py: the host-link schedule."""

from __future__ import annotations

from passes.offload_plan import hidden_offload_prefix
from passes.transfers import schedule_offloads, schedule_reloads


def test_offloads_share_one_link_in_order() -> None:
    # Steps of 1 s; two 1-byte tensors at 1 B/s, born at steps 0 and 0: done after 1 and 2 s.
    sched = schedule_offloads([1.0] * 5, {7: 0, 8: 0}, {7: 1, 8: 1}, link_bytes_per_s=1.0)
    assert sched.step == {7: 1, 8: 2}
    assert sched.stall_seconds == 0.0


def test_offload_outlasting_forward_is_stall() -> None:
    sched = schedule_offloads([1.0, 1.0], {7: 1}, {7: 3}, link_bytes_per_s=1.0)
    assert sched.step == {7: 1}
    assert sched.stall_seconds == 3.0


def test_reloads_are_as_late_as_possible_and_serial() -> None:
    # Uses at steps 4 and 5 (starting at 4 s and 5 s); each copy takes 2 s.
    sched = schedule_reloads([1.0] * 6, {1: 4, 2: 5}, {1: 2, 2: 2}, link_bytes_per_s=1.0)
    assert sched.step == {2: 3, 1: 1}
    assert sched.stall_seconds == 0.0


def test_reload_needed_at_once_stalls() -> None:
    sched = schedule_reloads([1.0, 1.0], {1: 0}, {1: 2}, link_bytes_per_s=1.0)
    assert sched.step == {1: 0} and sched.stall_seconds == 2.0


def test_hidden_prefix_stops_when_the_link_cannot_keep_up() -> None:
    assert hidden_offload_prefix([1.0, 1.0, 1.0], [1, 1, 1], 1.0) == 2
    assert hidden_offload_prefix([1.0, 1.0, 1.0], [10, 10, 10], 1.0) == 0
    assert hidden_offload_prefix([1.0, 1.0], [1, 1], 0.0) == 0
