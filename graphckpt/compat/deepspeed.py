"""``deepspeed.checkpointing``'s names and signatures, on graphckpt's runtime.

Code written for DeepSpeed runs by changing its import to
``from graphckpt.compat import deepspeed as checkpointing``. DeepSpeed's API is global: its
functions take no object to act on, so this module holds one default
:class:`graphckpt.Checkpointer` and RNG tracker, configured by :func:`configure`. It is the only
module of graphckpt with module-level state; new code should own a Checkpointer instead.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist

from graphckpt.checkpoint import Checkpointer
from graphckpt.config import CheckpointConfig
from graphckpt.rng import (
    MODEL_PARALLEL_RNG,
    RNGStatesTracker,
    model_parallel_manual_seed,
    tensor_parallel_seed,
)

__all__ = [
    "CudaRNGStatesTracker",
    "checkpoint",
    "configure",
    "get_cuda_rng_tracker",
    "is_configured",
    "model_parallel_cuda_manual_seed",
    "model_parallel_reconfigure_tp_seed",
    "non_reentrant_checkpoint",
    "partition_activations_in_checkpoint",
    "reset",
    "set_num_layers",
]

CudaRNGStatesTracker = RNGStatesTracker
"""DeepSpeed's name for the RNG tracker; it picks CUDA when available, else CPU."""


class _DefaultState:
    """The state DeepSpeed keeps in globals: the configured Checkpointer, its mpu and tracker."""

    def __init__(self) -> None:
        self.tracker = RNGStatesTracker()
        self.mpu: Any = None
        self.checkpointer: Checkpointer | None = None
        self.configured = False

    def get(self) -> Checkpointer:
        if self.checkpointer is None:
            self.checkpointer = Checkpointer(tracker=self.tracker)
        return self.checkpointer

    def rebuild(self, config: CheckpointConfig) -> None:
        self.checkpointer = Checkpointer(
            config, _model_parallel_group(self.mpu), tracker=self.tracker
        )


_STATE = _DefaultState()


def _model_parallel_group(mpu: Any) -> dist.ProcessGroup | None:
    if mpu is None:
        return None
    if hasattr(mpu, "get_tensor_model_parallel_group"):
        return mpu.get_tensor_model_parallel_group()
    return mpu.get_model_parallel_group()


def _model_parallel_rank(mpu: Any) -> int:
    if mpu is None:
        return 0
    if hasattr(mpu, "get_tensor_model_parallel_rank"):
        return int(mpu.get_tensor_model_parallel_rank())
    return int(mpu.get_model_parallel_rank())


def configure(
    mpu_: Any,
    deepspeed_config: Mapping[str, Any] | str | os.PathLike[str] | None = None,
    partition_activations: bool | None = None,
    contiguous_checkpointing: bool | None = None,
    num_checkpoints: int | None = None,
    checkpoint_in_cpu: bool | None = None,
    synchronize: bool | None = None,
    profile: bool | None = None,
) -> None:
    """Configures the default Checkpointer, as ``deepspeed.checkpointing.configure`` does.

    Args:
        mpu_: DeepSpeed/Megatron's model-parallel unit (``get_model_parallel_group()``,
            ``get_model_parallel_rank()``, ``get_model_parallel_world_size()``), or None.
        deepspeed_config: a DeepSpeed config dict or JSON path whose
            ``activation_checkpointing`` section gives the base options.
        partition_activations: overrides ``partition_activations``.
        contiguous_checkpointing: overrides ``contiguous_memory_optimization`` (which, unlike
            DeepSpeed's, does not need partitioning).
        num_checkpoints: overrides ``number_checkpoints``.
        checkpoint_in_cpu: overrides ``cpu_checkpointing``.
        synchronize: overrides ``synchronize_checkpoint_boundary``.
        profile: overrides ``profile``.

    Example:
        >>> configure(None, checkpoint_in_cpu=True)
        >>> is_configured()
        True
        >>> reset()
    """
    config = (
        CheckpointConfig()
        if deepspeed_config is None
        else CheckpointConfig.from_deepspeed(deepspeed_config)
    )
    overrides: dict[str, Any] = {
        "partition_activations": partition_activations,
        "contiguous_memory_optimization": contiguous_checkpointing,
        "number_checkpoints": num_checkpoints,
        "cpu_checkpointing": checkpoint_in_cpu,
        "synchronize_checkpoint_boundary": synchronize,
        "profile": profile,
    }
    config = dataclasses.replace(config, **{k: v for k, v in overrides.items() if v is not None})
    _STATE.mpu = mpu_
    _STATE.rebuild(config)
    _STATE.configured = True


def is_configured() -> bool:
    """Whether :func:`configure` has run."""
    return _STATE.configured


def checkpoint(function: Callable[..., Any], *args: Any) -> Any:
    """Runs ``function(*args)`` as a checkpointed region of the default Checkpointer.

    Args:
        function: the region.
        *args: its arguments (tensors, None, numbers, tuples).

    Returns:
        What ``function`` returns.

    Example:
        >>> layer = torch.nn.Linear(4, 4)
        >>> checkpoint(layer, torch.randn(2, 4, requires_grad=True)).shape
        torch.Size([2, 4])
    """
    return _STATE.get()(function, *args)


def non_reentrant_checkpoint(function: Callable[..., Any], *args: Any) -> Any:
    """Like :func:`checkpoint`, recorded by autograd with saved-tensor hooks.

    Args:
        function: the region.
        *args: its arguments.

    Returns:
        What ``function`` returns.
    """
    return _STATE.get().non_reentrant(function, *args)


def reset() -> None:
    """Frees the contiguous buffers' rows (for forwards without backward, as in evaluation)."""
    if _STATE.checkpointer is not None:
        _STATE.checkpointer.reset()


def _reconfigure(**changes: Any) -> None:
    _STATE.rebuild(dataclasses.replace(_STATE.get().config, **changes))


def set_num_layers(nlayers: int) -> None:
    """Sets ``number_checkpoints``, the rows of the contiguous buffers.

    Args:
        nlayers: the number of checkpointed layers per step.
    """
    _reconfigure(number_checkpoints=nlayers)


def partition_activations_in_checkpoint(partition_activation: bool) -> None:
    """Turns partitioned saves on or off for later checkpoints.

    Args:
        partition_activation: the new ``partition_activations``.
    """
    _reconfigure(partition_activations=partition_activation)


def get_cuda_rng_tracker() -> RNGStatesTracker:
    """Returns the default RNG tracker, whose states checkpoint recomputes replay."""
    return _STATE.tracker


def model_parallel_cuda_manual_seed(seed: int) -> None:
    """Seeds the default generator and the tracker's model-parallel state, as DeepSpeed does.

    The tensor-parallel rank comes from the mpu given to :func:`configure` (0 without one).

    Args:
        seed: the base seed.
    """
    model_parallel_manual_seed(seed, _model_parallel_rank(_STATE.mpu), tracker=_STATE.tracker)


def model_parallel_reconfigure_tp_seed(seed: int) -> None:
    """Reseeds only the tracker's model-parallel state with ``seed + 2718 + tp_rank``.

    Args:
        seed: the base seed.
    """
    tracker = _STATE.tracker
    with tracker.fork(MODEL_PARALLEL_RNG):
        generator = (
            torch.cuda.default_generators[tracker.device.index or 0]
            if tracker.device.type == "cuda"
            else torch.default_generator
        )
        generator.manual_seed(tensor_parallel_seed(seed, _model_parallel_rank(_STATE.mpu)))
