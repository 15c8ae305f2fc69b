"""Tests of graphckpt/backend.py: the torch.compile backend plans, rewrites and trains correctly."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.fx as fx
from torch import nn

import graphckpt
from benchmarks.compile_variants import compile_variant, graphckpt_min_feasible, measure_variant
from benchmarks.models import bench_hf_gpt2
from graphckpt.backend import GraphCkptBackend, _eager_only_reason
from graphckpt.examples import gpt_example
from graphckpt.graph_offload import GraphOffloader
from graphckpt.options import PlanConfig
from graphckpt.plan import Plan


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _grads(
    model: nn.Module, inputs, seed: int, backend=None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and parameter gradients of one step, compiled with ``backend`` when given."""
    torch.manual_seed(seed)
    loss = (model if backend is None else torch.compile(model, backend=backend))(*inputs)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("bad", [0, -1.0, math.nan, math.inf])
def test_bad_budget_values(bad) -> None:
    with pytest.raises(ValueError, match="budget_gb must be a positive finite"):
        graphckpt.backend(bad)


@pytest.mark.parametrize("bad", ["8", None, True])
def test_bad_budget_types(bad) -> None:
    with pytest.raises(TypeError, match="budget_gb must be a number"):
        graphckpt.backend(bad)


def test_bad_compiler_names_the_allowed_values() -> None:
    with pytest.raises(ValueError, match=r"'inductor', 'eager'.*got 'aot_eager'"):
        graphckpt.backend(1.0, compiler="aot_eager")  # type: ignore[arg-type]


def test_config_and_options_are_exclusive() -> None:
    with pytest.raises(TypeError, match="either config"):
        graphckpt.backend(1.0, config=PlanConfig(), allow_recompute=False)


def test_fused_pointwise_pricing_follows_the_compiler() -> None:
    assert graphckpt.backend(1.0).config.fused_pointwise is True
    assert graphckpt.backend(1.0, compiler="eager").config.fused_pointwise is False
    assert graphckpt.backend(1.0, fused_pointwise=False).config.fused_pointwise is False
    with pytest.raises(TypeError, match="fused_pointwise must be a bool or None"):
        PlanConfig(fused_pointwise="yes")  # type: ignore[arg-type]


def test_inductor_recomputes_and_matches_eager_grads(tiny_gpt) -> None:
    model, inputs = tiny_gpt
    functorch_cfg = torch._functorch.config
    inductor_cfg = torch._inductor.config
    before = (
        functorch_cfg.activation_memory_budget,
        functorch_cfg.enable_autograd_cache,
        inductor_cfg.fallback_random,
    )
    # The smallest feasible peak of the graph inductor sees (decomposed), from a budget too small.
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed) as failed:
        torch.compile(copy.deepcopy(model), backend=graphckpt.backend(1e-6))(*inputs)
    inner = failed.value.inner_exception
    assert isinstance(inner, graphckpt.InfeasibleBudgetError)
    torch._dynamo.reset()
    budget_bytes = int(inner.min_feasible_bytes * 1.02)

    seen: list[Plan] = []
    be = graphckpt.backend(budget_bytes / 2**30, on_plan=seen.append)
    compiled_model = copy.deepcopy(model)
    ref_loss, ref_grads = _grads(model, inputs, seed=3)
    loss, grads = _grads(compiled_model, inputs, seed=3, backend=be)

    assert len(be.plans) == 1 and seen == be.plans
    plan = be.plans[0]
    assert plan.predicted_peak_bytes <= budget_bytes
    assert sum(layer.num_recomputed for layer in plan.layers) > 0
    assert any(d.action == "recompute" for d in plan.tensors)
    assert Plan.from_json(plan.to_json()) == plan and "total" in plan.table()
    torch.testing.assert_close(loss, ref_loss)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, msg=name)
    after = (
        functorch_cfg.activation_memory_budget,
        functorch_cfg.enable_autograd_cache,
        inductor_cfg.fallback_random,
    )
    assert after == before


def test_inductor_rng_regenerates_masks_from_kept_seeds(tiny_gpt) -> None:
    """exact_rng=False: inductor draws its own random numbers from seeds. The plans keep the
    seeds, never a mask (backward draws it again from its seed); a tight plan and a loose plan
    then give equal gradients from one seed (both draw the same masks in forward and backward),
    equal to a plain torch.compile's: the seeds are drawn as inductor draws them."""
    model, inputs = tiny_gpt
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed) as failed:
        torch.compile(copy.deepcopy(model), backend=graphckpt.backend(1e-6, exact_rng=False))(
            *inputs
        )
    least = failed.value.inner_exception.min_feasible_bytes
    torch._dynamo.reset()
    tight = graphckpt.backend(least * 1.02 / 2**30, exact_rng=False)
    assert tight.config.recompute_random is False
    loss, grads = _grads(copy.deepcopy(model), inputs, seed=5, backend=tight)
    torch._dynamo.reset()
    loose = graphckpt.backend(1.0, exact_rng=False)
    ref_loss, ref_grads = _grads(copy.deepcopy(model), inputs, seed=5, backend=loose)
    assert tight.plans[0].recompute_flops > 0
    for plan in (tight.plans[0], loose.plans[0]):
        kept = plan.saved_nodes()
        assert any(name.startswith("inductor_lookup_seed") for name in kept)
        assert not any(name.startswith(("inductor_random", "gt")) for name in kept)
    torch.testing.assert_close(loss, ref_loss)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, msg=name)
    torch._dynamo.reset()
    torch_loss, torch_grads = _grads(copy.deepcopy(model), inputs, seed=5, backend="inductor")
    torch.testing.assert_close(loss, torch_loss)
    torch.testing.assert_close(grads, torch_grads)
    # Its masks are inductor's, not eager's: the loss differs from the eager model's.
    eager_loss, _ = _grads(copy.deepcopy(model), inputs, seed=5)
    assert not torch.equal(loss, eager_loss)


