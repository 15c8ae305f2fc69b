"""Random-number state for checkpoint regions: what a recompute replays so dropout matches.

:class:`RNGStatesTracker` keeps named generator states (the tensor-parallel one, say) the way
Megatron's tracker does, but as an object its owner passes around. :class:`RNGSnapshot` captures
the CPU, device and tracker states at a region's forward; the recompute restores it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

__all__ = [
    "MODEL_PARALLEL_RNG",
    "RNGSnapshot",
    "RNGStatesTracker",
    "model_parallel_manual_seed",
    "tensor_parallel_seed",
]

MODEL_PARALLEL_RNG = "model-parallel-rng"
"""Name of the tracked state that :func:`model_parallel_manual_seed` adds."""

_TP_SEED_OFFSET = 2718  # Megatron's and DeepSpeed's offset; kept so seeds match theirs.


def _resolve_device(device: torch.device | str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"RNG device must be 'cpu' or 'cuda', got {str(resolved)!r}")
    if resolved.type == "cuda" and resolved.index is None:
        resolved = torch.device("cuda", torch.cuda.current_device())
    return resolved


def _get_device_state(device: torch.device) -> torch.Tensor:
    """Returns the state of the default generator of ``device`` (CPU or one CUDA device)."""
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return torch.get_rng_state()


def _set_device_state(device: torch.device, state: torch.Tensor) -> None:
    """Sets the state of the default generator of ``device`` (CPU or one CUDA device)."""
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


class RNGStatesTracker:
    """Named random-generator states, swapped in for the device's default generator on demand.

    Code that must draw different random numbers on different tensor-parallel ranks (dropout
    inside a split layer) runs under ``with tracker.fork(name):``; the default generator's own
    state is untouched by it. The device is chosen on first use: CUDA when available, else CPU,
    unless given.

    Args:
        device: the device whose default generator the states replace; ``None`` picks
            ``cuda`` when available, else ``cpu``.

    Example:
        >>> tracker = RNGStatesTracker(device="cpu")
        >>> tracker.add("model-parallel-rng", 1234)
        >>> with tracker.fork("model-parallel-rng"):
        ...     mask = torch.rand(3) > 0.5
    """

    def __init__(self, device: torch.device | str | None = None) -> None:
        self._requested_device = None if device is None else torch.device(device)
        self._device: torch.device | None = None
        self._states: dict[str, torch.Tensor] = {}
        self._seeds: set[int] = set()

    @property
    def device(self) -> torch.device:
        """The device whose default generator this tracker's states stand in for."""
        if self._device is None:
            self._device = _resolve_device(self._requested_device)
        return self._device

    def reset(self) -> None:
        """Forgets every state and seed."""
        self._states = {}
        self._seeds = set()

    def get_states(self) -> dict[str, torch.Tensor]:
        """Returns a copy of the name -> generator state mapping."""
        return {name: state.clone() for name, state in self._states.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        """Replaces the tracked states (as returned by :meth:`get_states`); seeds are kept."""
        self._states = {name: state.clone() for name, state in states.items()}

    def add(self, name: str, seed: int) -> None:
        """Tracks a new state named ``name``, seeded with ``seed``.

        Args:
            name: the state's name, used by :meth:`fork`.
            seed: its seed; two states with one seed would draw the same numbers.

        Raises:
            ValueError: ``name`` or ``seed`` is already tracked.
        """
        if name in self._states:
            raise ValueError(
                f"RNG state {name!r} is already tracked; call reset() first or use another name"
            )
        if seed in self._seeds:
            raise ValueError(
                f"seed {seed} is already used by another tracked RNG state; "
                "give each state its own seed"
            )
        generator = torch.Generator(device=self.device)
        generator.manual_seed(seed)
        self._seeds.add(seed)
        self._states[name] = generator.get_state()

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG) -> Iterator[None]:
        """Runs the body with the tracked state ``name`` as the device's default generator.

        The state advances by what the body draws; the default generator's own state is
        restored on exit.

        Args:
            name: a state added with :meth:`add`.

        Raises:
            KeyError: ``name`` is not tracked.
        """
        if name not in self._states:
            raise KeyError(
                f"RNG state {name!r} is not tracked (tracked: {sorted(self._states)}); add it first"
            )
        device = self.device
        outer = _get_device_state(device)
        _set_device_state(device, self._states[name])
        try:
            yield
        finally:
            self._states[name] = _get_device_state(device)
            _set_device_state(device, outer)


