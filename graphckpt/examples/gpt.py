"""A small GPT-style decoder with its loss inside ``forward``: the reference transformer.

Used by the CLI, the tests and the benchmarks as a model whose whole training step (embedding,
blocks, head, cross-entropy) is one module call. Pure torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GPT", "Block", "CausalSelfAttention", "GPTConfig", "gpt_example"]


@dataclass(frozen=True, kw_only=True)
class GPTConfig:
    """Sizes of a :class:`GPT`.

    Example:
        >>> GPTConfig(vocab_size=512, block_size=128, n_layer=2, n_head=4, n_embd=64).head_dim
        16
    """

    vocab_size: int = 512
    """Number of tokens in the vocabulary."""
    block_size: int = 128
    """Longest sequence the position embedding covers."""
    n_layer: int = 8
    """Number of transformer blocks."""
    n_head: int = 4
    """Attention heads per block; must divide ``n_embd``."""
    n_embd: int = 128
    """Width of the residual stream."""
    dropout: float = 0.1
    """Probability of the embedding, attention and residual dropouts in training."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"n_embd must be a multiple of n_head, got n_embd={self.n_embd}, "
                f"n_head={self.n_head}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.n_embd // self.n_head


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention through ``F.scaled_dot_product_attention``."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.proj = nn.Linear(config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, width = x.shape
        q, k, v = self.qkv(x).split(width, dim=2)
        # (B, T, C) -> (B, heads, T, head_dim)
        q, k, v = (t.view(batch, seq, self.n_head, -1).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        y = y.transpose(1, 2).contiguous().view(batch, seq, width)
        return self.resid_dropout(self.proj(y))


class _MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """One pre-LayerNorm transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = _MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """GPT-style decoder; ``forward(idx, targets)`` returns the mean cross-entropy loss.

    The LM head shares its weight with the token embedding (weight tying, as in GPT-2), so
    ``lm_head.weight`` and ``wte.weight`` are one parameter and ``named_parameters()`` lists it
    once, as ``wte.weight``. The repeated layers are ``self.blocks``.

    Example:
        >>> cfg = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)
        >>> model = GPT(cfg)
        >>> idx = torch.randint(0, 64, (2, 16))
        >>> model(idx, idx).shape
        torch.Size([])
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        self._init_weights()

    def _init_weights(self) -> None:
        # GPT-2 initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2 * layers)
        # so that the residual stream's variance does not grow with depth.
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for block in self.blocks:
            assert isinstance(block, Block)
            nn.init.normal_(block.attn.proj.weight, mean=0.0, std=residual_std)
            nn.init.normal_(block.mlp.proj.weight, mean=0.0, std=residual_std)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Return the loss over ``targets`` or, without targets, the logits.

        Args:
            idx: token ids of shape (batch, seq), ``seq <= block_size``.
            targets: next-token ids of the same shape, or None.

        Returns:
            The scalar mean cross-entropy if ``targets`` is given, else logits of shape
            (batch, seq, vocab_size).
        """
        seq = idx.shape[1]
        if seq > self.config.block_size:
            raise ValueError(
                f"sequence length {seq} exceeds block_size {self.config.block_size}; "
                f"build the model with a larger block_size"
            )
        pos = torch.arange(seq, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))


def gpt_example(
    batch: int = 4,
    seq: int = 128,
    *,
    n_layer: int = 8,
    n_embd: int = 128,
    n_head: int = 4,
    vocab_size: int = 512,
    dropout: float = 0.1,
    seed: int = 0,
) -> tuple[GPT, tuple[torch.Tensor, torch.Tensor]]:
    """Build a :class:`GPT` in training mode with random weights and a random batch.

    Weights and inputs depend only on ``seed``; the global RNG is left as it was. The defaults
    train one fp32 step in well under a second on a CPU; DESIGN.md's reference size is
    ``gpt_example(batch=8, seq=256, n_embd=256)``.

    Args:
        batch: sequences per batch.
        seq: tokens per sequence (also the model's ``block_size``).
        n_layer: number of transformer blocks.
        n_embd: width of the residual stream.
        n_head: attention heads per block.
        vocab_size: vocabulary size.
        dropout: dropout probability used in training.
        seed: seed for the weights and the inputs.

    Returns:
        ``(model, (idx, targets))``: call ``model(idx, targets)`` for the scalar loss.

    Example:
        >>> model, inputs = gpt_example(batch=2, seq=16, n_layer=2, n_embd=32)
        >>> model(*inputs).backward()
    """
    if batch <= 0:
        raise ValueError(f"batch must be > 0, got {batch}")
    config = GPTConfig(
        vocab_size=vocab_size,
        block_size=seq,
        n_layer=n_layer,
        n_head=n_head,
        n_embd=n_embd,
        dropout=dropout,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT(config)
    model.train()
    generator = torch.Generator().manual_seed(seed)
    # Targets are the inputs shifted by one token, as in language-model training.
    tokens = torch.randint(0, vocab_size, (batch, seq + 1), generator=generator)
    return model, (tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())
