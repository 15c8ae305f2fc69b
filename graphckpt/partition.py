"""Partitioned saves: keep one rank's slice of a replicated activation, all-gather it back.

Tensor-parallel ranks hold identical copies of a layer's input. A checkpoint region that saves
it needs only 1/world of it per rank: :func:`partition_tensor` keeps this rank's flat slice
(padding the tail when the size does not divide), :func:`gather_tensor` rebuilds the whole tensor
in backward with one all-gather.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = [
    "MIN_PARTITION_ELEMENTS_PER_RANK",
    "PartitionedTensor",
    "gather_tensor",
    "group_rank_and_size",
    "partition_tensor",
    "should_partition",
]

MIN_PARTITION_ELEMENTS_PER_RANK = 64
"""A tensor with fewer than ``world * 64`` elements stays whole: its slice would save under
256 bytes per rank at fp32, less than what the all-gather costs in latency."""


@dataclass(frozen=True)
class PartitionedTensor:
    """This rank's slice of a tensor that every rank of ``group`` holds identically.

    ``shard`` holds ``ceil(numel / world)`` elements; the last rank's tail is zero padding.
    """

    shard: torch.Tensor
    shape: torch.Size
    numel: int
    world_size: int
    group: dist.ProcessGroup | None

    @property
    def nbytes(self) -> int:
        """Bytes this rank keeps."""
        return self.shard.numel() * self.shard.element_size()


def group_rank_and_size(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """Returns this process's rank in ``group`` and the group's size.

    Args:
        group: a process group, or ``None``.

    Returns:
        ``(rank, world_size)``; ``(0, 1)`` without a group or without torch.distributed.

    Example:
        >>> group_rank_and_size(None)
        (0, 1)
    """
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def should_partition(tensor: torch.Tensor, world_size: int) -> bool:
    """Whether a saved tensor is worth partitioning over ``world_size`` ranks.

    Floating-point tensors of at least ``world_size * MIN_PARTITION_ELEMENTS_PER_RANK``
    elements are; bool and integer tensors (masks, indices) and small tensors stay whole.

    Example:
        >>> should_partition(torch.zeros(1024), 2), should_partition(torch.zeros(8), 2)
        (True, False)
    """
    return (
        world_size > 1
        and tensor.is_floating_point()
        and tensor.numel() >= world_size * MIN_PARTITION_ELEMENTS_PER_RANK
    )


def partition_tensor(tensor: torch.Tensor, group: dist.ProcessGroup | None) -> PartitionedTensor:
    """Keeps this rank's flat slice of ``tensor`` (a copy: the original can be freed).

    Args:
        tensor: a tensor identical on every rank of ``group``.
        group: the ranks that share it; ``None`` or a one-rank group keeps the whole tensor.

    Returns:
        The slice and what :func:`gather_tensor` needs to rebuild the tensor.

    Example:
        >>> p = partition_tensor(torch.arange(6.0), None)
        >>> gather_tensor(p).tolist()
        [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    """
    rank, world = group_rank_and_size(group)
    flat = tensor.detach().reshape(-1)
    numel = flat.numel()
    chunk = -(-numel // world)
    start = min(rank * chunk, numel)
    stop = min(start + chunk, numel)
    shard = torch.empty(chunk, dtype=flat.dtype, device=flat.device)
    shard[: stop - start].copy_(flat[start:stop])
    if stop - start < chunk:
        shard[stop - start :].zero_()
    return PartitionedTensor(
        shard=shard, shape=tensor.shape, numel=numel, world_size=world, group=group
    )


def gather_tensor(part: PartitionedTensor, shard: torch.Tensor | None = None) -> torch.Tensor:
    """All-gathers the slices of every rank and returns the whole tensor, unpadded.

    Every rank of the group must call it for the same tensor (backward does, in the same order
    on every rank).

    Args:
        part: what :func:`partition_tensor` returned on this rank.
        shard: the slice to send, when it has moved since (e.g. back from host memory);
            defaults to ``part.shard``.

    Returns:
        A new tensor of ``part.shape`` on the shard's device.

    Example:
        >>> part = partition_tensor(torch.ones(2, 3), None)
        >>> gather_tensor(part, part.shard * 2).tolist()
        [[2.0, 2.0, 2.0], [2.0, 2.0, 2.0]]
    """
    local = part.shard if shard is None else shard
    if part.world_size == 1:
        return local[: part.numel].reshape(part.shape).clone()
    pieces = [torch.empty_like(local) for _ in range(part.world_size)]
    dist.all_gather(pieces, local.contiguous(), group=part.group)
    return torch.cat(pieces)[: part.numel].reshape(part.shape)
