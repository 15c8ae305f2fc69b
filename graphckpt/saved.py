"""The saved inputs of one checkpoint region: how they are stored, and how they come back.

A region's forward hands its tensor inputs to :class:`SavedInputs`, which keeps each one whole,
as this rank's partition (:mod:`graphckpt.partition`), in host memory (:mod:`graphckpt.offload`),
in a contiguous buffer row (:mod:`graphckpt.buffers`), or a combination, as the config says.
Backward calls :meth:`SavedInputs.restore`. :class:`graphckpt.Checkpointer` owns the storage.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist

from graphckpt.buffers import BufferedTensor, ContiguousBuffers, SlotLease
from graphckpt.errors import GraphCkptError
from graphckpt.offload import OffloadedTensor, OffloadEngine
from graphckpt.partition import (
    PartitionedTensor,
    gather_tensor,
    group_rank_and_size,
    partition_tensor,
    should_partition,
)

__all__ = ["RELEASED_ATTR", "SavedInputs", "Storage", "check_not_released"]

RELEASED_ATTR = "_graphckpt_released"
"""Attribute set on a tensor whose storage a checkpoint released (``release_inputs=True``)."""


@dataclass(frozen=True)
class Storage:
    """Where a region's saved inputs go; built once by the Checkpointer from its config."""

    group: dist.ProcessGroup | None
    offload: OffloadEngine | None
    buffers: ContiguousBuffers | None

    @property
    def world_size(self) -> int:
        """Ranks the saved inputs are partitioned over (1: not partitioned)."""
        return group_rank_and_size(self.group)[1]


@dataclass
class _Saved:
    """One saved tensor: what is held (``payload`` or a handle) and how to rebuild it."""

    requires_grad: bool
    version: int
    source: torch.Tensor | None  # the caller's tensor when kept whole, for the in-place check
    payload: torch.Tensor | None = None
    partition: PartitionedTensor | None = None
    offloaded: OffloadedTensor | None = None
    buffered: BufferedTensor | None = None

    @property
    def released_as(self) -> str | None:
        if self.partition is not None:
            return "partitioned"
        if self.offloaded is not None:
            return "offloaded"
        if self.buffered is not None:
            return "moved to a contiguous buffer"
        return None


def check_not_released(tensor: torch.Tensor, where: str) -> None:
    """Raises if ``tensor`` is a placeholder left by a checkpoint that released its storage.

    Args:
        tensor: an input about to be checkpointed.
        where: how to name it in the message (``"argument 0"``).

    Raises:
        GraphCkptError: (a RuntimeError) the tensor's data was released.

    Example:
        >>> check_not_released(torch.ones(2), "args[0]")  # an ordinary tensor passes
    """
    how = getattr(tensor, RELEASED_ATTR, None)
    if how is not None:
        raise GraphCkptError(
            f"{where} of checkpoint() is a tensor that a previous checkpoint {how} and then "
            "released (release_inputs=True): it is now an empty placeholder, not its data. "
            "Pass a tensor that no checkpoint has released, or set release_inputs=False for "
            "the checkpoint that released it"
        )


