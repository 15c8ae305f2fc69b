"""Tests of graphckpt/compat/deepspeed.py: code written against deepspeed.checkpointing runs
unchanged but for its import, with DeepSpeed's names and signatures."""

from __future__ import annotations

import doctest
import importlib
import inspect
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

import graphckpt.compat.deepspeed as ds
from graphckpt.compat import deepspeed as checkpointing  # was: from deepspeed import checkpointing
from tests.graphckpt._two_ranks import run_two_ranks

# The signatures of deepspeed.checkpointing (deepspeed/runtime/activation_checkpointing).
DEEPSPEED_SIGNATURES = {
    "configure": "(mpu_, deepspeed_config=None, partition_activations=None, "
    "contiguous_checkpointing=None, num_checkpoints=None, checkpoint_in_cpu=None, "
    "synchronize=None, profile=None)",
    "is_configured": "()",
    "checkpoint": "(function, *args)",
    "non_reentrant_checkpoint": "(function, *args)",
    "reset": "()",
    "set_num_layers": "(nlayers)",
    "partition_activations_in_checkpoint": "(partition_activation)",
    "get_cuda_rng_tracker": "()",
    "model_parallel_cuda_manual_seed": "(seed)",
    "model_parallel_reconfigure_tp_seed": "(seed)",
}


@pytest.fixture(autouse=True)
def fresh_default_state(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """DeepSpeed's API is global; give each test its own default Checkpointer."""
    monkeypatch.setattr(ds, "_STATE", ds._DefaultState())
    yield


def _unannotated(function: object) -> str:
    sig = inspect.signature(function)  # type: ignore[arg-type]
    params = [p.replace(annotation=inspect.Parameter.empty) for p in sig.parameters.values()]
    return str(sig.replace(parameters=params, return_annotation=inspect.Signature.empty))


@pytest.mark.parametrize("name", sorted(DEEPSPEED_SIGNATURES))
def test_names_and_signatures_match_deepspeed(name: str) -> None:
    assert _unannotated(getattr(checkpointing, name)) == DEEPSPEED_SIGNATURES[name]


def test_tracker_class_has_deepspeed_methods() -> None:
    tracker = checkpointing.CudaRNGStatesTracker()
    for method in ("reset", "get_states", "set_states", "add", "fork"):
        assert callable(getattr(tracker, method))


class Layer(nn.Module):
    """A Megatron-style layer: dropout drawn from the model-parallel RNG state."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        with checkpointing.get_cuda_rng_tracker().fork():
            y = torch.nn.functional.dropout(self.linear(x), 0.3)
        return torch.tanh(y).masked_fill(mask, 0.0)


def _deepspeed_style_step(model: nn.ModuleList, x: torch.Tensor, use_checkpoint: bool) -> None:
    """Training code as written for deepspeed.checkpointing."""
    checkpointing.model_parallel_cuda_manual_seed(1234)
    mask = torch.zeros(16, dtype=torch.bool)
    mask[::4] = True
    h = x
    for layer in model:
        h = checkpointing.checkpoint(layer, h, mask) if use_checkpoint else layer(h, mask)
    h.square().sum().backward()


def _grads(model: nn.ModuleList, x: torch.Tensor, use_checkpoint: bool) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    _deepspeed_style_step(model, x, use_checkpoint)
    assert x.grad is not None
    return [x.grad.clone(), *(p.grad.clone() for p in model.parameters() if p.grad is not None)]


@pytest.mark.parametrize(
    "options",
    [
        {"checkpoint_in_cpu": True},
        {"contiguous_checkpointing": True, "num_checkpoints": 3, "checkpoint_in_cpu": True},
        {"synchronize": True, "profile": True},
    ],
)
def test_deepspeed_style_training_matches_the_plain_call(options: dict) -> None:
    torch.manual_seed(0)
    model = nn.ModuleList([Layer() for _ in range(3)])
    x = torch.randn(4, 16)
    checkpointing.configure(None, **options)
    assert checkpointing.is_configured()
    got = _grads(model, x, use_checkpoint=True)
    want = _grads(model, x, use_checkpoint=False)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_configure_reads_a_deepspeed_config_and_arguments_override_it(tmp_path: Path) -> None:
    path = tmp_path / "ds_config.json"
    section = {"cpu_checkpointing": True, "number_checkpoints": 2, "profile": True}
    path.write_text(json.dumps({"activation_checkpointing": section}))
    checkpointing.configure(None, deepspeed_config=str(path), profile=False)
    config = ds._STATE.get().config
    assert config.cpu_checkpointing and config.number_checkpoints == 2 and not config.profile
    checkpointing.set_num_layers(5)
    assert ds._STATE.get().config.number_checkpoints == 5
    with pytest.warns(UserWarning, match="no process group"):
        checkpointing.partition_activations_in_checkpoint(True)
    assert ds._STATE.get().config.partition_activations
    with pytest.raises(ValueError, match=r"unknown key activation_checkpointing\.cpu_offload"):
        checkpointing.configure(None, {"activation_checkpointing": {"cpu_offload": True}})


def test_unconfigured_checkpoint_uses_the_defaults() -> None:
    assert not checkpointing.is_configured()
    layer = nn.Linear(4, 4)
    x = torch.randn(2, 4, requires_grad=True)
    checkpointing.checkpoint(layer, x).sum().backward()
    y = checkpointing.non_reentrant_checkpoint(layer, x)
    torch.testing.assert_close(y, layer(x), rtol=0, atol=0)
    checkpointing.reset()


def test_reset_frees_contiguous_rows_for_evaluation_forwards() -> None:
    checkpointing.configure(None, contiguous_checkpointing=True, num_checkpoints=1)
    layer = nn.Linear(4, 4)
    x = torch.randn(2, 4, requires_grad=True)
    checkpointing.checkpoint(layer, x)  # a forward whose backward never runs
    checkpointing.reset()
    checkpointing.checkpoint(layer, x).sum().backward()


def test_reconfigure_tp_seed_reseeds_only_the_model_parallel_state() -> None:
    # The tracker is CUDA's when a GPU is present, else the CPU's: draw where it stands in.
    device = checkpointing.get_cuda_rng_tracker().device
    state = torch.cuda.get_rng_state if device.type == "cuda" else torch.get_rng_state
    checkpointing.model_parallel_cuda_manual_seed(1)
    checkpointing.model_parallel_reconfigure_tp_seed(77)
    default = state()
    with checkpointing.get_cuda_rng_tracker().fork():
        drawn = torch.rand(3, device=device)
    generator = torch.Generator(device).manual_seed(77 + 2718)
    torch.testing.assert_close(
        drawn, torch.rand(3, device=device, generator=generator), rtol=0, atol=0
    )
    assert torch.equal(state(), default)


class _MPU:
    """The model-parallel unit DeepSpeed's configure takes, over the whole gloo world."""

    def get_model_parallel_group(self) -> dist.ProcessGroup:
        return dist.group.WORLD

    def get_model_parallel_rank(self) -> int:
        return dist.get_rank()

    def get_model_parallel_world_size(self) -> int:
        return dist.get_world_size()


class PlainLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.linear(x))


