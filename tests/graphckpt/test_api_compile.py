"""Tests of graphckpt/api.py under torch.compile: an auto_checkpoint model compiles as one graph,
and ``CheckpointedModule.backend()`` applies a plan for the same budget inside the compile."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import graphckpt
from graphckpt import DeviceSpec, PlanConfig
from graphckpt.examples import gpt_example
from graphckpt.graph_offload import GraphOffloader


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _step(model: nn.Module, inputs, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    loss = model(*inputs)
    loss.backward()
    grads = {n.removeprefix("_orig_mod."): p.grad for n, p in model.named_parameters()}
    return loss.detach(), grads


def _assert_same_grads(grads: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert grads.keys() == ref.keys()
    for name, grad in ref.items():
        torch.testing.assert_close(grads[name], grad, msg=name)


def test_explain_finds_no_graph_break(tiny_gpt) -> None:
    model, inputs = tiny_gpt
    ckpt = graphckpt.auto_checkpoint(model, budget_gb=1.0, example_inputs=inputs)
    explained = torch._dynamo.explain(ckpt)(*inputs)
    assert explained.graph_count == 1
    assert explained.graph_break_count == 0, explained.break_reasons


def test_compiled_with_its_backend_recomputes_and_matches_eager(tiny_gpt) -> None:
    model, inputs = tiny_gpt
    # Inductor plans its decomposed graph: take the smallest budget that graph allows.
    too_small = graphckpt.auto_checkpoint(copy.deepcopy(model), budget_gb=1e-6)
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed) as failed:
        torch.compile(too_small, backend=too_small.backend())(*inputs)
    assert isinstance(failed.value.inner_exception, graphckpt.InfeasibleBudgetError)
    torch._dynamo.reset()
    budget = int(failed.value.inner_exception.min_feasible_bytes * 1.02)
    ckpt = graphckpt.auto_checkpoint(copy.deepcopy(model), budget / 2**30)
    backend = ckpt.backend()
    compiled = torch.compile(ckpt, backend=backend)
    ref_loss, ref_grads = _step(model, inputs, seed=7)  # dropout active, same seed
    loss, grads = _step(compiled, inputs, seed=7)

    assert len(backend.plans) == 1
    plan = backend.plans[0]
    assert plan.budget_bytes == ckpt.budget_bytes and plan.predicted_peak_bytes <= budget
    assert any(t.action == "recompute" for t in plan.tensors)
    assert plan.recompute_seconds > 0
    torch.testing.assert_close(loss, ref_loss)
    _assert_same_grads(grads, ref_grads)


def test_module_compile_uses_the_planning_backend(tiny_gpt) -> None:
    model, inputs = tiny_gpt
    ckpt = graphckpt.auto_checkpoint(copy.deepcopy(model), budget_gb=1.0)
    seen: list[graphckpt.Plan] = []
    ckpt.compile(backend_options={"on_plan": seen.append, "compiler": "eager"})
    ref_loss, ref_grads = _step(model, inputs, seed=2)
    loss, grads = _step(ckpt, inputs, seed=2)
    assert len(seen) == 1 and seen[0].budget_bytes == ckpt.budget_bytes
    assert torch.equal(loss, ref_loss)
    _assert_same_grads(grads, ref_grads)


class _CountingOffloader(GraphOffloader):
    def __init__(self) -> None:
        super().__init__()
        self.num_offloaded = 0
        self.num_reloaded = 0

    def offload(self, tensor: torch.Tensor) -> torch.Tensor:
        self.num_offloaded += 1
        return super().offload(tensor)

    def reload(self, host: torch.Tensor) -> torch.Tensor:
        self.num_reloaded += 1
        return super().reload(host)


def test_offload_nodes_run_inside_the_compiled_step() -> None:
    model, inputs = gpt_example(batch=4, seq=64, n_layer=4, n_embd=64, n_head=2, vocab_size=128)
    cuda_target = PlanConfig(device=DeviceSpec.preset("cuda"), min_offload_bytes=1 << 16)
    wide = graphckpt.plan(model, inputs, 100.0, config=cuda_target)
    budget = wide.max_peak_bytes - 1
    ckpt = graphckpt.auto_checkpoint(copy.deepcopy(model), budget / 2**30, config=cuda_target)
    backend = ckpt.backend()
    backend.offloader = _CountingOffloader()
    ref_loss, ref_grads = _step(model, inputs, seed=4)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*instead of compiling it with inductor")
        loss, grads = _step(torch.compile(ckpt, backend=backend), inputs, seed=4)

    plan = backend.plans[0]
    assert plan.offload_bytes > 0
    num_offloaded = sum(t.action == "offload" for t in plan.tensors)
    assert backend.offloader.num_offloaded == num_offloaded > 0
    assert backend.offloader.num_reloaded == num_offloaded
    torch.testing.assert_close(loss, ref_loss)
    _assert_same_grads(grads, ref_grads)
