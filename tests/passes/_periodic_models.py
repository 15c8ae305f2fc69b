"""Small models with a stack of identical layers, shared by the period/synthesis/replicate tests."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from graphckpt.examples import gpt_example
from passes.trace import JointGraph, capture_joint_graphs


class ResidualMLP(nn.Module):
    """One residual block without dropout: ``x + fc2(gelu(fc1(ln(x))))``."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.ln(x))))


class Trunk(nn.Module):
    """Holds the stack one level down, as third-party models do (``transformer.h``)."""

    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(ResidualMLP(width) for _ in range(depth))


class DeepMLP(nn.Module):
    """Embedding-free residual MLP stack at ``trunk.layers``; ``scale_by_depth`` multiplies each
    layer's output by its index + 1 in the parent's loop, which no period can express."""

    def __init__(self, width: int = 16, depth: int = 8, scale_by_depth: bool = False) -> None:
        super().__init__()
        self.inp = nn.Linear(width, width)
        self.trunk = Trunk(width, depth)
        self.out = nn.Linear(width, 1)
        self.scale_by_depth = scale_by_depth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for i, layer in enumerate(self.trunk.layers):
            x = layer(x) * (i + 1) if self.scale_by_depth else layer(x)
        return self.out(x).square().mean()


def gpt(n_layer: int, dropout: float = 0.1) -> tuple[nn.Module, tuple[Any, ...]]:
    """A small GPT: d=32, T=16, batch 2."""
    return gpt_example(
        batch=2, seq=16, n_layer=n_layer, n_embd=32, n_head=2, vocab_size=64, dropout=dropout
    )


def joint(model: nn.Module, inputs: tuple[Any, ...]) -> JointGraph:
    """The model's traced joint graph."""
    return capture_joint_graphs(model, inputs)[0]
