"""graphckpt: automatic activation checkpointing for PyTorch under an absolute memory budget.

Public API and the runtime that rewritten graphs call. The compile-time passes live in the
top-level ``passes`` package; importing graphckpt does not import them, initialise CUDA, or
change any torch configuration.
"""

from graphckpt.api import CheckpointedModule, auto_checkpoint, plan
from graphckpt.backend import GraphCkptBackend, backend
from graphckpt.checkpoint import Checkpointer, checkpoint, non_reentrant_checkpoint
from graphckpt.config import CheckpointConfig
from graphckpt.errors import (
    GraphCkptError,
    InfeasibleBudgetError,
    PlanAgreementTimeoutError,
    PlanMismatchError,
    TraceError,
    UnsupportedWrappingError,
)
from graphckpt.flops import count_flops, flop_formulas
from graphckpt.memory import LiveTensorTracker, peak_memory
from graphckpt.options import DeviceSpec, PlanConfig
from graphckpt.plan import LayerPlan, Plan, TensorDecision
from graphckpt.rng import RNGStatesTracker, model_parallel_manual_seed

__all__ = [
    "CheckpointConfig",
    "CheckpointedModule",
    "Checkpointer",
    "DeviceSpec",
    "GraphCkptBackend",
    "GraphCkptError",
    "InfeasibleBudgetError",
    "LayerPlan",
    "LiveTensorTracker",
    "Plan",
    "PlanAgreementTimeoutError",
    "PlanConfig",
    "PlanMismatchError",
    "RNGStatesTracker",
    "TensorDecision",
    "TraceError",
    "UnsupportedWrappingError",
    "auto_checkpoint",
    "backend",
    "checkpoint",
    "count_flops",
    "flop_formulas",
    "model_parallel_manual_seed",
    "non_reentrant_checkpoint",
    "peak_memory",
    "plan",
]
