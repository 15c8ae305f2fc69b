"""Tests of graphckpt/checkpoint.py: outputs and gradients equal the plain call, for every kind
of input and output, under each storage mode of the Checkpointer."""

from __future__ import annotations

import doctest
import importlib
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import graphckpt.saved as saved_module
from graphckpt.checkpoint import Checkpointer, checkpoint, non_reentrant_checkpoint
from graphckpt.config import CheckpointConfig
from graphckpt.errors import GraphCkptError
from graphckpt.memory import LiveTensorTracker
from graphckpt.offload import OffloadEngine
from graphckpt.rng import RNGStatesTracker

HIDDEN = 8

MODES = ["reentrant", "non_reentrant", "offload", "contiguous"]


def _runner(mode: str) -> Callable[..., Any]:
    if mode == "reentrant":
        return checkpoint
    if mode == "non_reentrant":
        return non_reentrant_checkpoint
    if mode == "offload":
        return Checkpointer(CheckpointConfig(cpu_checkpointing=True))
    config = CheckpointConfig(contiguous_memory_optimization=True, number_checkpoints=2)
    return Checkpointer(config)


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone().requires_grad_(value.requires_grad)
    if isinstance(value, tuple):
        return tuple(_clone(v) for v in value)
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    return value


def _step(run: Callable[..., Any], module: nn.Module, args: tuple, kwargs: dict) -> tuple:
    """Runs forward and backward; returns outputs, input grads and parameter grads."""
    module.zero_grad(set_to_none=True)
    args, kwargs = _clone(args), _clone(kwargs)
    out = run(module, *args, **kwargs)
    loss = sum(t.float().sum() for t in _tensors(out) if t.requires_grad)
    loss.backward()
    input_grads = [t.grad for t in _tensors((args, kwargs))]
    param_grads = [p.grad for p in module.parameters()]
    return out, input_grads, param_grads


def _assert_same(got: Any, want: Any) -> None:
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    elif isinstance(want, (tuple, list)):
        assert type(got) is type(want) and len(got) == len(want)
        for g, w in zip(got, want):
            _assert_same(g, w)
    else:
        assert got == want


def _check(mode: str, module: nn.Module, *args: Any, **kwargs: Any) -> None:
    torch.manual_seed(0)
    want = _step(lambda f, *a, **k: f(*a, **k), module, args, kwargs)
    torch.manual_seed(0)
    got = _step(_runner(mode), module, args, kwargs)
    _assert_same(got, want)


class OneInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.linear(x))


class MaskInput(OneInput):
    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        y = self.linear(x)
        return y.masked_fill(mask, 0.0) if mask.dtype == torch.bool else y * mask


class TwoInOneOut(OneInput):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.linear(x) * torch.sigmoid(y)


class MoreOutputs(OneInput):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        y = self.linear(x)
        return y, torch.relu(y), x * 2, y.sum()


class NonTensorArgs(OneInput):
    def forward(self, x: torch.Tensor, extra: Any, flag: bool = True, scale: float = 1.0):  # type: ignore[override]
        y = self.linear(x) * scale
        for item in extra if isinstance(extra, tuple) else (extra,):
            if isinstance(item, torch.Tensor):
                y = y + item
            elif isinstance(item, (int, float)) and not isinstance(item, bool):
                y = y * item
        return torch.relu(y) if flag else y


class MixedOutputs(OneInput):
    def forward(self, x: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        y = self.linear(x)
        return 1, y, None, "tag", x.argmax(-1), 2.5, torch.relu(y), True


class KeywordInputs(OneInput):
    def forward(self, x: torch.Tensor, *, bias: torch.Tensor, op: str = "add") -> torch.Tensor:  # type: ignore[override]
        y = self.linear(x)
        return y + bias if op == "add" else y * bias


def _x(requires_grad: bool = True) -> torch.Tensor:
    return torch.randn(4, HIDDEN, requires_grad=requires_grad)


@pytest.mark.parametrize("mode", MODES)
def test_one_tensor_input(mode: str) -> None:
    _check(mode, OneInput(), _x())


@pytest.mark.parametrize("mode", MODES)
def test_two_tensor_inputs(mode: str) -> None:
    _check(mode, TwoInOneOut(), _x(), _x())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.bool, torch.float32])
def test_mask_that_needs_no_grad(mode: str, dtype: torch.dtype) -> None:
    mask = torch.rand(4, HIDDEN) > 0.5
    _check(mode, MaskInput(), _x(), mask.to(dtype))


@pytest.mark.parametrize("mode", MODES)
def test_more_outputs_than_inputs(mode: str) -> None:
    _check(mode, MoreOutputs(), _x())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "extra",
    [None, 2, True, 1.5, (None, 2.5), (None, True, 3), "tensor-in-tuple"],
)
def test_non_tensor_arguments(mode: str, extra: Any) -> None:
    if extra == "tensor-in-tuple":
        extra = (None, 2, torch.randn(HIDDEN, requires_grad=True))
    _check(mode, NonTensorArgs(), _x(), extra, False, 0.5)