class SavedInputs:
    """The tensor inputs of one region, stored as ``storage`` says until its backward.

    Args:
        storage: where to put the floating-point inputs.
        tensors: the region's distinct tensor inputs.
    """

    def __init__(self, storage: Storage, tensors: Sequence[torch.Tensor]) -> None:
        self._storage = storage
        self._lease: SlotLease | None = None
        if storage.buffers is not None and any(t.is_floating_point() for t in tensors):
            self._lease = storage.buffers.acquire()
        self._items = [self._save(i, t) for i, t in enumerate(tensors)]
        self.consumed = False

    def _save(self, position: int, tensor: torch.Tensor) -> _Saved:
        saved = _Saved(requires_grad=tensor.requires_grad, version=tensor._version, source=None)
        if not tensor.is_floating_point():
            saved.payload, saved.source = tensor.detach(), tensor
            return saved
        payload = tensor.detach()
        storage = self._storage
        if should_partition(tensor, storage.world_size):
            part = partition_tensor(tensor, storage.group)
            payload = part.shard
            # Only the metadata stays here, so an offloaded shard leaves no device copy behind.
            saved.partition = dataclasses.replace(part, shard=part.shard.new_empty(0))
        if storage.buffers is not None and self._lease is not None:
            saved.buffered = storage.buffers.store(self._lease, position, payload)
        elif storage.offload is not None:
            saved.offloaded = storage.offload.offload(payload)
        else:
            saved.payload = payload
            saved.source = tensor if saved.partition is None else None
        return saved

    def release_sources(self, tensors: Sequence[torch.Tensor]) -> None:
        """Frees the storage of intermediate inputs that are no longer held whole here.

        Only non-leaf tensors that are not views are released: their data becomes an empty
        placeholder, marked so that a later checkpoint refuses it.
        """
        for tensor, saved in zip(tensors, self._items):
            how = saved.released_as
            if how is None or tensor.is_leaf or tensor._base is not None:
                continue
            tensor.data = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
            setattr(tensor, RELEASED_ATTR, how)

    def nbytes(self, where: Literal["all", "device", "host"] = "all") -> int:
        """Bytes held for these inputs: ``host`` counts offloaded copies and host buffers."""
        if self.consumed:
            return 0
        total = 0
        host_buffers = self._storage.buffers is not None and self._storage.buffers.host
        for saved in self._items:
            if saved.offloaded is not None:
                on_host, size = True, saved.offloaded.nbytes
            elif saved.buffered is not None:
                on_host, size = host_buffers, saved.buffered.nbytes
            else:
                assert saved.payload is not None
                on_host, size = False, saved.payload.numel() * saved.payload.element_size()
            if where == "all" or (where == "host") == on_host:
                total += size
        return total

    def prefetch(self) -> None:
        """Starts bringing offloaded inputs back to the device (CUDA only)."""
        if self.consumed or self._storage.offload is None:
            return
        for saved in self._items:
            if saved.offloaded is not None:
                self._storage.offload.prefetch(saved.offloaded)

    def restore(self) -> list[torch.Tensor]:
        """Returns the inputs as they were in forward, detached, gathered and on their device.

        Raises:
            GraphCkptError: a second backward through the region (its inputs were freed).
            RuntimeError: an input kept whole was modified in place after the forward.
        """
        if self.consumed:
            raise GraphCkptError(
                "backward ran twice through one checkpoint region; its saved inputs were freed "
                "after the first. Checkpointed regions do not support retain_graph=True"
            )
        return [self._restore(i, s) for i, s in enumerate(self._items)]

    def _restore(self, position: int, saved: _Saved) -> torch.Tensor:
        if saved.source is not None and saved.source._version != saved.version:
            raise RuntimeError(
                f"input {position} of a checkpointed region was modified in place after its "
                f"forward (version {saved.version} -> {saved.source._version}); the recompute "
                "would read wrong values. Clone the tensor before modifying it"
            )
        storage = self._storage
        if saved.buffered is not None:
            assert storage.buffers is not None and self._lease is not None
            payload = storage.buffers.load(self._lease, saved.buffered)
        elif saved.offloaded is not None:
            assert storage.offload is not None
            payload = storage.offload.reload(saved.offloaded)
        else:
            assert saved.payload is not None
            payload = saved.payload
        if saved.partition is not None:
            device = saved.partition.shard.device
            return gather_tensor(saved.partition, payload.to(device))
        return payload

    def free(self) -> None:
        """Drops everything held, and gives the buffer row back."""
        self.consumed = True
        self._items = [
            _Saved(requires_grad=s.requires_grad, version=s.version, source=None)
            for s in self._items
        ]
        if self._lease is not None:
            self._lease.release()

    @property
    def requires_grad(self) -> list[bool]:
        """Whether each input required grad at forward."""
        return [s.requires_grad for s in self._items]
