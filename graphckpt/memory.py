"""Measure the peak memory of one step: what benchmarks and tests compare plans against.

On CUDA this reads the caching allocator's statistics. On CPU there is no allocator statistic:
live tensor storages are tracked through a dispatch mode (``method="tracker"``), or the CPU
allocator's events are read from the profiler (``method="allocator"``, ``allocator.py``), which
also sees memory allocated inside compiled code.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from graphckpt.allocator import cpu_allocator_peak, garbage_collection_paused

__all__ = [
    "LiveTensorTracker",
    "MeasureMethod",
    "peak_memory",
    "resident_bytes",
    "step_peak_bytes",
]

MeasureMethod = Literal["tracker", "allocator"]
_METHODS: tuple[str, ...] = ("tracker", "allocator")


def _storage_key(storage: torch.UntypedStorage) -> int:
    return int(storage._cdata)


class LiveTensorTracker(TorchDispatchMode):
    """Counts the bytes of live tensor storages on one device type, and their peak.

    Storages that exist when the tracker starts are found by scanning Python's live objects for
    tensors on that device (parameters, buffers, inputs, gradients); every storage created by an
    operator while the mode is active is added on creation and removed when it is freed.

    Example:
        >>> x = torch.ones(1024)
        >>> with LiveTensorTracker("cpu") as t:
        ...     y = x * 2
        ...     del y
        ...     z = x + 1
        >>> t.peak_bytes - t.baseline_bytes
        4096
    """

    # Higher-order ops (the RNG save/replay wrappers in rewritten graphs) run through
    # __torch_dispatch__ like any op; their outputs are tracked, their internals are not.
    supports_higher_order_operators = True

    def __init__(self, device_type: str = "cpu") -> None:
        super().__init__()
        self.device_type = device_type
        self._live: dict[int, int] = {}
        self.current_bytes = 0
        self.peak_bytes = 0
        self.baseline_bytes = 0
        self.timeline: list[int] | None = None

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        # Lets torch.compile'd code run under the tracker (Dynamo otherwise skips every frame
        # while a dispatch mode is active); the tracker then sees the ops the compiled code runs.
        return True

    def record_timeline(self) -> LiveTensorTracker:
        """Also keep ``current_bytes`` after every operator in ``self.timeline``."""
        self.timeline = []
        return self

    def __enter__(self) -> LiveTensorTracker:
        self.scan_live_tensors()
        super().__enter__()
        return self

    def scan_live_tensors(self) -> int:
        """Count the storages of every tensor Python can reach now; the baseline, in bytes."""
        gc.collect()
        for obj in gc.get_objects():
            # type() rather than isinstance(): isinstance reads __class__, which trips lazy
            # module attributes (deprecation proxies) that gc also returns.
            if issubclass(type(obj), torch.Tensor):
                self._add(obj)
        self.baseline_bytes = self.current_bytes
        self.peak_bytes = self.current_bytes
        return self.baseline_bytes

    def _add(self, tensor: torch.Tensor) -> None:
        if tensor.device.type != self.device_type or tensor.is_meta:
            return
        if tensor.layout != torch.strided or tensor.is_nested:
            return  # sparse and nested tensors have no single storage to count
        try:
            storage = tensor.untyped_storage()
        except RuntimeError:  # wrapper subclasses without a storage of their own
            return
        if storage.device.type != self.device_type:
            return  # fake tensors (Dynamo's, in graph metadata) claim a device but hold no memory
        key = _storage_key(storage)
        if key in self._live:
            return
        nbytes = storage.nbytes()
        self._live[key] = nbytes
        self.current_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.current_bytes)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.current_bytes -= self._live.pop(key, 0)

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self._add(leaf)
        if self.timeline is not None:
            self.timeline.append(self.current_bytes)
        return out


def _resolve(device: torch.device | str | None, method: str) -> torch.device:
    if method not in _METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, _METHODS))}, got {method!r}")
    if device is not None:
        return torch.device(device)
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _cuda_step_peak(step: Callable[[], Any], dev: torch.device) -> tuple[int, int]:
    """``(allocated before, peak allocated)`` of one step on a CUDA device."""
    gc.collect()
    torch.cuda.synchronize(dev)
    before = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    with garbage_collection_paused():
        step()
    torch.cuda.synchronize(dev)
    return int(before), int(torch.cuda.max_memory_allocated(dev))


def peak_memory(
    step: Callable[[], Any],
    device: torch.device | str | None = None,
    *,
    method: MeasureMethod = "tracker",
) -> int:
    """Run ``step()`` once and return the peak bytes allocated on the device while it ran.

    The peak includes everything resident when the step starts (parameters, buffers, inputs,
    existing gradients) plus what the step allocates: the budget's meaning in DESIGN.md.

    On CUDA it is ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``: exact
    at the allocator, including memory allocated inside compiled (inductor) kernels, rounded to
    the allocator's 512-byte blocks. ``method`` only matters on CPU.

    On CPU with ``method="tracker"`` it tracks tensor storages with :class:`LiveTensorTracker`.
    It sees every tensor produced by an operator that goes through the dispatcher, in forward
    and backward, and every tensor reachable from Python when the step starts. It cannot see
    scratch memory that a kernel allocates and frees internally (oneDNN workspaces, say),
    memory allocated inside inductor-compiled kernels, or storages created before the step that
    no Python object references.

    On CPU with ``method="allocator"`` the step's own allocations are read at the CPU allocator
    (:func:`graphckpt.allocator.cpu_allocator_peak`, through the profiler): compiled code and
    kernel scratch memory included. What was resident at the start is still found by scanning
    Python's live tensors. Use it for ``torch.compile``'d steps; it is slower (profiler
    overhead) and reads high when the step frees blocks allocated before it.

    Args:
        step: a zero-argument callable, typically forward + backward of a model.
        device: where to measure; defaults to CUDA when available, else CPU.
        method: ``"tracker"`` or ``"allocator"``: how to measure on CPU.

    Returns:
        The peak in bytes.

    Raises:
        ValueError: an unknown ``method``.

    Example:
        >>> w = torch.randn(256, 256, requires_grad=True)
        >>> peak = peak_memory(lambda: (w @ w).sum().backward())
        >>> peak >= 2 * w.numel() * 4  # w and w.grad
        True
    """
    dev = _resolve(device, method)
    if dev.type == "cuda":
        return _cuda_step_peak(step, dev)[1]
    tracker = LiveTensorTracker(dev.type)
    if method == "allocator":
        baseline = tracker.scan_live_tensors()
        return baseline + cpu_allocator_peak(step).peak_bytes
    with tracker:
        step()
    return tracker.peak_bytes


def resident_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (shared storages counted once).

    Example:
        >>> w = torch.zeros(256)
        >>> resident_bytes([w, w[:128], torch.zeros(2)])
        1032
    """
    storages: dict[tuple[str, int], int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        storages[(str(t.device), storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())


def step_peak_bytes(
    step: Callable[[], Any],
    resident: Iterable[torch.Tensor],
    device: torch.device | str,
    *,
    method: MeasureMethod = "tracker",
) -> int:
    """Peak of one step as the budget counts it for one model, whatever else the process holds.

    That is the bytes of ``resident`` (the model's parameters, buffers and inputs) plus the
    most ``step()`` allocates on top of what was allocated when it started, so other models
    alive in the process (a benchmark's baselines, say) do not count. ``method`` picks how the
    CPU is measured, as in :func:`peak_memory`; use ``"allocator"`` for compiled steps.

    Example:
        >>> w = torch.randn(64, 64, requires_grad=True)
        >>> step_peak_bytes(lambda: (w @ w).sum().backward(), [w], "cpu") >= 3 * w.numel() * 4
        True
    """
    dev = _resolve(device, method)
    base = resident_bytes(resident)
    if dev.type == "cuda":
        before, peak = _cuda_step_peak(step, dev)
        return base + peak - before
    if method == "allocator":
        return base + cpu_allocator_peak(step).peak_bytes
    with LiveTensorTracker(dev.type) as tracker:
        step()
    return base + tracker.peak_bytes - tracker.baseline_bytes
