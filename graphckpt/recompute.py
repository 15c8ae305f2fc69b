"""What a region's recompute must replay from its forward: RNG, autocast, and stateful layers.

:class:`ForwardState` is captured when a checkpointed region runs forward;
:meth:`ForwardState.replay` puts the same random states and autocast state back around the
recompute, and keeps BatchNorm layers from updating their running statistics a second time.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from graphckpt.rng import RNGSnapshot, RNGStatesTracker

__all__ = ["AutocastState", "ForwardState", "frozen_running_stats", "module_roots"]


@dataclass(frozen=True)
class AutocastState:
    """Whether autocast was on, and its dtype, for CPU and CUDA, plus the cache setting."""

    cpu_enabled: bool
    cpu_dtype: torch.dtype
    cuda_enabled: bool
    cuda_dtype: torch.dtype
    cache_enabled: bool

    @classmethod
    def capture(cls) -> AutocastState:
        """Reads the current thread's autocast state."""
        return cls(
            cpu_enabled=torch.is_autocast_enabled("cpu"),
            cpu_dtype=torch.get_autocast_dtype("cpu"),
            cuda_enabled=torch.is_autocast_enabled("cuda"),
            cuda_dtype=torch.get_autocast_dtype("cuda"),
            cache_enabled=torch.is_autocast_cache_enabled(),
        )

    def apply(self) -> contextlib.ExitStack:
        """A context that sets this state (also turning autocast off where it was off)."""
        stack = contextlib.ExitStack()
        stack.enter_context(
            torch.autocast(
                "cpu",
                enabled=self.cpu_enabled,
                dtype=self.cpu_dtype,
                cache_enabled=self.cache_enabled,
            )
        )
        # Entering a CUDA autocast context warns on machines without CUDA; only do it when it
        # changes something.
        if self.cuda_enabled or torch.is_autocast_enabled("cuda"):
            stack.enter_context(
                torch.autocast(
                    "cuda",
                    enabled=self.cuda_enabled,
                    dtype=self.cuda_dtype,
                    cache_enabled=self.cache_enabled,
                )
            )
        return stack


def module_roots(function: Callable[..., Any], leaves: Iterable[object]) -> list[torch.nn.Module]:
    """The modules a region can be seen to run.

    Those are: the function itself when it is a module, the module of a bound method, modules
    that a closure, a default argument or a ``functools.partial`` holds, modules named as
    globals in the function's code, and modules passed as arguments. A module reached some
    other way (an attribute of a non-module object, a global read by a helper function) is
    not seen; pass it as an argument, or checkpoint a module or bound method instead.

    Args:
        function: the region's function.
        leaves: the region's flattened arguments.

    Returns:
        The distinct modules found (their submodules are not listed separately).

    Example:
        >>> def make(bn):
        ...     return lambda x: bn(x)
        >>> bn = torch.nn.BatchNorm1d(4)
        >>> module_roots(make(bn), []) == [bn]
        True
    """
    candidates: list[object] = list(leaves)
    seen_functions: set[int] = set()
    todo: list[object] = [function]
    while todo:
        f = todo.pop()
        if id(f) in seen_functions:
            continue
        seen_functions.add(id(f))
        if isinstance(f, functools.partial):
            todo.append(f.func)
            candidates.extend(f.args)
            candidates.extend(f.keywords.values())
            continue
        candidates.append(f)
        candidates.append(getattr(f, "__self__", None))
        for cell in getattr(f, "__closure__", None) or ():
            with contextlib.suppress(ValueError):  # an empty cell
                todo.append(cell.cell_contents)
        candidates.extend(getattr(f, "__defaults__", None) or ())
        code, globals_ = getattr(f, "__code__", None), getattr(f, "__globals__", None)
        if code is not None and isinstance(globals_, dict):
            candidates.extend(globals_.get(name) for name in code.co_names)
    roots: list[torch.nn.Module] = []
    for obj in candidates:
        if isinstance(obj, torch.nn.Module) and all(obj is not r for r in roots):
            roots.append(obj)
    return roots


@contextlib.contextmanager
def frozen_running_stats(roots: Iterable[torch.nn.Module]) -> Iterator[None]:
    """Runs the body with every BatchNorm under ``roots`` updating copies of its statistics.

    A recompute runs a training-mode BatchNorm a second time; without this its running mean,
    variance and batch count would be updated twice per step. The copies are swapped in rather
    than the originals restored in place, because autograd saved the originals' versions.

    Args:
        roots: modules whose BatchNorm submodules (training mode) are protected.

    Example:
        >>> bn = torch.nn.BatchNorm1d(2)
        >>> with frozen_running_stats([bn]):
        ...     _ = bn(torch.randn(4, 2))
        >>> int(bn.num_batches_tracked)
        0
    """
    swapped: list[tuple[torch.nn.Module, str, torch.Tensor]] = []
    seen: set[int] = set()
    for root in roots:
        for module in root.modules():
            if not isinstance(module, _BatchNorm) or not module.training or id(module) in seen:
                continue
            seen.add(id(module))
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                buffer = getattr(module, name)
                if isinstance(buffer, torch.Tensor):
                    swapped.append((module, name, buffer))
                    setattr(module, name, buffer.detach().clone())
    try:
        yield
    finally:
        for module, name, buffer in swapped:
            setattr(module, name, buffer)


@dataclass(frozen=True)
class ForwardState:
    """The state a region's forward ran under, for its recompute to replay."""

    rng: RNGSnapshot
    autocast: AutocastState
    modules: tuple[torch.nn.Module, ...]
    tracker: RNGStatesTracker | None

    @classmethod
    def capture(
        cls,
        device: torch.device,
        tracker: RNGStatesTracker | None,
        modules: Iterable[torch.nn.Module],
    ) -> ForwardState:
        """Captures RNG and autocast state now; ``device`` is where the region computes."""
        cuda_device = None
        if device.type == "cuda":
            cuda_device = device
        elif torch.cuda.is_initialized():
            cuda_device = torch.device("cuda", torch.cuda.current_device())
        return cls(
            rng=RNGSnapshot.capture(cuda_device, tracker),
            autocast=AutocastState.capture(),
            modules=tuple(modules),
            tracker=tracker,
        )

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        """Runs the body with grad enabled under the forward's RNG and autocast state."""
        with (
            self.rng.replay(self.tracker),
            self.autocast.apply(),
            frozen_running_stats(self.modules),
            torch.enable_grad(),
        ):
            yield
