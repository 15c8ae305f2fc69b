"""Exact FLOP counts for one step: the compute side of the cost model and of the benchmarks.

Wraps ``torch.utils.flop_counter.FlopCounterMode`` and supplies formulas for the attention
kernels that torch leaves out on CPU, so that attention is not silently counted as zero.
The formulas are passed per counter (``custom_mapping``); nothing is registered globally.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch._prims.rng_prims import run_and_save_rng_state, run_with_rng_state
from torch.utils.flop_counter import FlopCounterMode, _FlopCounterMode

__all__ = ["count_flops", "count_flops_by_op", "flop_formulas", "op_flops"]

_Shape = Sequence[int]


def _attention_dims(query: _Shape, key: _Shape, value: _Shape) -> tuple[int, int, int, int, int]:
    """Split attention shapes into (batch*heads, query len, key len, qk dim, value dim).

    Leading dimensions are those of the query: with grouped-query attention the key and value
    have fewer heads, and each key/value head is used by several query heads, so the work
    scales with the number of query heads.
    """
    if len(query) < 2 or len(key) < 2 or len(value) < 2:
        raise ValueError(
            f"attention expects query/key/value of rank >= 2, got {query}, {key}, {value}"
        )
    num_queries, qk_dim = int(query[-2]), int(query[-1])
    num_keys, key_dim = int(key[-2]), int(key[-1])
    num_values, value_dim = int(value[-2]), int(value[-1])
    if qk_dim != key_dim or num_keys != num_values:
        raise ValueError(
            f"attention shapes do not match: query {tuple(query)}, key {tuple(key)}, "
            f"value {tuple(value)}"
        )
    batch_heads = math.prod(int(d) for d in query[:-2])
    return batch_heads, num_queries, num_keys, qk_dim, value_dim


def _attention_forward_flops(
    query: _Shape, key: _Shape, value: _Shape, *args: Any, out_shape: Any = None, **kwargs: Any
) -> int:
    """FLOPs of ``softmax(q @ k^T) @ v``: two batched matmuls, 2 FLOPs per multiply-add.

    The full score matrix is counted even when the attention is causal, like torch's own
    formulas for the CUDA kernels, so that the fused kernel and the unfused (math) path that
    training with attention dropout takes on CPU count the same.
    """
    bh, lq, lk, d_qk, d_v = _attention_dims(query, key, value)
    return 2 * bh * lq * lk * d_qk + 2 * bh * lq * lk * d_v


def _attention_backward_flops(
    grad_out: _Shape,
    query: _Shape,
    key: _Shape,
    value: _Shape,
    *args: Any,
    out_shape: Any = None,
    **kwargs: Any,
) -> int:
    """FLOPs of the fused attention backward: five batched matmuls.

    The fused (flash) backward recomputes the scores ``q @ k^T`` from the saved log-sum-exp,
    then computes grad_scores = grad_out @ v^T, grad_v = probs^T @ grad_out,
    grad_q = grad_scores @ k and grad_k = grad_scores^T @ q.
    """
    bh, lq, lk, d_qk, d_v = _attention_dims(query, key, value)
    if tuple(grad_out)[:-1] != tuple(query)[:-1] or int(grad_out[-1]) != d_v:
        raise ValueError(
            f"attention backward: grad_out {tuple(grad_out)} does not match query "
            f"{tuple(query)} and value {tuple(value)}"
        )
    recompute_scores = 2 * bh * lq * lk * d_qk
    grad_scores_and_value = 2 * (2 * bh * lq * lk * d_v)
    grad_query_and_key = 2 * (2 * bh * lq * lk * d_qk)
    return recompute_scores + grad_scores_and_value + grad_query_and_key


def flop_formulas() -> dict[Any, Callable[..., int]]:
    """FLOP formulas for the ops that ``FlopCounterMode`` has none for, keyed by op packet.

    Today these are the CPU fused attention kernel
    ``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward, which
    ``F.scaled_dot_product_attention`` dispatches to on CPU whenever there is no attention
    dropout. Each formula takes the op's arguments with tensors replaced by their shapes plus
    ``out_shape=``, the convention of ``FlopCounterMode(custom_mapping=...)``. A fresh dict is
    returned on every call, so callers may extend it.

    Returns:
        A dict from ``torch._ops.OpOverloadPacket`` to a formula returning an int.

    Example:
        >>> f = flop_formulas()[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu]
        >>> f((2, 4, 16, 8), (2, 4, 16, 8), (2, 4, 16, 8))  # 2 * (2 * 8*16*16*8)
        65536
    """
    aten = torch.ops.aten
    return {
        aten._scaled_dot_product_flash_attention_for_cpu: _attention_forward_flops,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: _attention_backward_flops,
    }


_RNG_WRAPPERS = (run_and_save_rng_state, run_with_rng_state)


class _CompiledCountingMode(_FlopCounterMode):
    """FlopCounterMode's dispatch mode, marked so torch.compile'd code runs under it (Dynamo
    skips every frame under other dispatch modes); it then counts the ops the compiled code
    runs. Inductor kernels are opaque to it: their FLOPs are not seen."""

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        return True

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        # The RNG save/replay wrappers of rewritten graphs wrap random ops (no FLOPs): run them.
        if func in _RNG_WRAPPERS:
            return func(*args, **(kwargs or {}))
        return super().__torch_dispatch__(func, types, args, kwargs)


class _FlopCounter(FlopCounterMode):
    """Counts totals only: no per-module attribution, whose global module hooks Dynamo would
    have to trace through inside compiled models."""

    mode: _FlopCounterMode | None

    def __enter__(self) -> _FlopCounter:
        self.flop_counts.clear()
        mode = _CompiledCountingMode(self)
        mode.__enter__()
        self.mode = mode
        return self

    def __exit__(self, *args: Any) -> None:
        mode, self.mode = self.mode, None
        assert mode is not None
        mode.__exit__(*args)


def _flop_counter() -> FlopCounterMode:
    return _FlopCounter(display=False, custom_mapping=flop_formulas())


def count_flops(step: Callable[[], Any]) -> int:
    """Run ``step()`` once and return the FLOPs it executed, forward and backward.

    Counts matmuls, convolutions and attention (pointwise ops, reductions and normalisations
    count zero, as in ``FlopCounterMode``). Recomputation in backward is counted: a checkpointed
    step reports more FLOPs than the plain one.

    Args:
        step: a zero-argument callable, typically ``model(*inputs).backward()``.

    Returns:
        The total FLOP count (2 per multiply-add).

    Example:
        >>> a = torch.randn(8, 16, requires_grad=True)
        >>> b = torch.randn(16, 4)
        >>> count_flops(lambda: (a @ b).sum().backward())  # forward + grad of a
        2048
    """
    with _flop_counter() as counter:
        step()
    return int(counter.get_total_flops())


def count_flops_by_op(step: Callable[[], Any]) -> dict[str, int]:
    """Run ``step()`` once and return its FLOPs per op, for finding where compute goes.

    Args:
        step: a zero-argument callable.

    Returns:
        A dict from op name (such as ``"aten.mm"``) to the FLOPs of all its calls; ops that
        count zero are absent.

    Example:
        >>> a = torch.randn(8, 16, requires_grad=True)
        >>> count_flops_by_op(lambda: (a @ torch.randn(16, 4)).sum().backward())
        {'aten.mm': 2048}
    """
    with _flop_counter() as counter:
        step()
    per_op = counter.get_flop_counts().get("Global", {})
    return {str(op): int(n) for op, n in per_op.items() if n}


def op_flops(
    op: Any,
    args: Sequence[Any],
    kwargs: dict[str, Any] | None = None,
    out: Any = None,
) -> int:
    """FLOPs of one call of an ATen op, without running it: the per-node cost of a graph.

    Uses torch's registered formulas plus :func:`flop_formulas`. Only shapes are read, so
    fake or meta tensors (``node.meta["val"]``) work. An op with no formula counts zero: that
    is right for pointwise ops; composite ops (``aten.linear``, ``aten.matmul``) also count
    zero here because they have no formula of their own, so pass decomposed ATen graphs.

    Args:
        op: an ``OpOverload`` or ``OpOverloadPacket`` such as ``torch.ops.aten.mm.default``.
        args: the op's positional arguments (tensors, fake or meta tensors, plain values).
        kwargs: the op's keyword arguments.
        out: the op's output (needed by formulas that read output shapes, e.g. convolution).

    Returns:
        The FLOP count of that call.

    Example:
        >>> a = torch.empty(8, 16, device="meta")
        >>> b = torch.empty(16, 4, device="meta")
        >>> op_flops(torch.ops.aten.mm.default, (a, b))
        1024
    """
    packet = getattr(op, "_overloadpacket", op)
    registry = _flop_counter().flop_registry
    formula = registry.get(packet)
    if formula is None:
        return 0
    return int(formula(*args, **(kwargs or {}), out_val=out))
