"""Tests of graphckpt/saved.py: how a region's inputs are stored, counted, released and
restored."""

from __future__ import annotations

import doctest
import importlib

import pytest
import torch

from graphckpt.buffers import ContiguousBuffers
from graphckpt.errors import GraphCkptError
from graphckpt.offload import OffloadEngine
from graphckpt.saved import RELEASED_ATTR, SavedInputs, Storage, check_not_released

PLAIN = Storage(group=None, offload=None, buffers=None)
OFFLOAD = Storage(group=None, offload=OffloadEngine(), buffers=None)


def test_restore_returns_equal_tensors_and_free_drops_them() -> None:
    x, ids = torch.randn(3, 4, requires_grad=True), torch.arange(5)
    for storage in (
        PLAIN,
        OFFLOAD,
        Storage(group=None, offload=None, buffers=ContiguousBuffers(1)),
    ):
        saved = SavedInputs(storage, [x, ids])
        assert saved.requires_grad == [True, False]
        got_x, got_ids = saved.restore()
        assert torch.equal(got_x, x) and torch.equal(got_ids, ids)
        saved.free()
        assert saved.nbytes() == 0 and saved.consumed
        with pytest.raises(GraphCkptError, match="backward ran twice"):
            saved.restore()


def test_nbytes_split_between_device_and_host() -> None:
    x, mask = torch.randn(3, 4), torch.ones(3, 4, dtype=torch.bool)
    saved = SavedInputs(OFFLOAD, [x, mask])
    assert saved.nbytes("host") == 48
    assert saved.nbytes("device") == 12
    assert saved.nbytes() == 60


def test_release_frees_only_non_leaf_non_view_tensors_held_elsewhere() -> None:
    leaf = torch.randn(4, requires_grad=True)
    intermediate = leaf * 2
    view = intermediate[:2]
    mask = intermediate > 0
    tensors = [leaf, intermediate, view, mask]
    saved = SavedInputs(OFFLOAD, tensors)
    saved.release_sources(tensors)
    assert intermediate.numel() == 0 and getattr(intermediate, RELEASED_ATTR) == "offloaded"
    assert leaf.numel() == 4 and view.numel() == 2 and mask.numel() == 4
    assert torch.equal(saved.restore()[1], leaf.detach() * 2)
    with pytest.raises(GraphCkptError, match="kwargs\\['h'\\] of checkpoint\\(\\)"):
        check_not_released(intermediate, "kwargs['h']")
    check_not_released(leaf, "args[0]")


def test_kept_input_modified_in_place_is_detected() -> None:
    x = torch.randn(3)
    saved = SavedInputs(PLAIN, [x])
    x.mul_(2)
    with pytest.raises(RuntimeError, match="modified in place"):
        saved.restore()


def test_docstring_examples_run() -> None:
    # importlib: the package re-exports names that shadow some of its submodules.
    result = doctest.testmod(importlib.import_module("graphckpt.saved"))
    assert result.attempted > 0 and result.failed == 0
