"""The benchmark models: each a training step's worth of model, inputs and repeated layers.

Every factory returns a :class:`BenchModel` whose ``model(*inputs)`` is the scalar loss, built
from fixed seeds (same weights and inputs on every call) without downloading anything.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from graphckpt.examples import gpt_example, unet_example

__all__ = [
    "BENCH_MODEL_NAMES",
    "BenchModel",
    "HFCausalLMLoss",
    "bench_gpt",
    "bench_hf_gpt2",
    "bench_model",
    "bench_unet",
]


@dataclass(frozen=True)
class BenchModel:
    """A model to benchmark, in training mode.

    ``model(*inputs)`` returns the scalar loss; ``layers`` are the model's repeated layers in
    execution order, the modules a user would wrap with ``torch.utils.checkpoint``.
    """

    name: str
    """Short name used in result tables."""
    model: nn.Module
    """The model; its forward computes the loss."""
    inputs: tuple[torch.Tensor, ...]
    """Positional inputs of one step."""
    layers: list[nn.Module]
    """Repeated layers of ``model``, in the order forward runs them."""


def bench_gpt(*, batch: int = 8, seq: int = 128, n_layer: int = 8, n_embd: int = 128) -> BenchModel:
    """The example GPT with dropout 0.1; its layers are ``model.blocks``.

    Example:
        >>> bench = bench_gpt(batch=2, seq=16, n_layer=2, n_embd=32)
        >>> len(bench.layers)
        2
    """
    model, inputs = gpt_example(
        batch=batch, seq=seq, n_layer=n_layer, n_embd=n_embd, dropout=0.1, seed=0
    )
    return BenchModel("gpt", model, inputs, list(model.blocks))


def bench_unet(*, batch: int = 8, size: int = 64, base_channels: int = 16) -> BenchModel:
    """The example U-Net of depth 4; its layers are the encoder then the decoder stages.

    Example:
        >>> len(bench_unet(batch=1, size=16, base_channels=4).layers)
        7
    """
    model, inputs = unet_example(batch=batch, size=size, base_channels=base_channels, depth=4)
    return BenchModel("unet", model, inputs, [*model.encoder, *model.decoder])


class HFCausalLMLoss(nn.Module):
    """Wraps a Hugging Face causal LM so that ``forward(input_ids, labels)`` is the loss.

    The cache is off (``use_cache=False``): a training step has no use for it, and cache
    objects in the outputs stop graph capture.
    """

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids, labels=labels, use_cache=False).loss


def bench_hf_gpt2(
    *,
    batch: int = 8,
    seq: int = 128,
    n_layer: int = 8,
    n_embd: int = 128,
    n_head: int = 4,
    vocab_size: int = 1000,
    attn_implementation: str = "sdpa",
) -> BenchModel:
    """``transformers.GPT2LMHeadModel`` from a config, random weights, dropouts 0.1.

    No download: only the config class is used. The labels are the input ids; the model
    shifts them internally. Its layers are ``lm.transformer.h``.

    Example:
        >>> bench = bench_hf_gpt2(batch=1, seq=16, n_layer=2, n_embd=32, n_head=2)
        >>> bench.model(*bench.inputs).shape
        torch.Size([])
    """
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError as e:
        raise ImportError(
            "bench_hf_gpt2 needs transformers: pip install 'transformers>=4.45'"
        ) from e
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=seq,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        attn_pdrop=0.1,
        resid_pdrop=0.1,
        embd_pdrop=0.1,
        use_cache=False,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation=attn_implementation,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        lm = GPT2LMHeadModel(config)
    # transformers infers the loss from the class name, which "GPT2LMHeadModel" does not
    # match; it then warns and falls back to this same causal-LM loss.
    lm.loss_type = "ForCausalLM"
    model = HFCausalLMLoss(lm).train()
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab_size, (batch, seq), generator=generator)
    return BenchModel("hf-gpt2", model, (input_ids, input_ids.clone()), list(lm.transformer.h))


BENCH_MODEL_NAMES: tuple[str, ...] = ("gpt", "unet", "hf-gpt2")
"""Names of the benchmark models, in the order result tables list them."""


def bench_model(name: str) -> BenchModel:
    """Build the benchmark model called ``name`` at its default size.

    Args:
        name: one of ``BENCH_MODEL_NAMES``: "gpt", "unet", "hf-gpt2".

    Returns:
        A fresh :class:`BenchModel` (same weights and inputs on every call).

    Example:
        >>> bench_model("gpt").name
        'gpt'
    """
    factories: dict[str, Callable[[], BenchModel]] = {
        "gpt": bench_gpt,
        "unet": bench_unet,
        "hf-gpt2": bench_hf_gpt2,
    }
    if name not in factories:
        raise ValueError(f"unknown benchmark model {name!r}; choose one of {BENCH_MODEL_NAMES}")
    return factories[name]()
