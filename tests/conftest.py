"""Shared fixtures: tiny models that plan and train in well under a second."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from graphckpt.examples import gpt_example


@pytest.fixture
def tiny_gpt() -> tuple[torch.nn.Module, tuple[Any, ...]]:
    """A 2-layer GPT with dropout active (d=32, T=16, batch 2)."""
    return gpt_example(batch=2, seq=16, n_layer=2, n_embd=32, n_head=2, vocab_size=64)
