"""Bad and unusual inputs to ``auto_checkpoint``: one table, each case a clear error or a
documented behaviour, never a wrong answer.

Each case builds a tiny model, runs it through ``auto_checkpoint`` and checks either the error
(type and message) or that the result equals the unmodified model's (outputs, gradients,
mutated inputs and buffers) and fits its budget.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

import graphckpt

_BUDGET_GB = 1.0  # far above these models' peaks


class _Net(nn.Module):
    """Two linears and a GELU; returns whatever ``pack`` makes of the output."""

    def __init__(self, pack: Callable[[torch.Tensor], Any] = lambda y: y.pow(2).sum()) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 4)
        self.pack = pack

    def forward(self, x: torch.Tensor) -> Any:
        return self.pack(self.b(nn.functional.gelu(self.a(x))))


def _x(batch: int = 2, grad: bool = False) -> torch.Tensor:
    return torch.randn(batch, 4, generator=torch.Generator().manual_seed(1)).requires_grad_(grad)


def _grads(model: nn.Module) -> dict[str, torch.Tensor | None]:
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


def _assert_grads_equal(a: nn.Module, b: nn.Module) -> None:
    ga, gb = _grads(a), _grads(b)
    assert ga.keys() == gb.keys()
    for name in ga:
        x, y = ga[name], gb[name]
        assert (x is None) == (y is None), name
        if x is not None and y is not None:
            assert torch.equal(x, y), name


def _train_both(
    model: nn.Module, loss_of: Callable[[Any], torch.Tensor], *args: Any, **kwargs: Any
) -> tuple[nn.Module, Any, Any]:
    """auto_checkpoint a copy of ``model``; one step of each; assert equal loss and grads."""
    reference = copy.deepcopy(model)
    ckpt = graphckpt.auto_checkpoint(
        copy.deepcopy(model), _BUDGET_GB, example_inputs=args, example_kwargs=kwargs or None
    )
    ref_args, ckpt_args = copy.deepcopy((args, kwargs)), copy.deepcopy((args, kwargs))
    out_ref = reference(*ref_args[0], **ref_args[1])
    out_ckpt = ckpt(*ckpt_args[0], **ckpt_args[1])
    loss_ref, loss_ckpt = loss_of(out_ref), loss_of(out_ckpt)
    assert torch.equal(loss_ref, loss_ckpt)
    loss_ref.backward()
    loss_ckpt.backward()
    _assert_grads_equal(reference, ckpt)
    assert ckpt.plan is not None and ckpt.plan.predicted_peak_bytes <= ckpt.budget_bytes
    return ckpt, (out_ref, ref_args), (out_ckpt, ckpt_args)


def _raises(budget: Any, error: type[Exception], match: str) -> Callable[[], None]:
    def case() -> None:
        with pytest.raises(error, match=match):
            graphckpt.auto_checkpoint(_Net(), budget, example_inputs=(_x(),))

    return case


def _below_minimum() -> None:
    with pytest.raises(graphckpt.InfeasibleBudgetError, match="smallest feasible peak") as info:
        graphckpt.auto_checkpoint(_Net(), 1e-9, example_inputs=(_x(),))
    minimum = info.value.min_feasible_bytes
    assert f"{minimum / 2**20:.1f} MiB" in str(info.value)
    ckpt = graphckpt.auto_checkpoint(_Net(), minimum / 2**30, example_inputs=(_x(),))
    assert ckpt.plan is not None and ckpt.plan.predicted_peak_bytes <= minimum


def _dict_output() -> None:
    net = _Net(lambda y: {"loss": y.pow(2).sum(), "logits": y, "step": 3})
    _, (ref, _), (out, _) = _train_both(net, lambda o: o["loss"] + o["logits"].sum(), _x())
    assert type(out) is dict and out.keys() == ref.keys() and out["step"] == 3
    assert torch.equal(out["logits"], ref["logits"])


@dataclass
class _Output:
    loss: torch.Tensor
    logits: torch.Tensor


def _dataclass_output() -> None:
    net = _Net(lambda y: _Output(y.pow(2).sum(), y))
    _, (ref, _), (out, _) = _train_both(net, lambda o: o.loss + o.logits.mean(), _x())
    assert type(out) is _Output and torch.equal(out.logits, ref.logits)


def _tuple_with_non_tensors() -> None:
    net = _Net(lambda y: (y.pow(2).sum(), None, 7, "name", y))
    _, (ref, _), (out, _) = _train_both(net, lambda o: o[0] + o[4].sum(), _x())
    assert type(out) is tuple and out[1:4] == (None, 7, "name")
    assert torch.equal(out[4], ref[4])


def _inputs_need_no_grad() -> None:
    _train_both(_Net(), lambda o: o, _x(grad=False))


def _input_needs_grad() -> None:
    _, (_, ref_args), (_, ckpt_args) = _train_both(_Net(), lambda o: o, _x(grad=True))
    assert torch.equal(ref_args[0][0].grad, ckpt_args[0][0].grad)


class _KwOnly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, *, scale: torch.Tensor, shift: float = 0.0) -> Any:
        return (self.lin(x) * scale + shift).tanh().sum()


def _keyword_only_inputs() -> None:
    _train_both(_KwOnly(), lambda o: o, _x(), scale=torch.full((4,), 0.5), shift=1.0)


class _MutatesInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 4)
        self.register_buffer("seen", torch.zeros(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.add_(1.0)
        self.seen.mul_(0.5).add_(x.detach().mean(0))
        return self.lin(x).relu().sum()


def _mutates_input_and_buffer() -> None:
    ckpt, (_, ref_args), (_, ckpt_args) = _train_both(_MutatesInput(), lambda o: o, _x())
    assert torch.equal(ref_args[0][0], ckpt_args[0][0])  # the input was mutated alike
    reference = _MutatesInput()
    reference(_x())  # one step: what the buffer holds after exactly one call
    assert torch.equal(ckpt.seen, reference.seen)


def _planning_leaves_inputs_alone() -> None:
    x = _x()
    graphckpt.auto_checkpoint(_MutatesInput(), _BUDGET_GB, example_inputs=(x,))
    assert torch.equal(x, _x())  # the planning forward's x.add_(1) was undone


def _nothing_requires_grad() -> None:
    net = _Net().requires_grad_(False)
    ckpt = graphckpt.auto_checkpoint(net, _BUDGET_GB, example_inputs=(_x(),))
    out = ckpt(_x())
    assert ckpt.plan is None and not out.requires_grad and torch.equal(out, net(_x()))
    with pytest.raises(ValueError, match="nothing in this call requires grad"):
        graphckpt.plan(net, (_x(),), _BUDGET_GB)


def _new_batch_size_replans() -> None:
    net = _Net()
    ckpt = graphckpt.auto_checkpoint(copy.deepcopy(net), _BUDGET_GB, example_inputs=(_x(2),))
    for batch in (3, 5):
        reference = copy.deepcopy(net)
        reference(_x(batch)).backward()
        for p in ckpt.parameters():
            p.grad = None
        ckpt(_x(batch)).backward()
        _assert_grads_equal(reference, ckpt)
    assert len(ckpt.plans) == 3
    assert all(p.predicted_peak_bytes <= ckpt.budget_bytes for p in ckpt.plans)


def _new_sequence_length_replans() -> None:
    net = _Net()
    seq = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(2))
    ckpt = graphckpt.auto_checkpoint(copy.deepcopy(net), _BUDGET_GB, example_inputs=(seq[:, :3],))
    reference = copy.deepcopy(net)
    reference(seq).backward()
    ckpt(seq).backward()
    _assert_grads_equal(reference, ckpt)
    assert len(ckpt.plans) == 2


def _moved_to_another_device_replans() -> None:
    # The only other device on a CPU machine is meta: the step runs there with meta tensors.
    ckpt = graphckpt.auto_checkpoint(_Net(), _BUDGET_GB, example_inputs=(_x(),))
    ckpt.to("meta")
    ckpt(_x().to("meta")).backward()
    assert len(ckpt.plans) == 2
    assert all(p.grad is not None and p.grad.is_meta for p in ckpt.parameters())


def _new_batch_over_budget_raises() -> None:
    net = _Net()
    wide = graphckpt.plan(net, (_x(2),), 1.0)
    ckpt = graphckpt.auto_checkpoint(net, wide.max_peak_bytes / 2**30, example_inputs=(_x(2),))
    with pytest.raises(graphckpt.InfeasibleBudgetError, match="smallest feasible peak"):
        ckpt(_x(4096)).backward()


def _dtype_change_replans() -> None:
    net = _Net()
    ckpt = graphckpt.auto_checkpoint(copy.deepcopy(net), _BUDGET_GB, example_inputs=(_x(),))
    ckpt.double()
    reference = copy.deepcopy(net).double()
    reference(_x().double()).backward()
    ckpt(_x().double()).backward()
    _assert_grads_equal(reference, ckpt)
    assert len(ckpt.plans) == 2


def _frozen_after_planning() -> None:
    net = _Net()
    ckpt = graphckpt.auto_checkpoint(copy.deepcopy(net), _BUDGET_GB, example_inputs=(_x(),))
    reference = copy.deepcopy(net)
    for model in (ckpt, reference):
        model.a.weight.requires_grad_(False)
        model(_x()).backward()
    _assert_grads_equal(reference, ckpt)
    assert ckpt.a.weight.grad is None and ckpt.a.bias.grad is not None
    assert len(ckpt.plans) == 2


class _Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lin(x)
        return y.sum() if y.sum().item() > 0 else y.relu().sum()


def _untraceable_op() -> None:
    with pytest.raises(graphckpt.TraceError, match=r"(?s)_Untraceable.*item"):
        graphckpt.auto_checkpoint(_Untraceable(), _BUDGET_GB, example_inputs=(_x(),))


CASES: dict[str, Callable[[], None]] = {
    "budget str": _raises("1", TypeError, "budget_gb must be a number of GiB, got str"),
    "budget None": _raises(None, TypeError, "budget_gb must be a number of GiB, got NoneType"),
    "budget bool": _raises(True, TypeError, "budget_gb must be a number of GiB, got bool"),
    "budget tensor": _raises(torch.tensor(1.0), TypeError, "got Tensor"),
    "budget zero": _raises(0, ValueError, "positive finite number of GiB, got 0"),
    "budget negative": _raises(-1.0, ValueError, r"got -1\.0"),
    "budget nan": _raises(math.nan, ValueError, "got nan"),
    "budget inf": _raises(math.inf, ValueError, "got inf"),
    "budget below minimum": _below_minimum,
    "dict output": _dict_output,
    "dataclass output": _dataclass_output,
    "tuple with non-tensors": _tuple_with_non_tensors,
    "inputs need no grad": _inputs_need_no_grad,
    "input needs grad": _input_needs_grad,
    "keyword-only inputs": _keyword_only_inputs,
    "mutates input and buffer": _mutates_input_and_buffer,
    "planning leaves inputs alone": _planning_leaves_inputs_alone,
    "nothing requires grad": _nothing_requires_grad,
    "new batch size replans": _new_batch_size_replans,
    "new sequence length replans": _new_sequence_length_replans,
    "moved to another device replans": _moved_to_another_device_replans,
    "new batch over budget raises": _new_batch_over_budget_raises,
    "dtype change replans": _dtype_change_replans,
    "frozen after planning": _frozen_after_planning,
    "untraceable op": _untraceable_op,
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_bad_input(case: str) -> None:
    CASES[case]()
