"""Tests of passes/inductor_reuse.py: inductor reuses freed buffers with its reorder pass off."""

from __future__ import annotations

import contextlib
import doctest
import importlib

import torch
import torch._inductor.config as inductor_config
from torch._inductor.utils import run_and_get_code

from passes.inductor_reuse import assign_planning_info, planning_info_for_reuse


def _layers(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Four blocks whose matmul outputs are freed a few kernels before the next block's."""
    for _ in range(4):
        h = torch.mm(x, w)
        x = torch.tanh(h) * torch.sigmoid(torch.mm(h, w)) + x
    return x


def _compiled_call(with_info: bool) -> str:
    """The generated ``call`` of ``_layers``, compiled with the reorder pass off."""
    torch._dynamo.reset()
    x, w = torch.randn(64, 64), torch.randn(64, 64) / 8
    scope = planning_info_for_reuse() if with_info else contextlib.nullcontext()
    with inductor_config.patch(reorder_for_peak_memory=False, fx_graph_cache=False), scope:
        out, codes = run_and_get_code(torch.compile(_layers), x, w)
    torch.testing.assert_close(out, _layers(x, w))
    (code,) = codes
    return code[code.index("def call(") :]


def test_freed_buffers_are_reused_with_the_reorder_pass_off() -> None:
    without = _compiled_call(with_info=False)
    with_info = _compiled_call(with_info=True)
    # Without sizes inductor estimates a peak of 0 and reuses only between adjacent kernels.
    assert with_info.count("# reuse") > without.count("# reuse")
    assert with_info.count("empty_strided") < without.count("empty_strided")


def test_the_pass_is_installed_only_inside_its_scope() -> None:
    assert inductor_config._post_fusion_custom_pass is None
    with planning_info_for_reuse():
        assert inductor_config._post_fusion_custom_pass is assign_planning_info
    assert inductor_config._post_fusion_custom_pass is None


def test_docstring_examples_run() -> None:
    module = importlib.import_module("passes.inductor_reuse")
    assert doctest.testmod(module).failed == 0
