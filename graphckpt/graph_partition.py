"""Partitioned-save ops that rewritten graphs call: each rank keeps a slice, backward gathers.

For tensor-parallel ranks that compute identical activations, a saved tensor needs only
1/world of its bytes per rank between forward and backward. ``partition`` keeps this rank's
flat slice (``graphckpt/partition.py``); ``gather`` all-gathers the slices back into the whole
tensor just before backward reads it. The object is owned by the module whose graphs call it
(with its process group); the rewriter uses its bound methods as call targets.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.distributed as dist
from torch._prims_common import (
    is_non_overlapping_and_dense_or_false as is_non_overlapping_and_dense,
)
from torch.utils.weak import WeakIdKeyDictionary

from graphckpt.partition import PartitionedTensor, group_rank_and_size, partition_tensor

__all__ = ["GraphPartitioner", "in_memory_order"]


def in_memory_order(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``'s elements as a flat view in the order they lie in memory.

    A transposed or permuted tensor is flattened without a copy, so :meth:`GraphPartitioner.
    gather` can rebuild it with its own strides (backward's view ops expect them).

    Raises:
        ValueError: the tensor has gaps or overlaps in memory (not partitionable).

    Example:
        >>> in_memory_order(torch.arange(6.0).reshape(2, 3).t()).tolist()
        [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    """
    if not is_non_overlapping_and_dense(tensor):
        raise ValueError(
            "in_memory_order: the tensor has gaps or overlapping elements in memory "
            f"(shape {tuple(tensor.shape)}, stride {tensor.stride()}); keep it whole"
        )
    return tensor.as_strided((tensor.numel(),), (1,), tensor.storage_offset())


@dataclasses.dataclass(frozen=True)
class _Layout:
    part: PartitionedTensor  # shape, group and world size; its ``shard`` is an empty stand-in
    stride: tuple[int, ...]


class GraphPartitioner:
    """``partition`` in forward and ``gather`` at first use in backward, over one group.

    Every rank of the group must run the same graphs (``gather`` is a collective). Backward
    must run once per forward (``retain_graph`` cannot gather a slice twice).

    Example:
        >>> parts = GraphPartitioner(None)  # no group: one rank keeps everything
        >>> x = torch.arange(6.0).reshape(2, 3).t()
        >>> y = parts.gather(parts.partition(x))
        >>> torch.equal(x, y), y.stride() == x.stride()
        (True, True)
    """

    def __init__(self, group: Any) -> None:
        self.group = group
        self._layouts: WeakIdKeyDictionary = WeakIdKeyDictionary()

    @property
    def world_size(self) -> int:
        """Number of ranks that share the saved tensors."""
        return group_rank_and_size(self.group)[1]

    def partition(self, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's slice of ``tensor`` in memory order (a copy; the whole can be freed)."""
        part = partition_tensor(in_memory_order(tensor.detach()), self.group)
        # The entry must not hold the slice itself: a forward whose backward never runs (a
        # planning call, an abandoned step) would keep it alive through this object forever.
        stand_in = dataclasses.replace(part, shard=part.shard.new_empty(0), shape=tensor.shape)
        self._layouts[part.shard] = _Layout(stand_in, tuple(tensor.stride()))
        return part.shard

    def gather(self, shard: torch.Tensor) -> torch.Tensor:
        """The whole tensor, with its original strides, all-gathered from every rank's slice."""
        layout: _Layout | None = self._layouts.pop(shard, None)
        if layout is None:
            raise RuntimeError(
                "graphckpt: a partitioned activation was gathered twice or never partitioned; "
                "backward with retain_graph=True is not supported with tp_group (run one "
                "backward per forward)"
            )
        part, numel = layout.part, layout.part.numel
        out = shard if part.world_size == 1 else _all_gather(shard, part.group, part.world_size)
        return out[:numel].as_strided(part.shape, layout.stride)


def _all_gather(shard: torch.Tensor, group: Any, world_size: int) -> torch.Tensor:
    """Every rank's ``shard``, concatenated in rank order into one new buffer.

    gloo's all-gather stages the whole result in a second buffer of its own (a hidden full
    copy at the peak), so on gloo each rank's slice is broadcast straight into its place in
    the output instead; other backends (NCCL) gather in place.
    """
    n = shard.numel()
    out = torch.empty(n * world_size, dtype=shard.dtype, device=shard.device)
    if dist.get_backend(group) != "gloo":
        dist.all_gather_into_tensor(out, shard, group=group)
        return out
    rank = dist.get_rank(group)
    out[rank * n : (rank + 1) * n].copy_(shard)
    for r in range(world_size):
        dist.broadcast(out[r * n : (r + 1) * n], dist.get_global_rank(group, r), group=group)
    return out
