"""Hand-placed checkpointing baselines that graphckpt's plans are compared against.

Each baseline takes a :class:`~benchmarks.models.BenchModel` and returns a new model to train;
the benchmark's own model is never modified.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

from torch import nn
from torch.utils.checkpoint import checkpoint

from benchmarks.models import BenchModel
from graphckpt.checkpoint import Checkpointer
from graphckpt.config import CheckpointConfig

__all__ = ["checkpoint_every_layer_deepspeed", "checkpoint_first_k"]


def _copy_layers(bench: BenchModel, k: int) -> tuple[nn.Module, list[nn.Module]]:
    """A deep copy of ``bench.model`` and the copies of its first ``k`` layers."""
    memo: dict[int, object] = {}
    model = copy.deepcopy(bench.model, memo)
    layers = []
    for index, layer in enumerate(bench.layers[:k]):
        copied = memo.get(id(layer))
        if not isinstance(copied, nn.Module):
            raise ValueError(
                f"{bench.name}: layer {index} ({type(layer).__name__}) is not a submodule of "
                f"the model, so it cannot be checkpointed in a copy of the model"
            )
        layers.append(copied)
    return model, layers


def checkpoint_first_k(bench: BenchModel, k: int) -> nn.Module:
    """A copy of ``bench.model`` whose first ``k`` layers run under ``torch.utils.checkpoint``.

    This is Megatron's "block" recompute method: each of the first ``k`` layers keeps only
    its inputs in forward and recomputes its activations in backward (non-reentrant
    checkpoint). ``k = len(bench.layers)`` checkpoints every layer; ``k = 0`` is a plain copy.
    The RNG state is saved and restored around each recompute, so dropout masks, and hence the
    loss and gradients, equal the plain model's under the same seed. Parameter names are
    unchanged. Layers with BatchNorm update their running statistics a second time during the
    recompute (a property of ``torch.utils.checkpoint``); gradients are unaffected.

    Args:
        bench: the benchmark model; ``bench.layers`` must be submodules of ``bench.model``.
        k: how many leading layers to checkpoint, ``0 <= k <= len(bench.layers)``.

    Returns:
        The checkpointed copy, with the same training mode as ``bench.model``.

    Example:
        >>> from benchmarks.models import bench_gpt
        >>> bench = bench_gpt(batch=2, seq=16, n_layer=2, n_embd=32)
        >>> model = checkpoint_first_k(bench, 2)
        >>> model(*bench.inputs).backward()
    """
    if not 0 <= k <= len(bench.layers):
        raise ValueError(
            f"k must be between 0 and the number of layers {len(bench.layers)}, got {k}"
        )
    model, layers = _copy_layers(bench, k)
    for copied in layers:
        # An instance attribute shadows the class's forward; nn.Module.__call__ then runs the
        # checkpointed call. A partial over the bound method survives deepcopy (it is rebuilt
        # around the copied module), unlike a closure.
        copied.forward = functools.partial(  # type: ignore[method-assign]
            checkpoint, copied.forward, use_reentrant=False
        )
    return model


def _deepspeed_call(ckpt: Checkpointer, forward: Any, *args: Any, **kwargs: Any) -> Any:
    # DeepSpeed's checkpoint takes positional arguments only: keyword ones are bound first.
    return ckpt(functools.partial(forward, **kwargs) if kwargs else forward, *args)


def checkpoint_every_layer_deepspeed(
    bench: BenchModel, config: CheckpointConfig | None = None
) -> nn.Module:
    """A copy of ``bench.model`` whose every layer runs under DeepSpeed-style checkpointing.

    This is what a DeepSpeed user writes (``deepspeed.checkpointing.checkpoint`` around each
    layer), run on graphckpt's own runtime (:class:`graphckpt.Checkpointer`, the engine behind
    ``graphckpt.compat.deepspeed``): each layer keeps only its inputs, saved as the config says,
    and recomputes in backward with the RNG state replayed. The default config is DeepSpeed's
    single-process set: CPU checkpointing and contiguous buffers for ``len(bench.layers)``
    checkpoints (partitioned saves need a tensor-parallel group; pass a config with one). On a
    CPU-only machine the "CPU" copy lives in the same memory, so it lowers nothing there.

    Args:
        bench: the benchmark model.
        config: how saved inputs are stored (None: the set above).

    Returns:
        The checkpointed copy; parameter names are unchanged.

    Example:
        >>> from benchmarks.models import bench_gpt
        >>> bench = bench_gpt(batch=2, seq=16, n_layer=2, n_embd=32)
        >>> checkpoint_every_layer_deepspeed(bench)(*bench.inputs).backward()
    """
    model, layers = _copy_layers(bench, len(bench.layers))
    config = config or CheckpointConfig(
        cpu_checkpointing=True,
        contiguous_memory_optimization=True,
        number_checkpoints=len(layers),
    )
    ckpt = Checkpointer(config)
    for copied in layers:
        copied.forward = functools.partial(  # type: ignore[method-assign]
            _deepspeed_call, ckpt, copied.forward
        )
    return model
