"""Contiguous buffers for saved activations: allocated once, one row per checkpointed layer.

Saving each layer's input into a fresh allocation fragments device memory over a step.
:class:`ContiguousBuffers` allocates, for each saved-input position and shape, one buffer of
``number_checkpoints`` rows on first use, and reuses it every step after. A region takes a free
row (:meth:`ContiguousBuffers.acquire`) in forward and gives it back after its backward.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from graphckpt.errors import GraphCkptError

__all__ = ["BufferedTensor", "ContiguousBuffers", "SlotLease"]

_Key = tuple[int, torch.dtype, torch.device, int]


class SlotLease:
    """One region's row in every buffer; returned on :meth:`release` or when garbage collected."""

    def __init__(self, pool: ContiguousBuffers, slot: int, generation: int) -> None:
        self.slot = slot
        self._pool = pool
        self._generation = generation
        self._finalizer = weakref.finalize(self, pool._free, slot, generation)

    @property
    def valid(self) -> bool:
        """False once released, or after :meth:`ContiguousBuffers.reset` reclaimed the row."""
        return self._finalizer.alive and self._generation == self._pool.generation

    def release(self) -> None:
        """Gives the row back (idempotent)."""
        self._finalizer()


@dataclass(frozen=True)
class BufferedTensor:
    """Where a saved tensor lies: the buffer key and the tensor's shape."""

    key: _Key
    shape: torch.Size

    @property
    def nbytes(self) -> int:
        """Bytes of the row this tensor occupies."""
        return self.key[3] * torch.empty((), dtype=self.key[1]).element_size()


class ContiguousBuffers:
    """Buffers of ``num_slots`` rows, allocated once per (position, dtype, device, size).

    Args:
        num_slots: how many regions may hold saved inputs at once.
        host: keep the buffers in host memory (pinned when the tensors come from CUDA).

    Example:
        >>> pool = ContiguousBuffers(2)
        >>> lease = pool.acquire()
        >>> saved = pool.store(lease, 0, torch.ones(3))
        >>> pool.load(lease, saved).tolist()
        [1.0, 1.0, 1.0]
    """

    def __init__(self, num_slots: int, *, host: bool = False) -> None:
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        self.num_slots = num_slots
        self.host = host
        self.generation = 0
        self.num_allocations = 0
        self._buffers: dict[_Key, torch.Tensor] = {}
        self._free_slots = list(range(num_slots))

    def acquire(self) -> SlotLease:
        """Takes a free row for one region.

        Raises:
            GraphCkptError: every row is held by a region whose backward has not run.
        """
        if not self._free_slots:
            raise GraphCkptError(
                f"all number_checkpoints={self.num_slots} contiguous buffer rows hold the saved "
                "inputs of regions whose backward has not run yet; raise number_checkpoints to "
                "the number of checkpointed regions per step, or call reset() between forwards "
                "that have no backward"
            )
        return SlotLease(self, self._free_slots.pop(0), self.generation)

    def _free(self, slot: int, generation: int) -> None:
        if generation == self.generation:
            self._free_slots.append(slot)
            self._free_slots.sort()

    def reset(self) -> None:
        """Frees every row; regions still holding one fail clearly in their backward."""
        self.generation += 1
        self._free_slots = list(range(self.num_slots))

    @property
    def nbytes(self) -> int:
        """Bytes allocated by all buffers."""
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def _buffer(self, key: _Key) -> torch.Tensor:
        if key not in self._buffers:
            _, dtype, device, numel = key
            where = torch.device("cpu") if self.host else device
            pin = self.host and device.type == "cuda"
            self._buffers[key] = torch.empty(
                (self.num_slots, numel), dtype=dtype, device=where, pin_memory=pin
            )
            self.num_allocations += 1
        return self._buffers[key]

    def store(self, lease: SlotLease, position: int, tensor: torch.Tensor) -> BufferedTensor:
        """Copies ``tensor`` into the lease's row of the buffer for ``position``.

        Args:
            lease: the region's row, from :meth:`acquire`.
            position: the index of this tensor among the region's buffered inputs.
            tensor: the tensor to save.

        Returns:
            The handle :meth:`load` reads it back with.
        """
        tensor = tensor.detach()
        key: _Key = (position, tensor.dtype, tensor.device, tensor.numel())
        self._buffer(key)[lease.slot].copy_(tensor.reshape(-1))
        return BufferedTensor(key=key, shape=tensor.shape)

    def load(self, lease: SlotLease, saved: BufferedTensor) -> torch.Tensor:
        """Returns the saved tensor, a view of the buffer on the tensor's original device.

        Raises:
            GraphCkptError: the row was reclaimed by :meth:`reset` or released.
        """
        if not lease.valid:
            raise GraphCkptError(
                "this region's contiguous buffer row was reclaimed (reset() ran, or its backward "
                "already ran) before its backward; call reset() only when no backward is pending"
            )
        buffer = self._buffers[saved.key]
        # A tensor of its own on the buffer's memory, not a view: views share the buffer's
        # version counter, so another region storing its row would trip autograd's check on
        # this one (a nested checkpoint's forward runs while this region is recomputed).
        row = torch.empty(0, dtype=buffer.dtype, device=buffer.device)
        row.set_(buffer.untyped_storage(), lease.slot * buffer.shape[1], saved.shape)
        device = saved.key[2]
        return row if row.device == device else row.to(device, non_blocking=True)
