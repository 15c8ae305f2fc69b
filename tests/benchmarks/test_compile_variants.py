"""Tests of benchmarks/compile_variants.py: torch's comparator, on its generator or eager's."""

from __future__ import annotations

import torch

from benchmarks.compile_variants import compile_variant, measure_variant, torch_inductor_backend
from benchmarks.models import bench_gpt


def test_torch_on_eager_rng_reproduces_the_eager_models_dropout_gradients() -> None:
    """With ``eager_rng`` torch's keep-all compile draws eager's masks, so its gradients are the
    eager model's; on inductor's generator they are not (the test would pass vacuously if the
    model drew no dropout mask)."""
    bench = bench_gpt(batch=2, seq=16, n_layer=1, n_embd=32)
    eager = compile_variant("eager", bench, None)
    measure_variant(eager, bench, None, seed=0)
    with torch._dynamo.config.patch(recompile_limit=64):
        on_eager_rng = compile_variant("t", bench, torch_inductor_backend(1.0, eager_rng=True))
        measure_variant(on_eager_rng, bench, eager.grads, seed=0)
        on_inductor_rng = compile_variant("t", bench, torch_inductor_backend(1.0))
        measure_variant(on_inductor_rng, bench, eager.grads, seed=0)
    torch._dynamo.reset()
    assert on_eager_rng.grads_match, on_eager_rng.grads_max_abs_diff
    assert on_inductor_rng.grads_match is False
    # The compile-time config patch does not outlive the compile.
    assert torch._inductor.config.fallback_random is False