def _partition_and_offload(rank: int) -> None:
    torch.manual_seed(0)
    model = nn.ModuleList([PlainLayer() for _ in range(2)])
    x = torch.randn(6, 64)

    def step(use_checkpoint: bool) -> tuple[list[torch.Tensor], int]:
        model.zero_grad(set_to_none=True)
        h = inp = x.clone().requires_grad_()
        for layer in model:
            h = checkpointing.checkpoint(layer, h) if use_checkpoint else layer(h)
        saved = ds._STATE.get().saved_bytes("host")
        h.square().sum().backward()
        assert inp.grad is not None
        return [inp.grad, *(p.grad for p in model.parameters() if p.grad is not None)], saved

    want, _ = step(use_checkpoint=False)
    checkpointing.configure(_MPU(), partition_activations=True, checkpoint_in_cpu=True)
    checkpointing.model_parallel_cuda_manual_seed(42)
    assert ds._STATE.get().tracker.get_states()  # seeded with this rank's offset
    got, host_bytes = step(use_checkpoint=True)
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    assert host_bytes == 2 * (6 * 64 * 4) // 2  # each rank keeps half of each layer's input


@pytest.mark.distributed
def test_partition_and_offload_through_compat_on_two_gloo_ranks() -> None:
    run_two_ranks(_partition_and_offload)


def test_docstring_examples_run() -> None:
    # importlib: the package re-exports names that shadow some of its submodules.
    result = doctest.testmod(importlib.import_module("graphckpt.compat.deepspeed"))
    assert result.attempted > 0 and result.failed == 0