@pytest.mark.parametrize("mode", MODES)
def test_outputs_mixing_tensors_and_non_tensors_keep_their_order(mode: str) -> None:
    _check(mode, MixedOutputs(), _x())


@pytest.mark.parametrize("mode", MODES)
def test_keyword_arguments(mode: str) -> None:
    _check(mode, KeywordInputs(), _x(), bias=torch.randn(HIDDEN, requires_grad=True), op="mul")


@pytest.mark.parametrize("mode", MODES)
def test_input_without_grad_still_gives_parameter_grads(mode: str) -> None:
    _check(mode, OneInput(), _x(requires_grad=False))


@pytest.mark.parametrize("mode", MODES)
def test_aliased_input(mode: str) -> None:
    # _check clones each argument, which would undo the aliasing: pass one tensor twice here.
    module = TwoInOneOut()
    x = _x()

    def step(run: Callable[..., Any]) -> tuple[Any, ...]:
        module.zero_grad(set_to_none=True)
        x.grad = None
        out = run(module, x, x)
        out.sum().backward()
        return out, x.grad, [p.grad for p in module.parameters()]

    _assert_same(step(_runner(mode)), step(lambda f, *a: f(*a)))


def test_region_is_recomputed_once_in_backward() -> None:
    calls = []
    module = OneInput()

    def region(x: torch.Tensor) -> torch.Tensor:
        calls.append(torch.is_grad_enabled())
        return module(x)

    y = checkpoint(region, _x())
    assert calls == [False]
    y.sum().backward()
    assert calls == [False, True]


def test_forward_keeps_no_intermediate_activations() -> None:
    layers = nn.Sequential(*[nn.Sequential(nn.Linear(256, 256), nn.Tanh()) for _ in range(4)])
    x = torch.randn(64, 256, requires_grad=True)
    with LiveTensorTracker("cpu") as plain:
        y = layers(x)
        kept_plain = plain.current_bytes - plain.baseline_bytes
    del y
    with LiveTensorTracker("cpu") as ckpt:
        y = checkpoint(layers, x)
        kept_ckpt = ckpt.current_bytes - ckpt.baseline_bytes
    del y
    assert kept_ckpt == 64 * 256 * 4  # the output only
    assert kept_plain == 4 * 64 * 256 * 4  # each tanh keeps its output


