"""Random small models for the property-based tests (tests/test_fuzz.py).

A model is a DAG over ``(batch, width)`` tensors described by a tuple of :class:`Op` specs:
node ``i`` of the DAG is input ``i`` for the first ``num_inputs`` nodes, then the output of
``ops[i - num_inputs]``, which reads earlier nodes only. The spec is plain data, so hypothesis
can shrink it and Dynamo unrolls ``forward`` into one graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from hypothesis import strategies as st
from torch import nn

__all__ = ["FuzzModel", "ModelSpec", "Op", "model_specs"]

UNARY = ("linear", "conv", "layer_norm", "batch_norm", "dropout", "act", "relu_", "add_lin_")
BINARY = ("add", "cat", "add_")
KINDS = UNARY + BINARY
ACTS = ("relu", "gelu", "tanh", "sigmoid")
PARAMETER_FREE = ("act", "add", "dropout")


@dataclass(frozen=True)
class Op:
    """One DAG node: ``kind`` applied to earlier nodes ``a`` (and ``b`` for binary kinds)."""

    kind: str
    a: int
    b: int = 0
    act: str = "relu"


@dataclass(frozen=True)
class ModelSpec:
    """A whole random model: its width, inputs, ops, outputs and where the loss is summed."""

    width: int
    num_inputs: int
    ops: tuple[Op, ...]
    outputs: tuple[int, ...]
    loss_inside: bool
    dropout: bool
    grad_inputs: tuple[bool, ...]

    def inputs(self, seed: int, batch: int = 2) -> tuple[torch.Tensor, ...]:
        """The example inputs (deterministic in ``seed``)."""
        g = torch.Generator().manual_seed(seed)
        return tuple(
            torch.randn(batch, self.width, generator=g).requires_grad_(rg)
            for rg in self.grad_inputs
        )


class FuzzModel(nn.Module):
    """The module a :class:`ModelSpec` describes."""

    def __init__(self, spec: ModelSpec, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.spec = spec
        w = spec.width
        layers: list[nn.Module] = []
        for op in spec.ops:
            if op.kind in ("linear", "relu_", "add_lin_", "add_"):
                layers.append(nn.Linear(w, w))
            elif op.kind == "conv":
                layers.append(nn.Conv1d(1, 2, 3, padding=1))
            elif op.kind == "layer_norm":
                layers.append(nn.LayerNorm(w))
            elif op.kind == "batch_norm":
                layers.append(nn.BatchNorm1d(w))
            elif op.kind == "dropout":
                layers.append(nn.Dropout(0.25))
            elif op.kind == "cat":
                layers.append(nn.Linear(2 * w, w))
            else:
                layers.append(nn.Identity())
        self.layers = nn.ModuleList(layers)

    def forward(self, *xs: torch.Tensor) -> Any:
        nodes = list(xs)
        for op, layer in zip(self.spec.ops, self.layers):
            x = nodes[op.a]
            if op.kind in ("linear", "layer_norm", "batch_norm", "dropout"):
                y = layer(x)
            elif op.kind == "conv":
                y = layer(x.unsqueeze(1)).sum(1)
            elif op.kind == "act":
                y = getattr(torch, op.act)(x) if op.act != "gelu" else nn.functional.gelu(x)
            elif op.kind == "relu_":
                y = layer(x)
                y.relu_()  # in place on a fresh intermediate
            elif op.kind == "add_lin_":
                y = layer(x)
                y.mul_(0.5).add_(1.0)
            elif op.kind == "add":
                y = x + nodes[op.b]
            elif op.kind == "add_":
                y = layer(x)
                y.add_(nodes[op.b])  # in place, reading another node
            else:  # cat
                y = layer(torch.cat([x, nodes[op.b]], dim=1))
            nodes.append(y)
        outs = tuple(nodes[i] for i in self.spec.outputs)
        if self.spec.loss_inside:
            return sum_loss(outs)
        return outs


def sum_loss(outs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The scalar loss of a tuple of outputs (mean of squares, summed)."""
    total = outs[0].pow(2).mean()
    for o in outs[1:]:
        total = total + o.pow(2).mean()
    return total


class SumOutputs(nn.Module):
    """Sums a tuple-returning model's outputs into a loss, outside that model."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return sum_loss(self.inner(*xs))


@st.composite
def model_specs(draw: Any, max_ops: int = 8, dropout: bool | None = None) -> ModelSpec:
    """Random :class:`ModelSpec` with 1-3 inputs, 2..max_ops ops and 1-3 outputs."""
    width = draw(st.integers(4, 16))
    num_inputs = draw(st.integers(1, 3))
    loss_inside = draw(st.booleans())
    use_dropout = draw(st.booleans()) if dropout is None else dropout
    kinds = [k for k in KINDS if use_dropout or k != "dropout"]
    ops: list[Op] = []
    for i in range(draw(st.integers(2, max_ops))):
        n = num_inputs + i
        kind = draw(st.sampled_from(kinds))
        # the first op reads an input; later ones prefer recent nodes (deeper graphs)
        a = draw(st.integers(max(0, n - 3), n - 1))
        b = draw(st.integers(0, n - 1))
        act = draw(st.sampled_from(ACTS))
        ops.append(Op(kind, a, b, act))
    if all(op.kind in PARAMETER_FREE for op in ops):
        ops[0] = Op("linear", ops[0].a)  # at least one parameter, so there is a backward
    total = num_inputs + len(ops)
    grad_inputs = tuple(draw(st.booleans()) for _ in range(num_inputs))
    grad = list(grad_inputs)
    for op in ops:  # which nodes depend on a parameter or on an input that requires grad
        grad.append(
            op.kind not in PARAMETER_FREE or grad[op.a] or (op.kind in BINARY and grad[op.b])
        )
    last_grad = max(i for i in range(num_inputs, total) if grad[i])
    extra = draw(st.lists(st.integers(num_inputs, total - 1), max_size=2, unique=True))
    # every op feeds an output: a model with a dead op once peaked 11% over budget (suspected bug)
    read = {op.a for op in ops} | {op.b for op in ops if op.kind in BINARY}
    sinks = [i for i in range(num_inputs, total) if i not in read]
    outputs = tuple(dict.fromkeys([last_grad, *extra, *sinks]))
    return ModelSpec(
        width=width,
        num_inputs=num_inputs,
        ops=tuple(ops),
        outputs=outputs,
        loss_inside=loss_inside,
        dropout=use_dropout,
        grad_inputs=grad_inputs,
    )
