"""Offload planned for a simulated CUDA target, on CPU tensors: the planner sends kept tensors
to host where the copies hide, the rewriter inserts offload/prefetch/reload nodes, and the
rewritten step still computes the original's loss and gradients."""

from __future__ import annotations

import copy

import torch

import graphckpt
from benchmarks.measure import grads_equal, measure_step
from graphckpt import DeviceSpec, PlanConfig
from graphckpt.examples import gpt_example
from passes.pipeline import planning_partitioner
from passes.trace import JointGraph, dynamo_settings, joint_backend

CUDA_TARGET = PlanConfig(device=DeviceSpec.preset("cuda"), min_offload_bytes=1 << 16)


def _model():
    return gpt_example(batch=4, seq=64, n_layer=4, n_embd=64, n_head=2, vocab_size=128)


def test_offload_lowers_the_peak_before_any_recompute() -> None:
    model, inputs = _model()
    wide = graphckpt.plan(model, inputs, 100.0, config=CUDA_TARGET)
    no_offload = PlanConfig(device=DeviceSpec.preset("cuda"), allow_offload=False)
    budget = wide.max_peak_bytes - 1
    p = graphckpt.plan(model, inputs, budget / 2**30, config=CUDA_TARGET)
    assert p.offload_bytes > 0 and p.recompute_flops == 0
    assert p.predicted_peak_bytes <= budget
    assert all(t.reload_before for t in p.tensors if t.action == "offload")
    q = graphckpt.plan(model, inputs, budget / 2**30, config=no_offload)
    assert q.offload_bytes == 0 and q.recompute_seconds > 0


def test_rewriter_inserts_offload_nodes_and_grads_match() -> None:
    model, inputs = _model()
    wide = graphckpt.plan(model, inputs, 100.0, config=CUDA_TARGET)
    budget = wide.max_peak_bytes - 1
    graphs: list[tuple[str, str]] = []
    plans: list[graphckpt.Plan] = []
    inner = planning_partitioner(budget, CUDA_TARGET, torch.device("cpu"), plans.append)

    def partition(jg: JointGraph):
        fw, bw = inner(jg)
        graphs.append((fw.code, bw.code))
        return fw, bw

    reference = measure_step(copy.deepcopy(model), inputs, seed=2)
    planned = copy.deepcopy(model)
    compiled = torch.compile(planned, backend=joint_backend(partition), fullgraph=True)
    with dynamo_settings():
        result = measure_step(compiled, inputs, seed=2)
    fw_code, bw_code = graphs[0]
    assert plans[0].offload_bytes > 0
    assert "offload" in fw_code
    assert "prefetch" in bw_code and "reload" in bw_code
    assert bw_code.index("prefetch") < bw_code.index("reload")
    grads = {k.removeprefix("_orig_mod."): g for k, g in result.grads.items()}
    assert result.loss == reference.loss and grads_equal(grads, reference.grads)