@pytest.mark.parametrize("guard", [torch.no_grad, torch.inference_mode])
@pytest.mark.parametrize("non_reentrant", [False, True])
@pytest.mark.parametrize(
    "config",
    [
        CheckpointConfig(cpu_checkpointing=True),
        CheckpointConfig(contiguous_memory_optimization=True, number_checkpoints=1),
    ],
    ids=["offload", "contiguous"],
)
def test_no_grad_saves_nothing(
    guard: Callable[[], Any],
    non_reentrant: bool,
    config: CheckpointConfig,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Spies, not just saved_bytes(): without a grad_fn a region's saved inputs would be freed
    # at once, so a copy made and dropped would leave no trace in the counters.
    stored: list[object] = []
    init = saved_module.SavedInputs.__init__
    offload = OffloadEngine.offload

    def spy_init(self: Any, *args: Any) -> None:
        stored.append("saved")
        init(self, *args)

    def spy_offload(self: OffloadEngine, tensor: torch.Tensor) -> Any:
        stored.append("offloaded")
        return offload(self, tensor)

    monkeypatch.setattr(saved_module.SavedInputs, "__init__", spy_init)
    monkeypatch.setattr(OffloadEngine, "offload", spy_offload)
    ckpt = Checkpointer(config)
    run = ckpt.non_reentrant if non_reentrant else ckpt
    module = OneInput()
    x = _x()
    with guard():
        y = run(module, x)
        z = run(module, x * 2)  # an intermediate input too
    assert stored == []
    assert ckpt.num_pending_regions == 0 and ckpt.saved_bytes() == 0
    assert ckpt.buffers is None or ckpt.buffers.num_allocations == 0
    assert not y.requires_grad and not z.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(y, module(x), rtol=0, atol=0)
    # The same Checkpointer, with grad on, does save (so the spies can see it).
    run(module, x).sum().backward()
    assert stored


def test_saved_bytes_count_inputs_until_backward() -> None:
    ckpt = Checkpointer()
    x, mask = _x(), torch.ones(4, HIDDEN, dtype=torch.bool)
    y = ckpt(MaskInput(), x, mask)
    assert ckpt.saved_bytes() == x.numel() * 4 + mask.numel()
    assert ckpt.saved_bytes("host") == 0
    y.sum().backward()
    assert ckpt.saved_bytes() == 0 and ckpt.num_pending_regions == 0


@pytest.mark.parametrize("mode", ["reentrant", "non_reentrant"])
def test_dropout_with_same_seed_gives_bitwise_identical_grads(mode: str) -> None:
    module = nn.Sequential(nn.Linear(HIDDEN, HIDDEN), nn.Dropout(0.5), nn.Linear(HIDDEN, HIDDEN))
    x = _x()
    torch.manual_seed(7)
    want = _step(lambda f, *a: f(*a), module, (x,), {})
    torch.manual_seed(7)
    got = _step(_runner(mode), module, (x,), {})
    _assert_same(got, want)
    # The recompute must not move the caller's RNG stream either.
    torch.manual_seed(7)
    _runner(mode)(module, x).sum().backward()
    after_ckpt = torch.rand(3)
    torch.manual_seed(7)
    module(x).sum().backward()
    torch.testing.assert_close(after_ckpt, torch.rand(3), rtol=0, atol=0)


def test_dropout_under_tracker_fork_replays_tracker_state() -> None:
    # A CPU tracker even when a GPU is present: the dropout below draws on the CPU.
    ckpt = Checkpointer(tracker=RNGStatesTracker(device="cpu"))
    ckpt.tracker.add("model-parallel-rng", 123)
    linear = nn.Linear(HIDDEN, HIDDEN)

    def region(x: torch.Tensor) -> torch.Tensor:
        with ckpt.tracker.fork("model-parallel-rng"):
            return torch.nn.functional.dropout(linear(x), 0.5)

    x = _x()
    states = ckpt.tracker.get_states()
    ckpt(region, x).sum().backward()
    got = (x.grad.clone(), linear.weight.grad.clone())
    x.grad, linear.weight.grad = None, None
    ckpt.tracker.set_states(states)
    region(x).sum().backward()
    _assert_same(got, (x.grad, linear.weight.grad))


@pytest.mark.parametrize("mode", ["reentrant", "non_reentrant"])
@pytest.mark.parametrize("how", ["module", "closure"])
def test_batchnorm_running_stats_equal_a_plain_forward(mode: str, how: str) -> None:
    bn = nn.BatchNorm1d(HIDDEN)
    plain = nn.BatchNorm1d(HIDDEN)
    plain.load_state_dict(bn.state_dict())
    x = _x()
    function = bn if how == "module" else (lambda t: torch.relu(bn(t)))
    for _ in range(2):
        _runner(mode)(function, x).sum().backward()
        plain(x)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(bn, name), getattr(plain, name), rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["reentrant", "non_reentrant"])
def test_autocast_bf16_on_cpu_equals_plain_autocast(mode: str) -> None:
    module = nn.Sequential(nn.Linear(HIDDEN, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, HIDDEN))
    x = _x()

    def under_autocast(run: Callable[..., Any]) -> Callable[..., Any]:
        def step(f: Callable[..., Any], *args: Any) -> Any:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = run(f, *args)
            assert out.dtype == torch.bfloat16
            return out

        return step

    want = _step(under_autocast(lambda f, *a: f(*a)), module, (x,), {})
    got = _step(under_autocast(_runner(mode)), module, (x,), {})
    _assert_same(got, want)


def test_released_input_passed_again_is_a_clear_error() -> None:
    config = CheckpointConfig(cpu_checkpointing=True, release_inputs=True)
    ckpt = Checkpointer(config)
    module = OneInput()
    x = _x()
    hidden = x * 2
    y = ckpt(module, hidden)
    assert hidden.numel() == 0  # its storage was released
    with pytest.raises(GraphCkptError, match=r"args\[0\].*offloaded"):
        ckpt(module, hidden)
    with pytest.raises(RuntimeError, match="placeholder"):
        checkpoint(module, hidden)
    y.sum().backward()
    want = x.grad.clone()
    x.grad = None
    module(x * 2).sum().backward()
    torch.testing.assert_close(want, x.grad, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["offload", "contiguous"])
def test_input_offloaded_by_a_previous_checkpoint_can_be_passed_again_by_default(
    mode: str,
) -> None:
    # Without release_inputs the checkpoint stores a copy and leaves the caller's tensor
    # whole, so there is no placeholder to refuse: reusing it must give the plain gradients.
    run = _runner(mode)
    first, second = OneInput(), OneInput()

    def step(call: Callable[..., Any]) -> tuple[Any, ...]:
        for m in (first, second):
            m.zero_grad(set_to_none=True)
        x = torch.linspace(-1, 1, 4 * HIDDEN).reshape(4, HIDDEN).requires_grad_()
        hidden = torch.tanh(x)
        out = call(first, hidden) + call(second, hidden)
        assert hidden.shape == (4, HIDDEN)
        out.sum().backward()
        return out, x.grad, [p.grad for m in (first, second) for p in m.parameters()]

    _assert_same(step(run), step(lambda f, *a: f(*a)))


