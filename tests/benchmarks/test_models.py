"""Tests for benchmarks/models.py: the benchmark models are reproducible training steps."""

from __future__ import annotations

import pytest
import torch

from benchmarks.baselines import checkpoint_first_k
from benchmarks.measure import grads_equal, measure_step
from benchmarks.models import BENCH_MODEL_NAMES, BenchModel, bench_gpt, bench_model, bench_unet


def _small_hf_gpt2() -> BenchModel:
    pytest.importorskip("transformers")
    from benchmarks.models import bench_hf_gpt2

    return bench_hf_gpt2(batch=2, seq=16, n_layer=3, n_embd=32, n_head=2)


def _layers_in_call_order(bench: BenchModel) -> list[torch.nn.Module]:
    order: list[torch.nn.Module] = []
    handles = [
        layer.register_forward_pre_hook(lambda module, args: order.append(module))
        for layer in bench.layers
    ]
    with torch.no_grad():
        bench.model(*bench.inputs)
    for handle in handles:
        handle.remove()
    return order


def test_gpt_layers_are_its_blocks_in_order() -> None:
    bench = bench_gpt(batch=2, seq=16, n_layer=3, n_embd=32)
    assert bench.name == "gpt" and bench.model.training
    assert bench.layers == list(bench.model.blocks)  # type: ignore[arg-type]
    assert _layers_in_call_order(bench) == bench.layers


def test_unet_layers_are_encoder_then_decoder_in_call_order() -> None:
    bench = bench_unet(batch=1, size=16, base_channels=4)
    assert len(bench.layers) == 7
    assert _layers_in_call_order(bench) == bench.layers


def test_hf_gpt2_is_a_loss_with_dropout_and_its_blocks_as_layers() -> None:
    bench = _small_hf_gpt2()
    assert bench.name == "hf-gpt2" and bench.model.training
    assert len(bench.layers) == 3 and _layers_in_call_order(bench) == bench.layers
    input_ids, labels = bench.inputs
    assert input_ids.shape == (2, 16) and torch.equal(input_ids, labels)
    torch.manual_seed(0)
    loss = bench.model(*bench.inputs)
    assert loss.shape == () and torch.isfinite(loss)
    torch.manual_seed(1)
    assert bench.model(*bench.inputs).item() != loss.item()  # dropout draws other masks


def test_hf_gpt2_every_layer_checkpoint_gives_bitwise_equal_grads() -> None:
    bench = _small_hf_gpt2()
    plain = measure_step(checkpoint_first_k(bench, 0), bench.inputs, seed=2)
    every = measure_step(checkpoint_first_k(bench, 3), bench.inputs, seed=2)
    assert plain.loss == every.loss
    assert grads_equal(plain.grads, every.grads)
    assert every.flops > plain.flops and every.peak_bytes < plain.peak_bytes


@pytest.mark.parametrize("name", ["gpt", "unet"])
def test_bench_models_are_reproducible(name: str) -> None:
    a, b = bench_model(name), bench_model(name)
    assert all(torch.equal(x, y) for x, y in zip(a.inputs, b.inputs))
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))


def test_hf_gpt2_is_reproducible() -> None:
    a, b = _small_hf_gpt2(), _small_hf_gpt2()
    assert all(torch.equal(x, y) for x, y in zip(a.inputs, b.inputs))
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))


def test_bench_model_names() -> None:
    assert BENCH_MODEL_NAMES == ("gpt", "unet", "hf-gpt2")
    with pytest.raises(ValueError, match="unknown benchmark model"):
        bench_model("resnet")
