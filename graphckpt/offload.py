"""CPU offload of saved activations: copy to host in forward, back to the device in backward.

On CUDA the copies run on a side stream into pinned host memory, so they overlap compute, and
:meth:`OffloadEngine.prefetch` starts the copy back before backward needs the tensor. On CPU the
"host copy" is a plain copy, which keeps the code path (and its tests) the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["OffloadEngine", "OffloadedTensor"]


@dataclass
class OffloadedTensor:
    """A tensor's host copy, plus the state of its copies in flight.

    ``ready`` marks the end of the device-to-host copy, ``prefetched`` / ``prefetch_ready`` the
    device copy started by :meth:`OffloadEngine.prefetch` (CUDA only).
    """

    host: torch.Tensor
    device: torch.device
    ready: torch.cuda.Event | None = None
    prefetched: torch.Tensor | None = None
    prefetch_ready: torch.cuda.Event | None = None

    @property
    def nbytes(self) -> int:
        """Bytes held in host memory."""
        return self.host.numel() * self.host.element_size()


class OffloadEngine:
    """Moves tensors to host memory and back, overlapping the copies with compute on CUDA.

    Holds one side stream per CUDA device, created on first use.

    Example:
        >>> engine = OffloadEngine()
        >>> handle = engine.offload(torch.ones(4))
        >>> engine.reload(handle).sum().item()
        4.0
    """

    def __init__(self) -> None:
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    def _side_stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def offload(self, tensor: torch.Tensor) -> OffloadedTensor:
        """Starts copying ``tensor`` to host memory and returns the handle of the copy.

        Args:
            tensor: the tensor to save; on CUDA, its memory is kept from reuse until the copy
                is done, so the caller may drop it at once.

        Returns:
            The handle to pass to :meth:`prefetch` and :meth:`reload`.
        """
        tensor = tensor.detach()
        if tensor.device.type != "cuda":
            return OffloadedTensor(host=tensor.clone(), device=tensor.device)
        device = tensor.device
        stream = self._side_stream(device)
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            host.copy_(tensor, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(stream)
        tensor.record_stream(stream)
        return OffloadedTensor(host=host, device=device, ready=ready)

    def prefetch(self, handle: OffloadedTensor) -> None:
        """Starts copying a handle back to its device, ahead of :meth:`reload` (CUDA only)."""
        if handle.device.type != "cuda" or handle.prefetched is not None:
            return
        stream = self._side_stream(handle.device)
        with torch.cuda.stream(stream):
            if handle.ready is not None:
                stream.wait_event(handle.ready)
            on_device = torch.empty(
                handle.host.shape, dtype=handle.host.dtype, device=handle.device
            )
            on_device.copy_(handle.host, non_blocking=True)
            done = torch.cuda.Event()
            done.record(stream)
        handle.prefetched, handle.prefetch_ready = on_device, done

    def reload(self, handle: OffloadedTensor) -> torch.Tensor:
        """Returns the tensor on its original device, waiting for a prefetch if one started.

        Args:
            handle: what :meth:`offload` returned.

        Returns:
            The tensor, ready to use on the current stream.
        """
        if handle.device.type != "cuda":
            return handle.host
        self.prefetch(handle)
        on_device, done = handle.prefetched, handle.prefetch_ready
        assert on_device is not None and done is not None
        current = torch.cuda.current_stream(handle.device)
        current.wait_event(done)
        on_device.record_stream(current)
        handle.prefetched, handle.prefetch_ready = None, None
        return on_device
