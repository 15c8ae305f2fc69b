"""Tests for graphckpt/examples: shapes, finite losses, backward, seeded determinism."""

from __future__ import annotations

import pytest
import torch

from graphckpt.examples import GPT, GPTConfig, UNet, gpt_example, unet_example
from graphckpt.examples.gpt import Block
from graphckpt.examples.unet import DecoderStage, EncoderStage


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _seeded_step(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], seed: int) -> float:
    for p in model.parameters():
        p.grad = None
    torch.manual_seed(seed)
    loss = model(*inputs)
    loss.backward()
    return loss.item()


def test_gpt_shapes_loss_and_backward() -> None:
    model, (idx, targets) = gpt_example(batch=3, seq=16, n_layer=2, n_embd=32, vocab_size=50)
    assert isinstance(model, GPT) and model.training
    assert idx.shape == targets.shape == (3, 16) and idx.dtype == torch.int64
    assert torch.equal(idx[:, 1:], targets[:, :-1])  # targets are the next tokens
    assert len(model.blocks) == 2 and all(isinstance(b, Block) for b in model.blocks)
    assert model(idx).shape == (3, 16, 50)
    loss = model(idx, targets)
    assert loss.shape == () and torch.isfinite(loss)
    # Random init predicts near-uniformly: the loss is close to log(vocab).
    assert abs(loss.item() - torch.log(torch.tensor(50.0)).item()) < 0.5
    loss.backward()
    grads = _grads(model)
    assert set(grads) == {n for n, _ in model.named_parameters()}
    assert all(torch.isfinite(g).all() for g in grads.values())


def test_gpt_head_is_tied_to_the_embedding() -> None:
    model, _ = gpt_example(batch=1, seq=8, n_layer=1, n_embd=16)
    assert model.lm_head.weight is model.wte.weight
    assert "lm_head.weight" not in dict(model.named_parameters())


def test_gpt_accepts_the_design_size() -> None:
    model, (idx, targets) = gpt_example(batch=8, seq=256, n_layer=8, n_embd=256)
    assert len(model.blocks) == 8 and model.config.n_embd == 256
    assert idx.shape == (8, 256)
    with torch.no_grad():
        assert torch.isfinite(model(idx, targets))


def test_gpt_is_deterministic_given_seeds() -> None:
    a, inputs_a = gpt_example(batch=2, seq=16, n_layer=2, n_embd=32, seed=3)
    b, inputs_b = gpt_example(batch=2, seq=16, n_layer=2, n_embd=32, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(inputs_a, inputs_b))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert _seeded_step(a, inputs_a, seed=7) == _seeded_step(b, inputs_b, seed=7)
    grads_a, grads_b = _grads(a), _grads(b)
    assert all(torch.equal(grads_a[n], grads_b[n]) for n in grads_a)
    # Dropout is active: another seed draws other masks and gives another loss.
    assert _seeded_step(a, inputs_a, seed=8) != _seeded_step(a, inputs_a, seed=7)
    other, _ = gpt_example(batch=2, seq=16, n_layer=2, n_embd=32, seed=4)
    assert not torch.equal(other.wte.weight, a.wte.weight)


def test_example_factories_leave_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    gpt_example(batch=1, seq=8, n_layer=1, n_embd=16)
    unet_example(batch=1, size=16, base_channels=4, depth=3)
    assert torch.equal(torch.rand(3), expected)


def test_gpt_config_is_validated() -> None:
    with pytest.raises(ValueError, match="multiple of n_head"):
        GPTConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="dropout"):
        GPTConfig(dropout=1.0)
    model, (idx, _) = gpt_example(batch=1, seq=8, n_layer=1, n_embd=16)
    with pytest.raises(ValueError, match="block_size"):
        model(torch.cat([idx, idx], dim=1))


def test_unet_shapes_loss_and_backward() -> None:
    model, (x, target) = unet_example(batch=2, size=32, base_channels=4, depth=4)
    assert isinstance(model, UNet) and model.training
    assert x.shape == target.shape == (2, 3, 32, 32)
    assert len(model.encoder) == 4 and len(model.decoder) == 3
    assert all(isinstance(s, EncoderStage) for s in model.encoder)
    assert all(isinstance(s, DecoderStage) for s in model.decoder)
    assert model(x).shape == (2, 3, 32, 32)
    loss = model(x, target)
    assert loss.shape == () and torch.isfinite(loss)
    loss.backward()
    grads = _grads(model)
    assert set(grads) == {n for n, _ in model.named_parameters()}
    assert all(torch.isfinite(g).all() for g in grads.values())


def test_unet_decoder_consumes_the_encoder_skips() -> None:
    model, (x, _) = unet_example(batch=1, size=16, base_channels=4, depth=3)
    shapes: dict[str, list[tuple[int, ...]]] = {}

    def record(name: str):  # type: ignore[no-untyped-def]
        def hook(module, args, out):  # type: ignore[no-untyped-def]
            shapes[name] = [tuple(a.shape) for a in args] + [tuple(out.shape)]

        return hook

    for i, stage in enumerate([*model.encoder, *model.decoder]):
        stage.register_forward_hook(record(str(i)))
    model(x)
    # Encoder: 16x16x4 -> 8x8x8 -> 4x4x16; decoder stage j takes the matching skip.
    assert shapes["0"][-1] == (1, 4, 16, 16) and shapes["2"][-1] == (1, 16, 4, 4)
    assert shapes["3"] == [(1, 16, 4, 4), (1, 8, 8, 8), (1, 8, 8, 8)]
    assert shapes["4"] == [(1, 8, 8, 8), (1, 4, 16, 16), (1, 4, 16, 16)]


def test_unet_is_deterministic_given_seeds() -> None:
    a, inputs_a = unet_example(batch=2, size=16, base_channels=4, depth=3, seed=1)
    b, inputs_b = unet_example(batch=2, size=16, base_channels=4, depth=3, seed=1)
    assert all(torch.equal(x, y) for x, y in zip(inputs_a, inputs_b))
    assert _seeded_step(a, inputs_a, seed=0) == _seeded_step(b, inputs_b, seed=0)
    grads_a, grads_b = _grads(a), _grads(b)
    assert all(torch.equal(grads_a[n], grads_b[n]) for n in grads_a)


def test_unet_rejects_sizes_it_cannot_halve() -> None:
    with pytest.raises(ValueError, match="divisible"):
        unet_example(batch=1, size=20, depth=4)
    model, _ = unet_example(batch=1, size=16, base_channels=4, depth=3)
    with pytest.raises(ValueError, match="divisible"):
        model(torch.randn(1, 3, 18, 18))
    with pytest.raises(ValueError, match="depth"):
        UNet(depth=1)