def tensor_parallel_seed(seed: int, tp_rank: int) -> int:
    """Returns the seed of the tensor-parallel state of ``tp_rank`` (Megatron's convention).

    Args:
        seed: the base seed.
        tp_rank: the tensor-parallel rank.

    Returns:
        ``seed + 2718 + tp_rank``.

    Example:
        >>> tensor_parallel_seed(1234, 1)
        3953
    """
    return seed + _TP_SEED_OFFSET + tp_rank


def model_parallel_manual_seed(
    seed: int, tp_rank: int, *, tracker: RNGStatesTracker | None = None
) -> RNGStatesTracker:
    """Seeds the default generator and a tracker's tensor-parallel state, as Megatron does.

    The default generator of the tracker's device gets ``seed`` (the same on every
    tensor-parallel rank: data-parallel randomness); the tracker's state
    :data:`MODEL_PARALLEL_RNG` gets ``seed + 2718 + tp_rank`` (different per rank). The tracker
    is reset first.

    Args:
        seed: the base seed.
        tp_rank: this process's tensor-parallel rank.
        tracker: the tracker that receives the tensor-parallel state; ``None`` makes a new one
            (CUDA when available, else CPU).

    Returns:
        The tracker; give it to ``Checkpointer(tracker=...)`` so recomputes replay its states.

    Example:
        >>> tracker = model_parallel_manual_seed(42, 0, tracker=RNGStatesTracker(device="cpu"))
        >>> list(tracker.get_states())
        ['model-parallel-rng']
    """
    if tp_rank < 0:
        raise ValueError(f"tp_rank must be >= 0, got {tp_rank}")
    tracker = RNGStatesTracker() if tracker is None else tracker
    device = tracker.device
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)
    else:
        torch.default_generator.manual_seed(seed)
    tracker.reset()
    tracker.add(MODEL_PARALLEL_RNG, tensor_parallel_seed(seed, tp_rank))
    return tracker


@dataclass(frozen=True)
class RNGSnapshot:
    """The random state a region's forward ran under: CPU, one CUDA device, and a tracker."""

    cpu_state: torch.Tensor
    cuda_device: torch.device | None
    cuda_state: torch.Tensor | None
    tracker_states: dict[str, torch.Tensor] | None

    @classmethod
    def capture(
        cls, cuda_device: torch.device | None, tracker: RNGStatesTracker | None
    ) -> RNGSnapshot:
        """Captures the states now; ``cuda_device`` is the CUDA device the region uses, if any."""
        return cls(
            cpu_state=torch.get_rng_state(),
            cuda_device=cuda_device,
            cuda_state=None if cuda_device is None else torch.cuda.get_rng_state(cuda_device),
            tracker_states=None if tracker is None else tracker.get_states(),
        )

    @contextlib.contextmanager
    def replay(self, tracker: RNGStatesTracker | None) -> Iterator[None]:
        """Runs the body under the captured states, then puts the current ones back."""
        now = RNGSnapshot.capture(self.cuda_device, tracker)
        self._apply(tracker)
        try:
            yield
        finally:
            now._apply(tracker)

    def _apply(self, tracker: RNGStatesTracker | None) -> None:
        torch.set_rng_state(self.cpu_state)
        if self.cuda_device is not None and self.cuda_state is not None:
            torch.cuda.set_rng_state(self.cuda_state, self.cuda_device)
        if tracker is not None and self.tracker_states is not None:
            tracker.set_states(self.tracker_states)
