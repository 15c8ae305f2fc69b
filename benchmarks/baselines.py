"""Hand-placed checkpointing baselines that graphckpt's plans are compared against.

Each baseline takes a :class:`~benchmarks.models.BenchModel` and returns a new model to train;
the benchmark's own model is never modified.
"""

from __future__ import annotations

import copy
import functools

from torch import nn
from torch.utils.checkpoint import checkpoint

from benchmarks.models import BenchModel

__all__ = ["checkpoint_first_k"]


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
    memo: dict[int, object] = {}
    model = copy.deepcopy(bench.model, memo)
    for index, layer in enumerate(bench.layers[:k]):
        copied = memo.get(id(layer))
        if not isinstance(copied, nn.Module):
            raise ValueError(
                f"{bench.name}: layer {index} ({type(layer).__name__}) is not a submodule of "
                f"the model, so it cannot be checkpointed in a copy of the model"
            )
        # An instance attribute shadows the class's forward; nn.Module.__call__ then runs the
        # checkpointed call. A partial over the bound method survives deepcopy (it is rebuilt
        # around the copied module), unlike a closure.
        copied.forward = functools.partial(  # type: ignore[method-assign]
            checkpoint, copied.forward, use_reentrant=False
        )
    return model
