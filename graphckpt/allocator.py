"""Peak memory of one step at the CPU allocator, read from the profiler's memory events.

Measurement side of the pipeline, next to ``memory.py``: unlike its dispatch-mode tracker, this
sees every block c10's CPU allocator hands out, including buffers that inductor-compiled code
allocates directly (``empty_strided_cpu``) and scratch memory inside kernels.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

__all__ = ["AllocatorPeak", "cpu_allocator_peak", "garbage_collection_paused"]


@contextlib.contextmanager
def garbage_collection_paused() -> Iterator[None]:
    """Pause Python's automatic garbage collection for the duration of a measured call.

    A collection that happens to run inside the call frees garbage the call never made (an
    earlier model's reference cycle, say). At the CPU allocator such a free is subtracted when
    its block was allocated under an earlier profile (the profiler remembers its size), so the
    call would read low by that block; on CUDA it lowers ``memory_allocated`` under the peak
    just the same. Frees the call itself causes (refcounts reaching zero) still happen.

    Example:
        >>> with garbage_collection_paused():
        ...     gc.isenabled()
        False
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@dataclass(frozen=True, kw_only=True)
class AllocatorPeak:
    """What the CPU allocator did during one call, relative to when the call started."""

    peak_bytes: int
    """Most bytes allocated at once above the start, over the call."""
    final_bytes: int
    """Bytes still allocated at the end of the call, above the start."""
    num_events: int
    """Allocations and frees the profiler recorded."""


def _memory_deltas(prof: Any) -> list[tuple[int, int]]:
    """``(start_ns, byte delta)`` of each allocator event in ``prof``, in time order.

    At equal timestamps allocations sort before frees, so ties never hide a peak.
    """
    events = prof.profiler.kineto_results.events()
    deltas = [(e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]"]
    deltas.sort(key=lambda d: (d[0], -d[1]))
    return deltas


def cpu_allocator_peak(step: Callable[[], Any]) -> AllocatorPeak:
    """Run ``step()`` once under the profiler and return the CPU allocator's peak above the start.

    ``torch.profiler`` with ``profile_memory=True`` records every allocation and free of c10's
    CPU allocator as a ``[memory]`` event with its byte delta; the running sum of the deltas,
    in time order, is what was allocated above the start, and its maximum is the peak. On
    eager code it equals :class:`graphckpt.LiveTensorTracker`'s count; it also sees memory that
    compiled (inductor) kernels allocate, which no dispatch mode can.

    A block allocated before the call and freed during it is subtracted only when the profiler
    saw it allocated (under an earlier profile); otherwise its size is unknown (the profiler
    warns once) and the step reads high. Free such blocks before the call (set ``.grad`` to None
    outside ``step``) for an exact figure. Automatic garbage collection is paused during the
    call (:func:`garbage_collection_paused`), so garbage from before it is never freed inside.

    Args:
        step: a zero-argument callable, typically forward + backward of a model.

    Returns:
        An :class:`AllocatorPeak` (bytes relative to what was allocated at the start).

    Raises:
        RuntimeError: another profiler is already running in this thread.

    Example:
        >>> import torch
        >>> x = torch.ones(1024)
        >>> def step():
        ...     y = x + x
        ...     del y
        ...     return x * x
        >>> cpu_allocator_peak(step).peak_bytes
        4096
    """
    import torch
    from torch.profiler import ProfilerActivity, profile

    if torch.autograd._profiler_enabled():
        raise RuntimeError(
            "cpu_allocator_peak runs torch.profiler, but a profiler is already running; "
            "measure outside of it"
        )
    with (
        garbage_collection_paused(),
        profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof,
    ):
        step()
    current = peak = 0
    deltas = _memory_deltas(prof)
    for _, delta in deltas:
        current += delta
        peak = max(peak, current)
    return AllocatorPeak(peak_bytes=peak, final_bytes=current, num_events=len(deltas))