def test_inductor_rng_inference_draws_torch_compiles_masks(tiny_gpt) -> None:
    """A graph with no backward is not planned; with exact_rng=False its random ops still
    become inductor's seeded draws, so it computes what a plain torch.compile computes."""
    model, inputs = tiny_gpt
    be = graphckpt.backend(1.0, exact_rng=False)
    with torch.no_grad():
        torch.manual_seed(3)
        ours = torch.compile(copy.deepcopy(model), backend=be)(*inputs)
        torch._dynamo.reset()
        torch.manual_seed(3)
        theirs = torch.compile(copy.deepcopy(model), backend="inductor")(*inputs)
        torch.manual_seed(3)
        eager = copy.deepcopy(model)(*inputs)
    assert be.plans == []
    torch.testing.assert_close(ours, theirs)
    assert not torch.equal(ours, eager)


def test_inductor_rng_option_is_validated() -> None:
    with pytest.raises(TypeError, match="exact_rng must be a bool"):
        graphckpt.backend(1.0, exact_rng="no")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs compiler='inductor'"):
        graphckpt.backend(1.0, compiler="eager", exact_rng=False)


def test_inductor_keeps_dropout_draws_in_program_order() -> None:
    """A keep-all plan: inductor's peak-memory reordering used to move the split dropout draws
    (a fresh buffer each, filled by ``bernoulli_``), so masks and gradients differed from eager."""
    model, inputs = gpt_example(batch=2, seq=32, n_layer=2, n_embd=32)
    compiled_model = copy.deepcopy(model)
    ref_loss, ref_grads = _grads(model, inputs, seed=0)
    loss, grads = _grads(compiled_model, inputs, seed=0, backend=graphckpt.backend(1024.0))
    torch.testing.assert_close(loss, ref_loss)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, msg=name)
    assert torch._inductor.config.reorder_for_peak_memory  # restored after the compile


class _UnreadDropout(nn.Module):
    """A dropout whose output nothing reads: eager draws its mask all the same."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 16)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.lin(x))
        self.drop(h)
        return self.drop(h).sum()


@pytest.mark.parametrize("compiler", ["eager", "inductor"])
def test_unread_dropout_still_draws(compiler) -> None:
    """Regression: AOTAutograd's dead-code elimination (and, with inductor, its scheduler)
    dropped the unread dropout, so the second mask, the gradients and the generator state after
    the step differed from eager's."""
    torch.manual_seed(0)
    model, inputs = _UnreadDropout(), (torch.randn(8, 16),)
    ref_loss, ref_grads = _grads(copy.deepcopy(model), inputs, seed=3)
    ref_state = torch.get_rng_state()
    loss, grads = _grads(model, inputs, seed=3, backend=graphckpt.backend(1.0, compiler=compiler))
    assert torch.equal(torch.get_rng_state(), ref_state)
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(grads, ref_grads)
    assert not torch._inductor.config.fallback_random  # restored after the compile


