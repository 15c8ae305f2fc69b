"""Tests for passes/trace.py: capture leaves the garbage collector as it found it."""

from __future__ import annotations

import gc

import pytest
import torch
import torch.fx as fx
from torch._functorch.partitioners import default_partition

from passes.trace import JointGraph, capture_joint_graphs, dynamo_settings, joint_backend


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
