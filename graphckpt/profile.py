"""Per-region timings of checkpointed regions: forward and recompute, as a table.

:class:`RegionProfiler` is filled by :class:`graphckpt.Checkpointer` when its config has
``profile=True``; a region is identified by the module (or function) it runs.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from tabulate import tabulate

__all__ = ["RegionProfiler", "RegionTimes", "region_identity"]

Phase = Literal["forward", "recompute"]


@dataclass
class RegionTimes:
    """Accumulated times of one region, in seconds."""

    label: str
    num_forward: int = 0
    forward_s: float = 0.0
    num_recompute: int = 0
    recompute_s: float = 0.0


def region_identity(function: Callable[..., Any]) -> tuple[int, str]:
    """Returns a key and a readable name for the region that runs ``function``.

    A bound method is identified by its object (each access makes a new method object), a
    ``functools.partial`` by what it wraps. Keys are object ids: a region whose function is
    garbage collected and replaced may share the key of the new one.

    Example:
        >>> region_identity(torch.nn.Linear(2, 2))[1]
        'Linear'
    """
    while isinstance(function, functools.partial):
        function = function.func
    owner = getattr(function, "__self__", None)
    if isinstance(owner, torch.nn.Module):
        name = f"{type(owner).__name__}.{getattr(function, '__name__', 'call')}"
        return id(owner), name
    if isinstance(function, torch.nn.Module):
        return id(function), type(function).__name__
    name = getattr(function, "__qualname__", None) or type(function).__name__
    return id(function), str(name)


class RegionProfiler:
    """Accumulates forward and recompute times per region.

    Example:
        >>> prof = RegionProfiler()
        >>> with prof.time(torch.nn.ReLU(), "forward", torch.device("cpu")):
        ...     pass
        >>> "ReLU" in prof.table()
        True
    """

    def __init__(self) -> None:
        self._regions: dict[tuple[int, str], RegionTimes] = {}

    @contextlib.contextmanager
    def time(
        self, function: Callable[..., Any], phase: Phase, device: torch.device
    ) -> Iterator[None]:
        """Times the body as one ``phase`` of the region running ``function`` on ``device``.

        On CUDA the device is synchronised before and after, so the time covers the kernels.
        """
        key = region_identity(function)
        if key not in self._regions:
            self._regions[key] = RegionTimes(label=f"{len(self._regions)}:{key[1]}")
        times = self._regions[key]
        cuda = device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        try:
            yield
        finally:
            if cuda:
                torch.cuda.synchronize(device)
            elapsed = time.perf_counter() - start
            if phase == "forward":
                times.num_forward += 1
                times.forward_s += elapsed
            else:
                times.num_recompute += 1
                times.recompute_s += elapsed

    def rows(self) -> list[RegionTimes]:
        """The regions in the order they first ran."""
        return list(self._regions.values())

    def reset(self) -> None:
        """Forgets every timing."""
        self._regions = {}

    def table(self) -> str:
        """The timings as a text table, one row per region, times in milliseconds.

        Returns:
            A table with columns region, forwards, forward ms, recomputes, recompute ms.
        """
        rows = [
            (r.label, r.num_forward, r.forward_s * 1e3, r.num_recompute, r.recompute_s * 1e3)
            for r in self.rows()
        ]
        headers = ("region", "forwards", "forward ms", "recomputes", "recompute ms")
        return tabulate(rows, headers=headers, floatfmt=".3f")
