"""Options of the checkpoint runtime: one frozen object the caller owns.

The keys and defaults are those of DeepSpeed's ``activation_checkpointing`` config section, so
a DeepSpeed config file can be read as is (:meth:`CheckpointConfig.from_deepspeed`). The
runtime (:mod:`graphckpt.checkpoint`) reads this object; it never reads global settings.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["DEEPSPEED_SECTION", "CheckpointConfig"]

DEEPSPEED_SECTION = "activation_checkpointing"
"""Name of the section of a DeepSpeed config that :meth:`CheckpointConfig.from_deepspeed` reads."""

# Keys of DeepSpeed's section; ``release_inputs`` is graphckpt's own and is not accepted there.
_DEEPSPEED_KEYS = (
    "partition_activations",
    "contiguous_memory_optimization",
    "cpu_checkpointing",
    "number_checkpoints",
    "synchronize_checkpoint_boundary",
    "profile",
)


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    """How :class:`graphckpt.Checkpointer` saves the inputs of each checkpointed region.

    Partitioned, offloaded or buffered saves are copies: by default the caller's tensor is left
    whole, so passing it to another checkpoint (or using it after) is correct, and its device
    memory is freed once the caller drops it. DeepSpeed and Megatron instead overwrite the
    caller's tensor with the slice; graphckpt does that only with ``release_inputs=True``, and
    then a released tensor passed to a checkpoint again is a :class:`graphckpt.GraphCkptError`
    (a RuntimeError) saying it was partitioned or offloaded and released.

    Example:
        >>> cfg = CheckpointConfig(cpu_checkpointing=True)
        >>> cfg.partition_activations
        False
    """

    partition_activations: bool = False
    """Keep only this rank's 1/world slice of each saved floating-point input; needs a group."""

    contiguous_memory_optimization: bool = False
    """Copy saved inputs into buffers allocated once and reused; needs ``number_checkpoints``."""

    cpu_checkpointing: bool = False
    """Move saved inputs to host memory in forward and bring them back in backward."""

    number_checkpoints: int | None = None
    """Most regions whose saved inputs are alive at once (the number of checkpointed layers)."""

    synchronize_checkpoint_boundary: bool = False
    """Synchronise the CUDA device at the start and end of every region (no-op on CPU)."""

    profile: bool = False
    """Record per-region forward and recompute times (see ``Checkpointer.profile_table``)."""

    release_inputs: bool = False
    """graphckpt only: after partitioning, offloading or buffering an intermediate input (a
    non-leaf tensor that is not a view), replace its storage by an empty placeholder so its
    memory is freed even while the caller still references it (as Megatron does for its first
    argument). Passing a released tensor to a checkpoint again raises a GraphCkptError that
    says so. Only for inputs that nothing reads afterwards: any other use of the placeholder,
    including a backward that autograd saved it for before the checkpoint, sees an empty tensor
    (a shape error, not a clear one). Off by default, where inputs stay whole and may be
    reused. Not a DeepSpeed key."""

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name == "number_checkpoints":
                _check_number_checkpoints(value)
            elif not isinstance(value, bool):
                raise TypeError(f"{field.name} must be a bool, got {value!r}")
        if self.contiguous_memory_optimization and self.number_checkpoints is None:
            raise ValueError(
                "contiguous_memory_optimization=True needs number_checkpoints (how many regions "
                "keep saved inputs at once, usually the number of checkpointed layers), got None; "
                "set number_checkpoints"
            )

    @classmethod
    def from_deepspeed(cls, config: Mapping[str, Any] | str | os.PathLike[str]) -> CheckpointConfig:
        """Reads the ``activation_checkpointing`` section of a DeepSpeed config.

        Args:
            config: a DeepSpeed config dict, or the path of its JSON file. A missing section
                gives the defaults.

        Returns:
            The config those keys describe.

        Raises:
            ValueError: an unknown key in the section, or a file that is not a JSON object.
            TypeError: a key with a value of the wrong type.

        Example:
            >>> CheckpointConfig.from_deepspeed(
            ...     {"activation_checkpointing": {"cpu_checkpointing": True}}
            ... ).cpu_checkpointing
            True
        """
        if isinstance(config, (str, os.PathLike)):
            with open(config, encoding="utf-8") as f:
                loaded = json.load(f)
            if not isinstance(loaded, dict):
                raise ValueError(f"DeepSpeed config {os.fspath(config)!r} must hold a JSON object")
            config = loaded
        if not isinstance(config, Mapping):
            raise TypeError(f"config must be a dict or a path, got {type(config).__name__}")
        section = config.get(DEEPSPEED_SECTION, {})
        if not isinstance(section, Mapping):
            raise TypeError(
                f"{DEEPSPEED_SECTION} must be a JSON object, got {type(section).__name__}"
            )
        unknown = sorted(set(section) - set(_DEEPSPEED_KEYS))
        if unknown:
            raise ValueError(
                f"unknown key {DEEPSPEED_SECTION}.{unknown[0]} in the DeepSpeed config; "
                f"known keys: {', '.join(_DEEPSPEED_KEYS)}"
            )
        try:
            return cls(**section)
        except (TypeError, ValueError) as e:
            raise type(e)(f"{DEEPSPEED_SECTION}.{e}") from e


def _check_number_checkpoints(value: object) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"number_checkpoints must be an int or None, got {value!r}")
    if value < 1:
        raise ValueError(f"number_checkpoints must be >= 1, got {value}")