def test_leaf_inputs_are_never_released() -> None:
    ckpt = Checkpointer(CheckpointConfig(cpu_checkpointing=True, release_inputs=True))
    x = _x()
    ckpt(OneInput(), x)
    assert x.shape == (4, HIDDEN)
    ckpt(OneInput(), x)  # no error: it was not released


def test_checkpoint_is_a_default_checkpointer(monkeypatch: pytest.MonkeyPatch) -> None:
    used: list[Checkpointer] = []
    call = Checkpointer.__call__

    def spy(self: Checkpointer, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        used.append(self)
        return call(self, function, *args, **kwargs)

    monkeypatch.setattr(Checkpointer, "__call__", spy)
    module, x = OneInput(), _x()
    torch.testing.assert_close(checkpoint(module, x), module(x), rtol=0, atol=0)
    assert len(used) == 1
    (ckpt,) = used
    assert ckpt.config == CheckpointConfig() and ckpt.group is None
    assert ckpt.buffers is None and ckpt._storage.offload is None and ckpt.profiler is None
    assert ckpt.tracker.get_states() == {}


def test_input_modified_in_place_after_forward_is_an_error() -> None:
    x = _x()
    hidden = x * 1
    y = checkpoint(OneInput(), hidden)
    with torch.no_grad():
        hidden.add_(1)
    with pytest.raises(RuntimeError, match="modified in place"):
        y.sum().backward()


def test_second_backward_through_a_region_is_an_error() -> None:
    y = checkpoint(OneInput(), _x())
    y.sum().backward(retain_graph=True)
    with pytest.raises(GraphCkptError, match="retain_graph"):
        y.sum().backward()


def test_bad_arguments() -> None:
    with pytest.raises(TypeError, match="callable"):
        checkpoint(3, _x())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="CheckpointConfig"):
        Checkpointer({"profile": True})  # type: ignore[arg-type]
    with pytest.warns(UserWarning, match="no process group"):
        Checkpointer(CheckpointConfig(partition_activations=True))


def test_synchronize_checkpoint_boundary_syncs_cuda_regions_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[object] = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    ckpt = Checkpointer(CheckpointConfig(synchronize_checkpoint_boundary=True))
    with ckpt._phase(nn.ReLU(), "forward", torch.device("cuda", 0)):
        assert len(calls) == 1
    assert calls == [torch.device("cuda", 0)] * 2
    y = ckpt(OneInput(), _x())
    y.sum().backward()
    assert len(calls) == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_dropout_on_cuda_replays_the_cuda_rng_state() -> None:
    module = nn.Sequential(nn.Linear(HIDDEN, HIDDEN), nn.Dropout(0.5)).cuda()
    x = torch.randn(4, HIDDEN, device="cuda", requires_grad=True)
    ckpt = Checkpointer(CheckpointConfig(synchronize_checkpoint_boundary=True))
    torch.cuda.manual_seed(3)
    want = _step(lambda f, *a: f(*a), module, (x,), {})
    torch.cuda.manual_seed(3)
    got = _step(ckpt, module, (x,), {})
    _assert_same(got, want)


def test_docstring_examples_run() -> None:
    # importlib: the package re-exports names that shadow some of its submodules.
    result = doctest.testmod(importlib.import_module("graphckpt.checkpoint"))
    assert result.attempted > 0 and result.failed == 0


def test_region_with_nothing_to_differentiate_saves_nothing() -> None:
    ckpt = Checkpointer(CheckpointConfig(cpu_checkpointing=True))
    frozen = OneInput().requires_grad_(False)
    y = ckpt(frozen, _x(requires_grad=False))
    assert not y.requires_grad and ckpt.num_pending_regions == 0


@pytest.mark.parametrize("mode", MODES)
def test_nested_checkpoints(mode: str) -> None:
    run = _runner(mode)
    inner, outer = OneInput(), OneInput()
    module = nn.ModuleList([inner, outer])

    class Nested(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = module

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return run(inner, outer(x))

    torch.manual_seed(0)
    x = _x()
    want = _step(lambda f, *a: inner(outer(*a)), Nested(), (x,), {})
    got = _step(run, Nested(), (x,), {})
    _assert_same(got, want)


def test_autograd_grad_through_a_reentrant_region_is_a_clear_error() -> None:
    layer = OneInput()
    x = _x()
    with pytest.raises(GraphCkptError, match="non_reentrant"):
        torch.autograd.grad(checkpoint(layer, x).sum(), x)
    assert layer.linear.weight.grad is None
