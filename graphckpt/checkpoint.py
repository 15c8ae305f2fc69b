"""The checkpoint runtime: run a region without keeping its activations, recompute in backward.

:class:`Checkpointer` owns everything a step's checkpointed regions share (config, process
group, RNG tracker, offload streams, contiguous buffers, timings); nothing here is global.
:func:`checkpoint` runs one region with the default options. The rewritten graphs of
``passes/`` and :mod:`graphckpt.compat.deepspeed` call into this module.
"""

from __future__ import annotations

import contextlib
import itertools
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch.utils._pytree import (
    TreeSpec,
    keystr,
    tree_flatten,
    tree_flatten_with_path,
    tree_leaves,
    tree_unflatten,
)

from graphckpt.buffers import ContiguousBuffers
from graphckpt.config import CheckpointConfig
from graphckpt.errors import GraphCkptError
from graphckpt.offload import OffloadEngine
from graphckpt.profile import Phase, RegionProfiler
from graphckpt.recompute import ForwardState, module_roots
from graphckpt.rng import RNGStatesTracker
from graphckpt.saved import SavedInputs, Storage, check_not_released

__all__ = ["Checkpointer", "checkpoint", "non_reentrant_checkpoint"]


class _Inputs:
    """A call's arguments split into distinct tensors and everything else, and put back."""

    def __init__(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        with_paths, self.spec = tree_flatten_with_path((args, kwargs))
        self.leaves: list[Any] = [leaf for _, leaf in with_paths]
        self.tensors: list[torch.Tensor] = []
        self.slots: list[tuple[int, int]] = []  # (leaf position, index into self.tensors)
        first_index: dict[int, int] = {}
        for position, (path, leaf) in enumerate(with_paths):
            if not isinstance(leaf, torch.Tensor):
                continue
            where = ("args" if path[0].idx == 0 else "kwargs") + keystr(path[1:])
            check_not_released(leaf, where)
            if id(leaf) not in first_index:  # an aliased input is saved and detached once
                first_index[id(leaf)] = len(self.tensors)
                self.tensors.append(leaf)
            self.slots.append((position, first_index[id(leaf)]))
            self.leaves[position] = None

    def call(self, function: Callable[..., Any], tensors: Sequence[torch.Tensor]) -> Any:
        """Calls ``function`` with the original arguments, the tensors replaced by ``tensors``."""
        leaves = list(self.leaves)
        for position, index in self.slots:
            leaves[position] = tensors[index]
        args, kwargs = tree_unflatten(leaves, self.spec)
        return function(*args, **kwargs)


class _Region:
    """One call of a checkpointed function: its inputs, forward state and saved inputs."""

    def __init__(self, owner: Checkpointer, function: Callable[..., Any], inputs: _Inputs) -> None:
        self.owner = owner
        self.function = function
        self.inputs = inputs
        self.device: torch.device = next(
            (t.device for t in inputs.tensors if t.device.type == "cuda"), torch.device("cpu")
        )
        self.modules = module_roots(function, inputs.leaves)
        self.out_spec: TreeSpec | None = None
        self.state: ForwardState | None = None
        self.saved: SavedInputs | None = None
        self.serial = -1

    def needs_anchor(self) -> bool:
        """Whether no input requires grad while parameters the region uses may.

        The autograd Function then gets an empty tensor that requires grad, so its outputs
        require grad and parameter gradients are not lost. Parameters of a plain function
        cannot be seen, so it gets one whenever grad is enabled.
        """
        if any(t.requires_grad for t in self.inputs.tensors):
            return False
        plain = not isinstance(self.function, torch.nn.Module) and not self.modules
        return plain or any(p.requires_grad for m in self.modules for p in m.parameters())

    def forward(self) -> list[Any]:
        self.state = ForwardState.capture(self.device, self.owner.tracker, self.modules)
        with self.owner._phase(self.function, "forward", self.device):
            outputs = self.inputs.call(self.function, self.inputs.tensors)
        flat, self.out_spec = tree_flatten(outputs)
        self.save_inputs()
        return flat

    def save_inputs(self) -> None:
        """Stores the tensor inputs as the owner's config says, and registers the region."""
        self.saved = SavedInputs(self.owner._storage, self.inputs.tensors)
        if self.owner.config.release_inputs:
            self.saved.release_sources(self.inputs.tensors)
        # From here on only the saved copies are held: an offloaded or partitioned input is
        # freed as soon as the caller drops it.
        self.inputs.tensors = []
        self.owner._register(self)

    def backward(self, grads: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
        assert self.saved is not None and self.state is not None
        if not torch.autograd._is_checkpoint_valid():
            raise GraphCkptError(
                "a reentrant checkpoint region cannot run under torch.autograd.grad() or "
                "backward(inputs=...): its nested backward would write .grad of every "
                "parameter it uses. Use Checkpointer.non_reentrant (or "
                "graphckpt.non_reentrant_checkpoint) for this region"
            )
        restored = self.saved.restore()
        self.owner._prefetch_before(self)
        detached = [
            t.detach().requires_grad_(rg) for t, rg in zip(restored, self.saved.requires_grad)
        ]
        try:
            with self.owner._phase(self.function, "recompute", self.device), self.state.replay():
                outputs = self.inputs.call(self.function, detached)
            flat = tree_leaves(outputs)
            if len(flat) != len(grads):
                raise RuntimeError(
                    f"the recompute of {self.function!r} returned {len(flat)} values, its "
                    f"forward {len(grads)}; a checkpointed function must return the same "
                    "structure each call"
                )
            pairs = [
                (out, grad)
                for out, grad in zip(flat, grads)
                if isinstance(out, torch.Tensor) and out.requires_grad and grad is not None
            ]
            if pairs:
                torch.autograd.backward([out for out, _ in pairs], [grad for _, grad in pairs])
        finally:
            # Only now: the recomputed graph reads the restored inputs (which may lie in a
            # contiguous buffer row) until its backward is done; also frees them on errors.
            self.saved.free()
        return [d.grad if d.requires_grad else None for d in detached]


class _CheckpointFunction(torch.autograd.Function):
    """Runs a region without recording it; its backward recomputes it and backpropagates."""

    @staticmethod
    def forward(ctx: Any, region: _Region, *tensors: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        flat = region.forward()
        ctx.mark_non_differentiable(
            *(o for o in flat if isinstance(o, torch.Tensor) and not _differentiable(o))
        )
        ctx.region = region
        ctx.num_tensors = len(tensors)
        return tuple(flat)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        region: _Region = ctx.region
        input_grads = region.backward(grads)
        padding = [None] * (ctx.num_tensors - len(input_grads))  # the anchor gets none
        return (None, *input_grads, *padding)


def _differentiable(tensor: torch.Tensor) -> bool:
    return tensor.is_floating_point() or tensor.is_complex()


class Checkpointer:
    """Runs checkpointed regions with the options of one :class:`CheckpointConfig`.

    ``ckpt(function, *args, **kwargs)`` returns ``function(*args, **kwargs)``; in forward it
    keeps only the tensor inputs (stored as the config says), and in backward it recomputes the
    region under the forward's RNG and autocast state. Outputs and gradients equal those of the
    plain call. Under ``torch.no_grad()`` or ``torch.inference_mode()`` it just calls the
    function and saves nothing.

    The region is one autograd Function whose backward runs a nested backward through the
    recomputed graph (DeepSpeed's design). So a backward may go through it once, and not under
    ``torch.autograd.grad`` (errors say so); :meth:`non_reentrant` has neither limit. When no
    tensor input requires grad, an empty anchor tensor that does is added so that parameter
    gradients still flow; for a plain function (whose parameters cannot be seen) that makes
    the outputs require grad even if the plain call's would not.

    Args:
        config: the options; ``None`` gives the defaults.
        group: the process group ``partition_activations`` splits saved inputs over (the
            tensor-parallel group: ranks holding identical activations).
        tracker: the RNG tracker whose states recomputes replay; a new one when ``None``.
            Only this tracker is replayed: regions that fork another tracker recompute with
            different random numbers.

    Example:
        >>> ckpt = Checkpointer(CheckpointConfig(cpu_checkpointing=True))
        >>> layer = torch.nn.Linear(4, 4)
        >>> x = torch.randn(2, 4, requires_grad=True)
        >>> ckpt(layer, x).sum().backward()
        >>> x.grad.shape
        torch.Size([2, 4])
    """

    def __init__(
        self,
        config: CheckpointConfig | None = None,
        group: dist.ProcessGroup | None = None,
        *,
        tracker: RNGStatesTracker | None = None,
    ) -> None:
        self.config = CheckpointConfig() if config is None else config
        if not isinstance(self.config, CheckpointConfig):
            raise TypeError(f"config must be a CheckpointConfig, got {type(config).__name__}")
        if self.config.partition_activations and group is None:
            warnings.warn(
                "partition_activations=True but no process group was given: saved inputs are "
                "kept whole. Pass group=<tensor-parallel group>",
                stacklevel=2,
            )
        self.group = group if self.config.partition_activations else None
        self.tracker = RNGStatesTracker() if tracker is None else tracker
        self.profiler = RegionProfiler() if self.config.profile else None
        buffers = None
        if self.config.contiguous_memory_optimization:
            assert self.config.number_checkpoints is not None  # checked by the config
            buffers = ContiguousBuffers(
                self.config.number_checkpoints, host=self.config.cpu_checkpointing
            )
        offload = OffloadEngine() if self.config.cpu_checkpointing and buffers is None else None
        self._storage = Storage(group=self.group, offload=offload, buffers=buffers)
        self._pending: dict[int, weakref.ref[SavedInputs]] = {}
        self._serials = itertools.count()

    @property
    def buffers(self) -> ContiguousBuffers | None:
        """The contiguous buffers (``contiguous_memory_optimization=True``), else ``None``."""
        return self._storage.buffers

    def __call__(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Runs ``function(*args, **kwargs)`` as a checkpointed region; see the class docstring.

        Raises:
            GraphCkptError: a tensor input is a placeholder that a checkpoint released.
        """
        if not callable(function):
            raise TypeError(f"function must be callable, got {type(function).__name__}")
        inputs = _Inputs(args, kwargs)
        if not torch.is_grad_enabled():
            return self._call_plain(function, inputs, args, kwargs)
        region = _Region(self, function, inputs)
        anchor = [torch.empty(0, requires_grad=True)] if region.needs_anchor() else []
        if not anchor and not any(t.requires_grad for t in inputs.tensors):
            return self._call_plain(function, inputs, args, kwargs)  # nothing to backpropagate
        flat = _CheckpointFunction.apply(region, *inputs.tensors, *anchor)
        assert region.out_spec is not None
        return tree_unflatten(list(flat), region.out_spec)

    def non_reentrant(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Like calling the Checkpointer, but autograd records the region and saved-tensor hooks
        drop what it saves (see :mod:`graphckpt.non_reentrant`).

        Differences from the reentrant call: parameter gradients need no input that requires
        grad, ``torch.autograd.grad`` works (no nested backward that writes ``.grad``), and the
        region's output tensors are ordinary autograd outputs. The recompute runs the whole
        region on the first unpack of its saved tensors; nesting it inside another
        non-reentrant region keeps the inner region's inputs alive.
        """
        from graphckpt.non_reentrant import run_non_reentrant  # imports this module

        if not callable(function):
            raise TypeError(f"function must be callable, got {type(function).__name__}")
        inputs = _Inputs(args, kwargs)
        if not torch.is_grad_enabled():
            return self._call_plain(function, inputs, args, kwargs)
        return run_non_reentrant(self, _Region(self, function, inputs), args, kwargs)

    def _call_plain(
        self,
        function: Callable[..., Any],
        inputs: _Inputs,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        device = next((t.device for t in inputs.tensors), torch.device("cpu"))
        with self._phase(function, "forward", device):
            return function(*args, **kwargs)

    def saved_bytes(self, where: Literal["all", "device", "host"] = "all") -> int:
        """Bytes held for the saved inputs of regions whose backward has not run yet.

        Args:
            where: ``"host"`` counts host copies (offload, host buffers), ``"device"`` the
                rest (whole tensors and partitions kept where they were), ``"all"`` both.

        Returns:
            The bytes this rank holds; a partitioned input counts its slice only.
        """
        live = [ref() for ref in list(self._pending.values())]
        return sum(s.nbytes(where) for s in live if s is not None and not s.consumed)

    @property
    def num_pending_regions(self) -> int:
        """Regions that ran forward and whose backward has not run (or was not freed)."""
        return sum(1 for ref in list(self._pending.values()) if _live(ref()))

    def profile_table(self) -> str:
        """Per-region forward and recompute times as a text table (needs ``profile=True``)."""
        if self.profiler is None:
            raise ValueError("profile_table() needs CheckpointConfig(profile=True), got False")
        return self.profiler.table()

    def reset(self) -> None:
        """Frees all contiguous buffer rows, for forwards that will have no backward (eval).

        A region that still holds a row and runs backward later fails with a clear error.
        """
        if self._storage.buffers is not None:
            self._storage.buffers.reset()

    def _register(self, region: _Region) -> None:
        assert region.saved is not None
        region.serial = next(self._serials)
        pending = self._pending
        serial = region.serial
        pending[serial] = weakref.ref(region.saved, lambda _: pending.pop(serial, None))

    def _prefetch_before(self, region: _Region) -> None:
        """Frees the region's entry and starts reloading the region run just before it."""
        self._pending.pop(region.serial, None)
        if self._storage.offload is None:
            return
        earlier = [
            saved
            for serial, ref in list(self._pending.items())
            if serial < region.serial and _live(saved := ref())
        ]
        if earlier and earlier[-1] is not None:
            earlier[-1].prefetch()

    @contextlib.contextmanager
    def _phase(
        self, function: Callable[..., Any], phase: Phase, device: torch.device
    ) -> Iterator[None]:
        sync = self.config.synchronize_checkpoint_boundary and device.type == "cuda"
        if sync:
            torch.cuda.synchronize(device)
        timing = (
            self.profiler.time(function, phase, device)
            if self.profiler is not None
            else contextlib.nullcontext()
        )
        with timing:
            yield
        if sync:
            torch.cuda.synchronize(device)


def _live(saved: SavedInputs | None) -> bool:
    return saved is not None and not saved.consumed


def checkpoint(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Runs ``function(*args, **kwargs)`` without keeping its activations; recomputes in backward.

    The same as ``Checkpointer()(function, *args, **kwargs)``: default options, a fresh RNG
    tracker, no state kept between calls. The recompute replays the CPU and CUDA generators,
    but not the states of an :class:`RNGStatesTracker` of your own: a region that forks one
    (tensor-parallel dropout) needs ``Checkpointer(tracker=that_tracker)``, or its dropout
    masks differ in the recompute.

    Args:
        function: the region (a module, a bound method or any callable).
        *args: its positional arguments: tensors, None, numbers, nested tuples/lists/dicts.
        **kwargs: its keyword arguments, likewise.

    Returns:
        What ``function`` returns; its tensors carry the region's gradient.

    Example:
        >>> layer = torch.nn.Linear(4, 4)
        >>> x = torch.randn(2, 4, requires_grad=True)
        >>> torch.equal(checkpoint(layer, x), layer(x))
        True
    """
    return Checkpointer()(function, *args, **kwargs)


def non_reentrant_checkpoint(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Like :func:`checkpoint`, with the non-reentrant mechanism (``Checkpointer.non_reentrant``).

    Args:
        function: the region.
        *args: its positional arguments.
        **kwargs: its keyword arguments.

    Returns:
        What ``function`` returns.

    Example:
        >>> layer = torch.nn.Linear(4, 4)
        >>> x = torch.randn(2, 4)
        >>> non_reentrant_checkpoint(layer, x).sum().backward()
        >>> layer.weight.grad.shape
        torch.Size([4, 4])
    """
    return Checkpointer().non_reentrant(function, *args, **kwargs)
