"""Tests of graphckpt/rng.py: the named-state tracker, Megatron seeding, and snapshots."""

from __future__ import annotations

import doctest
import importlib

import pytest
import torch

from graphckpt.rng import (
    MODEL_PARALLEL_RNG,
    RNGSnapshot,
    RNGStatesTracker,
    model_parallel_manual_seed,
    tensor_parallel_seed,
)


def _draws(seed: int, n: int = 4) -> torch.Tensor:
    return torch.rand(n, generator=torch.Generator().manual_seed(seed))


def test_fork_draws_from_the_tracked_state_and_leaves_the_default_alone() -> None:
    tracker = RNGStatesTracker(device="cpu")
    tracker.add("tp", 11)
    torch.manual_seed(0)
    with tracker.fork("tp"):
        first = torch.rand(4)
    after = torch.rand(4)
    torch.manual_seed(0)
    torch.testing.assert_close(after, torch.rand(4), rtol=0, atol=0)
    torch.testing.assert_close(first, _draws(11), rtol=0, atol=0)
    with tracker.fork("tp"):  # the state advanced
        torch.testing.assert_close(torch.rand(4), _draws(11, 8)[4:], rtol=0, atol=0)


def test_get_and_set_states_replay_draws() -> None:
    tracker = RNGStatesTracker(device="cpu")
    tracker.add("a", 1)
    states = tracker.get_states()
    with tracker.fork("a"):
        once = torch.rand(3)
    tracker.set_states(states)
    with tracker.fork("a"):
        torch.testing.assert_close(torch.rand(3), once, rtol=0, atol=0)


def test_duplicates_and_unknown_names_are_clear_errors() -> None:
    tracker = RNGStatesTracker(device="cpu")
    tracker.add("a", 1)
    with pytest.raises(ValueError, match="'a' is already tracked"):
        tracker.add("a", 2)
    with pytest.raises(ValueError, match="seed 1 is already used"):
        tracker.add("b", 1)
    with pytest.raises(KeyError, match="'c' is not tracked"), tracker.fork("c"):
        pass
    tracker.reset()
    assert tracker.get_states() == {}
    tracker.add("a", 1)  # allowed again after reset


def test_device_is_chosen_on_first_use() -> None:
    tracker = RNGStatesTracker()
    assert tracker.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="'cpu' or 'cuda'"):
        _ = RNGStatesTracker(device="meta").device


@pytest.mark.parametrize("tp_rank", [0, 3])
def test_model_parallel_manual_seed_follows_megatron(tp_rank: int) -> None:
    tracker = RNGStatesTracker(device="cpu")
    tracker.add("old", 5)
    assert model_parallel_manual_seed(1234, tp_rank, tracker=tracker) is tracker
    assert list(tracker.get_states()) == [MODEL_PARALLEL_RNG]
    assert tensor_parallel_seed(1234, tp_rank) == 1234 + 2718 + tp_rank
    torch.testing.assert_close(torch.rand(4), _draws(1234), rtol=0, atol=0)
    with tracker.fork():
        torch.testing.assert_close(torch.rand(4), _draws(1234 + 2718 + tp_rank), rtol=0, atol=0)
    with pytest.raises(ValueError, match="tp_rank"):
        model_parallel_manual_seed(1, -1, tracker=tracker)


def test_snapshot_replays_cpu_and_tracker_states_then_restores_the_current_ones() -> None:
    tracker = RNGStatesTracker(device="cpu")
    tracker.add("tp", 9)
    snapshot = RNGSnapshot.capture(None, tracker)
    first = torch.rand(2)
    with tracker.fork("tp"):
        first_tp = torch.rand(2)
    current = torch.get_rng_state()
    with snapshot.replay(tracker):
        torch.testing.assert_close(torch.rand(2), first, rtol=0, atol=0)
        with tracker.fork("tp"):
            torch.testing.assert_close(torch.rand(2), first_tp, rtol=0, atol=0)
    assert torch.equal(torch.get_rng_state(), current)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tracker_on_cuda() -> None:
    tracker = RNGStatesTracker(device="cuda")
    tracker.add("tp", 3)
    before = torch.cuda.get_rng_state()
    with tracker.fork("tp"):
        drawn = torch.rand(4, device="cuda")
    assert torch.equal(torch.cuda.get_rng_state(), before)
    expected = torch.rand(4, device="cuda", generator=torch.Generator("cuda").manual_seed(3))
    torch.testing.assert_close(drawn, expected, rtol=0, atol=0)


def test_docstring_examples_run() -> None:
    # importlib: the package re-exports names that shadow some of its submodules.
    result = doctest.testmod(importlib.import_module("graphckpt.rng"))
    assert result.attempted > 0 and result.failed == 0


def test_model_parallel_manual_seed_makes_a_tracker_when_none_is_given() -> None:
    tracker = model_parallel_manual_seed(5, 1)
    assert list(tracker.get_states()) == [MODEL_PARALLEL_RNG]
    assert tracker.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
