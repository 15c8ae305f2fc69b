"""Tests for graphckpt/flops.py: attention is counted, exactly, on every CPU path."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode

from graphckpt.examples import gpt_example
from graphckpt.flops import count_flops, count_flops_by_op, flop_formulas, op_flops

aten = torch.ops.aten
FLASH_CPU = "aten._scaled_dot_product_flash_attention_for_cpu"
FLASH_CPU_BACKWARD = "aten._scaled_dot_product_flash_attention_for_cpu_backward"


class _OpRecorder(TorchDispatchMode):
    """Records the name of every ATen op packet that reaches the dispatcher."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.ops.add(str(func._overloadpacket))
        return func(*args, **(kwargs or {}))


def _recorded_ops(step: Callable[[], Any]) -> set[str]:
    with _OpRecorder() as recorder:
        step()
    return recorder.ops


def _explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    return torch.softmax(scores, dim=-1) @ v


def _qkv(q_shape: tuple[int, ...], kv_shape: tuple[int, ...], grad: bool) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    shapes = (q_shape, kv_shape, kv_shape)
    return [torch.randn(s, generator=gen).requires_grad_(grad) for s in shapes]


def _fwd_bwd(fn: Callable[..., torch.Tensor], *tensors: torch.Tensor) -> Callable[[], None]:
    return lambda: fn(*tensors).sum().backward()


def test_sdpa_forward_counts_like_explicit_matmuls() -> None:
    q, k, v = _qkv((2, 3, 5, 8), (2, 3, 7, 8), grad=False)
    ops = _recorded_ops(lambda: F.scaled_dot_product_attention(q, k, v))
    assert FLASH_CPU in ops  # the fused CPU kernel, not the math fallback, is under test
    expected = 2 * (2 * 3) * 5 * 7 * (8 + 8)  # q @ k^T and probs @ v
    assert count_flops(lambda: F.scaled_dot_product_attention(q, k, v)) == expected
    assert count_flops(lambda: _explicit_attention(q, k, v)) == expected


def test_sdpa_backward_counts_explicit_matmuls_plus_score_recompute() -> None:
    q, k, v = _qkv((2, 3, 5, 8), (2, 3, 7, 8), grad=True)
    fused_step = _fwd_bwd(F.scaled_dot_product_attention, q, k, v)
    assert FLASH_CPU_BACKWARD in _recorded_ops(fused_step)
    explicit = count_flops(_fwd_bwd(_explicit_attention, q, k, v))
    assert explicit == 2 * 6 * 5 * 7 * (3 * 8 + 3 * 8)  # 2 forward + 4 backward matmuls
    recompute_scores = 2 * 6 * 5 * 7 * 8
    assert count_flops(fused_step) == explicit + recompute_scores
    assert count_flops_by_op(fused_step) == {
        FLASH_CPU: 2 * 6 * 5 * 7 * 16,
        FLASH_CPU_BACKWARD: explicit - 2 * 6 * 5 * 7 * 16 + recompute_scores,
    }


def test_sdpa_with_dropout_takes_math_path_and_counts_like_explicit() -> None:
    q, k, v = _qkv((2, 3, 5, 8), (2, 3, 7, 8), grad=True)
    step = _fwd_bwd(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, dropout_p=0.5), q, k, v)
    ops = _recorded_ops(step)
    assert FLASH_CPU not in ops and "aten.bmm" in ops
    assert count_flops(step) == count_flops(_fwd_bwd(_explicit_attention, q, k, v))


def test_grouped_query_attention_counts_query_heads() -> None:
    q, k, v = _qkv((2, 4, 5, 8), (2, 2, 7, 8), grad=False)
    fused = count_flops(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
    k4, v4 = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    assert fused == count_flops(lambda: _explicit_attention(q, k4, v4)) == 2 * 8 * 5 * 7 * 16


def test_formulas_are_not_registered_globally() -> None:
    formulas = flop_formulas()
    assert set(formulas) == {
        aten._scaled_dot_product_flash_attention_for_cpu,
        aten._scaled_dot_product_flash_attention_for_cpu_backward,
    }
    assert not set(formulas) & set(flop_counter.flop_registry)
    formulas.clear()
    assert len(flop_formulas()) == 2  # a fresh dict each call


def test_op_flops_reads_shapes_of_meta_tensors() -> None:
    a, b = torch.empty(8, 16, device="meta"), torch.empty(16, 4, device="meta")
    assert op_flops(aten.mm.default, (a, b)) == 2 * 8 * 16 * 4
    assert op_flops(aten.mm, (a, b)) == 2 * 8 * 16 * 4
    assert op_flops(aten.add.Tensor, (a, a)) == 0
    q = torch.empty(2, 3, 5, 8, device="meta")
    flash = aten._scaled_dot_product_flash_attention_for_cpu.default
    assert op_flops(flash, (q, q, q), {"is_causal": True}) == 2 * 6 * 5 * 5 * 16
    flash_backward = aten._scaled_dot_product_flash_attention_for_cpu_backward.default
    assert op_flops(flash_backward, (q, q, q, q)) == 2 * 6 * 5 * 5 * (3 * 8 + 2 * 8)


def test_mismatched_attention_shapes_are_rejected() -> None:
    formula = flop_formulas()[aten._scaled_dot_product_flash_attention_for_cpu]
    with pytest.raises(ValueError, match="do not match"):
        formula((2, 3, 5, 8), (2, 3, 7, 4), (2, 3, 7, 8))


def test_gpt_attention_is_counted_in_eval_and_training() -> None:
    batch, seq, n_layer, n_embd, n_head = 2, 32, 2, 32, 4
    model, inputs = gpt_example(
        batch=batch, seq=seq, n_layer=n_layer, n_embd=n_embd, n_head=n_head, dropout=0.1
    )

    def step() -> None:
        model(*inputs).backward()

    train = count_flops(step)
    model.eval()
    assert {FLASH_CPU, FLASH_CPU_BACKWARD} <= set(count_flops_by_op(step))
    evaluation = count_flops(step)
    # Training (attention dropout) runs explicit bmm attention; eval runs the fused kernel,
    # whose backward also recomputes the scores: one (T x hd) @ (hd x T) per head and layer.
    recompute_scores = n_layer * 2 * batch * n_head * seq * seq * (n_embd // n_head)
    assert evaluation == train + recompute_scores


_COMPUTE_OP = re.compile(r"attention|mm|conv")


def _assert_compute_ops_counted(step: Callable[[], Any]) -> None:
    seen = {op for op in _recorded_ops(step) if _COMPUTE_OP.search(op)}
    counted = set(count_flops_by_op(step))
    assert seen, "no matmul or attention op ran"
    assert seen <= counted, f"ops with no FLOP count: {sorted(seen - counted)}"


@pytest.mark.parametrize("training", [True, False])
def test_every_gpt_compute_op_is_counted(training: bool) -> None:
    model, inputs = gpt_example(batch=2, seq=16, n_layer=2, n_embd=32)
    model.train(training)
    _assert_compute_ops_counted(lambda: model(*inputs).backward())


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("training", [True, False])
def test_every_hf_gpt2_compute_op_is_counted(attn_implementation: str, training: bool) -> None:
    pytest.importorskip("transformers")
    from benchmarks.models import bench_hf_gpt2

    bench = bench_hf_gpt2(
        batch=2, seq=16, n_layer=2, n_embd=32, n_head=2, attn_implementation=attn_implementation
    )
    bench.model.train(training)
    _assert_compute_ops_counted(lambda: bench.model(*bench.inputs).backward())
