"""Offload ops that rewritten graphs call: tensor in, tensor out, built on OffloadEngine.

Graph values must be tensors, so the host copy itself flows through the graph and the copy's
in-flight state (CUDA events, the prefetched device tensor) stays in this object, keyed weakly
by the host tensor. The object is owned by the module whose graphs call it; the rewriter uses
its bound methods as call targets.
"""

from __future__ import annotations

import torch
from torch.utils.weak import WeakIdKeyDictionary

from graphckpt.offload import OffloadedTensor, OffloadEngine

__all__ = ["GraphOffloader"]


class GraphOffloader:
    """``offload`` in forward, ``prefetch`` ahead of use and ``reload`` at use in backward.

    On CUDA the copies run on a side stream into pinned memory and overlap compute. On CPU the
    host copy is the tensor itself (there is no other memory to move it to).

    Example:
        >>> off = GraphOffloader()
        >>> host = off.offload(torch.ones(3))
        >>> off.reload(off.prefetch(host)).sum().item()
        3.0
    """

    def __init__(self) -> None:
        self.engine = OffloadEngine()
        self._handles: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def offload(self, tensor: torch.Tensor) -> torch.Tensor:
        """Start copying ``tensor`` to host memory; returns the host tensor."""
        if tensor.device.type != "cuda":
            return tensor
        handle = self.engine.offload(tensor)
        self._handles[handle.host] = handle
        return handle.host

    def prefetch(self, host: torch.Tensor) -> torch.Tensor:
        """Start copying ``host`` back to its device ahead of use; returns ``host``."""
        handle: OffloadedTensor | None = self._handles.get(host)
        if handle is not None:
            self.engine.prefetch(handle)
        return host

    def reload(self, host: torch.Tensor) -> torch.Tensor:
        """The tensor on its device, ready on the current stream."""
        handle: OffloadedTensor | None = self._handles.pop(host, None)
        if handle is None:
            return host
        return self.engine.reload(handle)
