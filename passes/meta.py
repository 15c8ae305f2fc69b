"""Names of the ``node.meta`` keys graphckpt reads, and small typed helpers around them.

Every pass reads node metadata through this module. Upstream keys are reused: ``val`` (the fake
tensor AOTAutograd records), ``nn_module_stack`` (Dynamo's module path), ``partitioner_tag``
(AOTAutograd's forward/backward tag).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

__all__ = [
    "NN_MODULE_STACK",
    "PARTITIONER_TAG",
    "RECOMPUTED",
    "SEGMENT",
    "VAL",
    "is_backward",
    "is_forward",
    "is_random",
    "is_seeded_draw",
    "is_view",
    "module_paths",
    "must_keep",
    "node_val",
    "tensor_bytes",
]

VAL = "val"
NN_MODULE_STACK = "nn_module_stack"
PARTITIONER_TAG = "partitioner_tag"
RECOMPUTED = "graphckpt_recomputed"
"""graphckpt's own key: True on the backward copies the rewriter makes of recomputed nodes."""
SEGMENT = "graphckpt_segment"
"""graphckpt's own key: the recompute segment (0, 1, ...) of a backward node
(``passes/fusion_fence.py``)."""


def node_val(node: fx.Node) -> Any:
    """The example value (usually a FakeTensor, or a tuple of them) recorded for ``node``."""
    return node.meta.get(VAL)


def is_forward(node: fx.Node) -> bool:
    """True for nodes of the joint graph that run in forward (AOTAutograd's tag)."""
    return node.meta.get(PARTITIONER_TAG) == "is_forward"


def is_backward(node: fx.Node) -> bool:
    """True for nodes of the joint graph that run in backward (AOTAutograd's tag)."""
    return node.meta.get(PARTITIONER_TAG) == "is_backward"


def is_random(node: fx.Node) -> bool:
    """True when ``node`` draws from a random generator (dropout, rand, bernoulli, ...)."""
    target = node.target
    return isinstance(target, torch._ops.OpOverload) and (
        torch.Tag.nondeterministic_seeded in target.tags
    )


def is_seeded_draw(node: fx.Node) -> bool:
    """True for inductor's seeded draw (``prims.inductor_random``): a pure function of its
    seed and shape, so recomputing it gives the same numbers (``passes/inductor_rng.py``)."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return False
    return node.target.name() == "prims::inductor_random"


# Ops whose output shares its input's storage although their schema declares no alias.
_UNANNOTATED_VIEWS = frozenset({torch.ops.aten._unsafe_view.default})


def is_view(node: fx.Node) -> bool:
    """True when ``node``'s output shares storage with one of its inputs (no new memory)."""
    target = node.target
    if target in _UNANNOTATED_VIEWS:
        return True
    if target is operator.getitem:
        parent = node.args[0]
        return isinstance(parent, fx.Node) and is_view(parent)
    if not isinstance(target, torch._ops.OpOverload):
        return False
    return any(
        r.alias_info is not None and not r.alias_info.is_write for r in target._schema.returns
    )


def tensor_bytes(value: Any) -> int:
    """Bytes of the storage a freshly allocated tensor like ``value`` occupies (0 otherwise)."""
    if isinstance(value, torch.Tensor):
        return int(value.numel() * value.element_size())
    return 0


def module_paths(node: fx.Node) -> list[str]:
    """Module paths from outermost to innermost that ``node`` was traced in (may be empty)."""
    stack = node.meta.get(NN_MODULE_STACK) or {}
    return [path for path, _cls in stack.values()]


_BATCH_NORM_FUNCTIONAL = torch.ops.aten._native_batch_norm_legit_functional.default


def must_keep(node: fx.Node) -> bool:
    """True for values backward reads that a recompute cannot reproduce, so they are kept.

    The running statistics a training-mode batch norm outputs (its outputs 3 and 4): they are
    per-channel vectors, and a recompute must not touch the running-stat buffers (forward's
    epilogue updates them in place), so it recomputes with the no-stats variant instead.
    """
    if node.target is not operator.getitem or node.args[1] not in (3, 4):
        return False
    parent = node.args[0]
    return (
        isinstance(parent, fx.Node)
        and parent.target is _BATCH_NORM_FUNCTIONAL
        and parent.args[5] is True
    )
