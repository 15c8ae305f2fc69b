"""graphckpt: automatic activation checkpointing for PyTorch under an absolute memory budget.

Public API and the runtime that rewritten graphs call. The compile-time passes live in the
top-level ``passes`` package; importing graphckpt does not import them, initialise CUDA, or
change any torch configuration.
"""

from graphckpt.errors import GraphCkptError, InfeasibleBudgetError, TraceError
from graphckpt.memory import LiveTensorTracker, peak_memory

__all__ = [
    "GraphCkptError",
    "InfeasibleBudgetError",
    "LiveTensorTracker",
    "TraceError",
    "peak_memory",
]
