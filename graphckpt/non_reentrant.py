"""The non-reentrant checkpoint: autograd records the region, saved-tensor hooks drop its tensors.

Where :class:`graphckpt.Checkpointer` wraps a region in one autograd Function and runs a nested
backward through the recomputed graph, this variant lets autograd record the region as usual and
replaces every tensor the region saves for backward by an index
(``torch.autograd.graph.saved_tensors_hooks``). The first unpack in backward recomputes the
region (same RNG, autocast and BatchNorm handling) and hands out the recomputed tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from graphckpt.errors import GraphCkptError
from graphckpt.recompute import ForwardState

if TYPE_CHECKING:
    from graphckpt.checkpoint import Checkpointer, _Region

__all__ = ["run_non_reentrant"]


class _Frame:
    """The saved tensors of one region: counted in forward, recomputed on first unpack."""

    def __init__(self, region: _Region) -> None:
        self.region = region
        self.num_packed = 0
        self.num_unpacked = 0
        self.recomputed: dict[int, torch.Tensor] = {}

    def pack(self, tensor: torch.Tensor) -> int:
        index = self.num_packed
        self.num_packed += 1
        return index

    def unpack(self, index: int) -> torch.Tensor:
        if index not in self.recomputed:
            self._recompute()
        if index not in self.recomputed:
            raise GraphCkptError(
                f"the recompute of {self.region.function!r} saved fewer tensors than its forward "
                f"(tensor {index} of {self.num_packed} is missing); the region must run the same "
                "operations each call"
            )
        self.num_unpacked += 1
        if self.num_unpacked == self.num_packed and self.region.saved is not None:
            self.region.saved.free()
        return self.recomputed.pop(index)

    def _recompute(self) -> None:
        region = self.region
        assert region.saved is not None and region.state is not None
        restored = region.saved.restore()
        region.owner._prefetch_before(region)
        detached = [
            t.detach().requires_grad_(rg) for t, rg in zip(restored, region.saved.requires_grad)
        ]
        recomputed: dict[int, torch.Tensor] = {}

        def keep(tensor: torch.Tensor) -> None:
            recomputed[len(recomputed)] = tensor.detach()

        with (
            region.owner._phase(region.function, "recompute", region.device),
            region.state.replay(),
            torch.autograd.graph.saved_tensors_hooks(keep, lambda _: None),
        ):
            region.inputs.call(region.function, detached)
        self.recomputed = recomputed


def run_non_reentrant(
    owner: Checkpointer, region: _Region, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """Runs ``region`` recorded by autograd, with its saved tensors dropped until backward.

    Args:
        owner: the Checkpointer whose storage keeps the region's inputs.
        region: the call, built by the Checkpointer.
        args: its positional arguments, as given.
        kwargs: its keyword arguments, as given.

    Returns:
        What the region's function returns.
    """
    frame = _Frame(region)
    function: Callable[..., Any] = region.function
    region.state = ForwardState.capture(region.device, owner.tracker, region.modules)
    with (
        owner._phase(function, "forward", region.device),
        torch.autograd.graph.saved_tensors_hooks(frame.pack, frame.unpack),
    ):
        outputs = function(*args, **kwargs)
    region.save_inputs()
    return outputs