class _TwoHalves(nn.Module):
    """Two MLP halves with dropout and a deliberate Dynamo graph break between them."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Dropout(0.1), nn.Linear(64, 32))
        self.second = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Dropout(0.1), nn.Linear(64, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.first(x)
        torch._dynamo.graph_break()
        return self.second(h).pow(2).mean()


def test_graph_break_divides_the_budget() -> None:
    torch.manual_seed(0)
    model, inputs = _TwoHalves(), (torch.randn(8, 32, requires_grad=True),)
    budget_gb = 0.01
    be = graphckpt.backend(budget_gb, compiler="eager")
    compiled_model = copy.deepcopy(model)
    ref_loss, ref_grads = _grads(model, inputs, seed=4)
    loss, grads = _grads(compiled_model, inputs, seed=4, backend=be)

    assert [p.graph_index for p in be.plans] == [0, 1]
    total = int(budget_gb * 2**30)
    assert be.plans[0].budget_bytes == total
    assert be.plans[0].kept_bytes > 0
    assert be.plans[1].budget_bytes == total - be.plans[0].kept_bytes
    assert be.live_kept_bytes() == 0  # both backwards ran
    assert torch.equal(loss, ref_loss)
    for name, grad in ref_grads.items():
        assert torch.equal(grads[name], grad), name


def test_offloading_graph_runs_eagerly_with_a_warning() -> None:
    offloader = GraphOffloader()
    graph = fx.Graph()
    x = graph.placeholder("x")
    host = graph.call_function(offloader.offload, (x,))
    graph.output((graph.call_function(torch.ops.aten.mul.Tensor, (host, 2)),))
    gm = fx.GraphModule(nn.Module(), graph)
    assert _eager_only_reason(gm) is not None
    be = GraphCkptBackend(1 << 30, "inductor", PlanConfig(), None)
    with pytest.warns(UserWarning, match=r"instead of compiling it with inductor.*offload"):
        run = be._compile_graph(gm, [torch.ones(3)], "forward")
    assert torch.equal(run([torch.ones(3)])[0], torch.full((3,), 2.0))


def test_plain_graph_is_inductor_compatible() -> None:
    graph = fx.Graph()
    x = graph.placeholder("x")
    graph.output(graph.call_function(torch.ops.aten.mul.Tensor, (x, 2)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _eager_only_reason(fx.GraphModule(nn.Module(), graph)) is None


def _forward_code(model: nn.Module, inputs, budget_gb: float = 1.0) -> str:
    """The ``call`` of the forward graph inductor generates for one training step."""
    from torch._inductor.utils import run_and_get_code

    be = graphckpt.backend(budget_gb=budget_gb)
    _, codes = run_and_get_code(lambda: torch.compile(model, backend=be)(*inputs).backward())
    forward = codes[0]
    return forward[forward.index("def call(") :]


def test_inductor_reuses_freed_buffers_in_the_backends_graphs(monkeypatch) -> None:
    """With reorder_for_peak_memory off, inductor reuses buffers only when told their sizes
    (passes/inductor_reuse.py): the backend must compile under that pass."""
    import contextlib

    import passes.inductor_reuse

    model, inputs = gpt_example(n_layer=4, n_embd=32, seq=16, batch=2)
    with_pass = _forward_code(model, inputs)
    torch._dynamo.reset()
    monkeypatch.setattr(passes.inductor_reuse, "planning_info_for_reuse", contextlib.nullcontext)
    without = _forward_code(model, inputs)
    assert with_pass.count("empty_strided") < without.count("empty_strided")


def test_exact_rng_forward_runs_each_dropout_as_one_native_dropout(monkeypatch) -> None:
    """With exact_rng, a dropout the forward draws and applies itself compiles as one
    native_dropout fallback, not bernoulli plus multiplies inlined into every reader
    (passes/inductor_dropout.py; 15% of Hugging Face GPT-2's step)."""
    import passes.inductor_dropout

    model, inputs = gpt_example(n_layer=2, n_embd=32, seq=16, batch=2)
    # Near the smallest feasible budget the plan keeps each dropout's 1-byte mask, and the forward
    # draws and applies every dropout itself (with room to spare it may keep a draw instead).
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed) as failed:
        torch.compile(model, backend=graphckpt.backend(1e-6))(*inputs)
    budget_gb = failed.value.inner_exception.min_feasible_bytes * 1.02 / 2**30
    torch._dynamo.reset()
    merged = _forward_code(model, inputs, budget_gb)
    torch._dynamo.reset()
    monkeypatch.setattr(passes.inductor_dropout, "merge_dropout", lambda gm: 0)
    split = _forward_code(model, inputs, budget_gb)
    assert "aten.native_dropout.default(" in merged and "bernoulli_" not in merged
    assert "aten.native_dropout.default(" not in split and "bernoulli_" in split


def test_inductor_compiles_a_cnn_in_a_fresh_process() -> None:
    """Inductor's max_pool2d decomposition reads torch._inductor.lowering, which nothing has
    imported in a fresh process until inductor compiles: the backend imports it itself."""
    import subprocess
    import sys

    code = (
        "import torch, graphckpt\n"
        "from graphckpt.examples import unet_example\n"
        "m, inputs = unet_example(batch=1, size=16, base_channels=4, depth=2)\n"
        "be = graphckpt.backend(budget_gb=1.0)\n"
        "torch.compile(m, backend=be)(*inputs).backward()\n"
        "assert be.plans and all(p.grad is not None for p in m.parameters())\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


def test_inductor_rng_tightest_plan_fits_its_budget_on_hf_gpt2() -> None:
    """At its smallest feasible budget this 4-layer Hugging Face GPT-2 measured 29.9 MiB against
    a 26.5 MiB budget: inductor fused two layers' recomputed softmaxes (both read the causal
    mask), so a later layer's recompute ran early. The segment fence (passes/fusion_fence.py)
    keeps each recompute group where the plan put it."""
    pytest.importorskip("transformers")
    bench = bench_hf_gpt2(batch=8, seq=128, n_layer=4, n_embd=128)
    budget = int(graphckpt_min_feasible(bench, exact_rng=False) * 1.001)
    be = graphckpt.backend(budget_gb=budget / 2**30, exact_rng=False)
    variant = compile_variant("tightest", bench, be)
    measure_variant(variant, bench, None, seed=0)
    assert be.plans[0].recompute_flops > 0
    assert variant.peak_bytes <= budget
