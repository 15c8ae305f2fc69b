"""Tests for benchmarks/baselines.py: layer checkpointing keeps gradients, trades FLOPs."""

from __future__ import annotations

import copy

import pytest
import torch

from benchmarks.baselines import checkpoint_first_k
from benchmarks.measure import grads_equal, measure_step
from benchmarks.models import BenchModel, bench_gpt, bench_unet
from graphckpt.flops import count_flops


def _small_gpt() -> BenchModel:
    return bench_gpt(batch=2, seq=32, n_layer=4, n_embd=32)


def _small_unet() -> BenchModel:
    return bench_unet(batch=2, size=16, base_channels=4)


@pytest.mark.parametrize("make_bench", [_small_gpt, _small_unet], ids=["gpt", "unet"])
def test_every_layer_checkpoint_gives_bitwise_equal_grads(make_bench) -> None:  # type: ignore[no-untyped-def]
    bench = make_bench()
    plain = measure_step(checkpoint_first_k(bench, 0), bench.inputs, seed=5)
    every = measure_step(checkpoint_first_k(bench, len(bench.layers)), bench.inputs, seed=5)
    assert plain.loss == every.loss
    assert grads_equal(plain.grads, every.grads)


def test_gpt_dropout_is_active_so_the_equality_is_not_vacuous() -> None:
    bench = _small_gpt()
    model = checkpoint_first_k(bench, len(bench.layers))
    assert model.training
    assert not grads_equal(
        measure_step(model, bench.inputs, seed=5).grads,
        measure_step(model, bench.inputs, seed=6).grads,
    )


def test_every_layer_checkpoint_lowers_the_peak() -> None:
    bench = _small_gpt()
    plain = measure_step(checkpoint_first_k(bench, 0), bench.inputs, seed=0)
    every = measure_step(checkpoint_first_k(bench, len(bench.layers)), bench.inputs, seed=0)
    assert every.peak_bytes < 0.6 * plain.peak_bytes


def test_checkpointing_k_layers_adds_exactly_k_block_forwards() -> None:
    bench = _small_gpt()
    block = bench.layers[0]
    x = torch.randn(2, 32, 32)
    # In backward the block is recomputed in training mode with grad enabled, as here.
    block_forward = count_flops(lambda: block(x))
    assert block_forward > 0
    base = measure_step(checkpoint_first_k(bench, 0), bench.inputs, seed=0).flops
    for k in (1, 3, 4):
        flops = measure_step(checkpoint_first_k(bench, k), bench.inputs, seed=0).flops
        assert flops == base + k * block_forward


def test_checkpoint_first_k_does_not_touch_the_original() -> None:
    bench = _small_gpt()
    before = {n: p.detach().clone() for n, p in bench.model.named_parameters()}
    model = checkpoint_first_k(bench, 2)
    assert model is not bench.model
    assert all("forward" not in layer.__dict__ for layer in bench.layers)
    model(*bench.inputs).backward()
    assert all(p.grad is None for p in bench.model.parameters())
    assert all(torch.equal(before[n], p) for n, p in bench.model.named_parameters())
    assert [n for n, _ in model.named_parameters()] == list(before)


def test_only_the_first_k_layers_are_wrapped_and_copies_stay_independent() -> None:
    bench = _small_gpt()
    model = checkpoint_first_k(bench, 2)
    blocks = list(model.blocks)  # type: ignore[arg-type]
    assert ["forward" in b.__dict__ for b in blocks] == [True, True, False, False]
    # The wrapper is bound to its own module, also after another deepcopy.
    again = copy.deepcopy(model)
    for owner in (model, again):
        first = owner.blocks[0]  # type: ignore[index]
        assert first.forward.args[0].__self__ is first


def test_invalid_k_and_foreign_layers_are_rejected() -> None:
    bench = _small_gpt()
    with pytest.raises(ValueError, match="between 0"):
        checkpoint_first_k(bench, 5)
    with pytest.raises(ValueError, match="between 0"):
        checkpoint_first_k(bench, -1)
    foreign = BenchModel("gpt", bench.model, bench.inputs, [torch.nn.Linear(2, 2)])
    with pytest.raises(ValueError, match="not a submodule"):
        checkpoint_first_k(foreign, 1)


@pytest.mark.parametrize("make_bench", [_small_gpt, _small_unet], ids=["gpt", "unet"])
def test_deepspeed_style_every_layer_recomputes_with_equal_grads(make_bench) -> None:  # type: ignore[no-untyped-def]
    from benchmarks.baselines import checkpoint_every_layer_deepspeed

    bench = make_bench()
    plain = measure_step(checkpoint_first_k(bench, 0), bench.inputs, seed=5)
    every = measure_step(checkpoint_first_k(bench, len(bench.layers)), bench.inputs, seed=5)
    ds = measure_step(checkpoint_every_layer_deepspeed(bench), bench.inputs, seed=5)
    assert ds.loss == plain.loss
    assert grads_equal(plain.grads, ds.grads)
    assert ds.flops == every.flops > plain.flops  # every layer's forward runs twice
