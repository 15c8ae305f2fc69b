"""Tests of passes/rewrite.py: rewritten graphs compute the same loss and gradients bitwise."""

from __future__ import annotations

import copy

import pytest
import torch

from benchmarks.measure import grads_equal, measure_step
from passes.rewrite import recompute_closure, rewrite_pass
from passes.trace import JointGraph, dynamo_settings, joint_backend


@pytest.mark.parametrize("keep", ["nothing", "half"])
def test_recompute_with_dropout_is_bitwise_equal(tiny_gpt, keep) -> None:
    model, inputs = tiny_gpt
    reference = measure_step(copy.deepcopy(model), inputs, seed=3)
    recomputed: list[int] = []

    def partition(jg: JointGraph):
        needed = [a for b in jg.backward for a in b.all_input_nodes if a in set(jg.forward)]
        saved = [] if keep == "nothing" else needed[::2]
        recomputed.append(len(recompute_closure(jg, saved)))
        return rewrite_pass(jg, saved)

    planned = copy.deepcopy(model)
    compiled = torch.compile(planned, backend=joint_backend(partition), fullgraph=True)
    with dynamo_settings():
        result = measure_step(compiled, inputs, seed=3)
    assert recomputed[0] > 0
    assert result.loss == reference.loss
    grads = {k.removeprefix("_orig_mod."): g for k, g in result.grads.items()}
    assert grads_equal(grads, reference.grads)


def test_recomputed_dropout_replays_its_generator_state(tiny_gpt) -> None:
    model, inputs = tiny_gpt
    random_nodes: list[str] = []

    def partition(jg: JointGraph):
        fw, bw = rewrite_pass(jg, [])
        random_nodes.extend(str(n.target) for n in bw.graph.nodes if n.op == "call_function")
        return fw, bw

    compiled = torch.compile(model, backend=joint_backend(partition), fullgraph=True)
    with dynamo_settings():
        compiled(*inputs).backward()
    assert any("run_with_rng_state" in t for t in random_nodes)
