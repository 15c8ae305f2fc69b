"""Tests for passes/trace.py: capture leaves the garbage collector as it found it, and counts
the resident inputs the graph drops."""

from __future__ import annotations

import copy
import doctest
import gc

import pytest
import torch
import torch.fx as fx
from torch._dynamo.testing import CompileCounter
from torch._functorch.partitioners import default_partition

import graphckpt
import passes.trace
from graphckpt.examples import gpt_example
from passes.trace import (
    JointGraph,
    capture_joint_graphs,
    dynamo_settings,
    joint_backend,
    untraced_bytes,
)


@pytest.mark.parametrize("enabled", [True, False])
def test_capture_restores_the_collector_state(enabled: bool) -> None:
    was = gc.isenabled()
    try:
        gc.enable() if enabled else gc.disable()
        graphs = capture_joint_graphs(torch.nn.Linear(4, 4), (torch.randn(2, 4),))
        assert gc.isenabled() is enabled
    finally:
        gc.enable() if was else gc.disable()
    assert len(graphs) == 1 and graphs[0].forward


def test_collector_is_paused_while_the_partitioner_runs_and_back_after() -> None:
    seen: list[bool] = []

    def keep_all(jg: JointGraph) -> tuple[fx.GraphModule, fx.GraphModule]:
        seen.append(gc.isenabled())
        return default_partition(jg.gm, None, num_fwd_outputs=jg.num_fwd_outputs)

    assert gc.isenabled()
    model = torch.nn.Linear(4, 4)
    compiled = torch.compile(model, backend=joint_backend(keep_all), fullgraph=True)
    try:
        with dynamo_settings():
            compiled(torch.randn(2, 4)).sum().backward()
    finally:
        torch._dynamo.reset()
    assert seen == [False]
    assert gc.isenabled()
    assert model.weight.grad is not None


def test_untraced_bytes_counts_storages_the_graph_does_not_take() -> None:
    x, unused, other = torch.ones(4), torch.ones(8), torch.ones(2, dtype=torch.float64)
    # x[:2] shares x's storage; ``unused`` is counted once although given twice
    assert untraced_bytes([x, unused, x[:2], unused, "not a tensor"], [x]) == 32
    assert untraced_bytes([x, unused, other], [x, unused]) == 16
    assert untraced_bytes([x, unused], []) == 0  # no traced device: nothing counts


def test_capture_records_the_unused_input() -> None:
    """Dynamo drops an input nothing reads; it stays resident, so the joint graph says so."""

    class FirstOnly(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return self.lin(x).sum()

    x, y = torch.randn(2, 4), torch.randn(3, 4)
    (jg,) = capture_joint_graphs(FirstOnly(), (x, y))
    assert jg.untraced_bytes == y.untyped_storage().nbytes() == 48
    (jg,) = capture_joint_graphs(FirstOnly(), (x, x))
    assert jg.untraced_bytes == 0


def test_capture_leaves_other_compiled_functions_and_plans_in_place() -> None:
    """Planning a model (graphckpt.plan captures its graph) recompiles nothing else: not a
    user's compiled function, and not an auto_checkpoint model, whose next call would plan
    again (in a tensor-parallel job, a plan check on the ranks that planned alone)."""
    model, inputs = gpt_example(n_layer=2, n_embd=32, seq=16, batch=2)
    wide = graphckpt.plan(model, inputs, 1.0)
    budget = (wide.min_peak_bytes + wide.max_peak_bytes) / 2 / 2**30
    ckpt = graphckpt.auto_checkpoint(copy.deepcopy(model), budget, example_inputs=inputs)
    assert not ckpt.runs_original and len(ckpt.plans) == 1
    counter = CompileCounter()
    sine = torch.compile(torch.sin, backend=counter)
    try:
        sine(torch.randn(3))
        graphckpt.plan(model, inputs, budget)
        capture_joint_graphs(torch.nn.Linear(4, 4), (torch.randn(2, 4),))
        sine(torch.randn(3))
        ckpt(*inputs).backward()
    finally:
        torch._dynamo.reset()
    assert counter.frame_count == 1
    assert len(ckpt.plans) == 1


def test_docstring_examples_run() -> None:
    result = doctest.testmod(passes.trace)
    assert result.attempted > 0 and result.failed == 0
