"""A small U-Net with its loss inside ``forward``: the reference non-chain graph.

The encoder's stage outputs are kept alive until the matching decoder stage concatenates
them (long skip connections), so the liveness of activations is not that of a chain of
layers. Used by the CLI, the tests and the benchmarks. Pure torch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ConvBlock", "DecoderStage", "EncoderStage", "UNet", "unet_example"]


class ConvBlock(nn.Module):
    """Two 3x3 convolutions, each followed by BatchNorm and ReLU; keeps the spatial size."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class EncoderStage(nn.Module):
    """Optionally halves the resolution (2x2 max-pool), then a :class:`ConvBlock`."""

    def __init__(self, in_channels: int, out_channels: int, *, downsample: bool) -> None:
        super().__init__()
        self.downsample = downsample
        self.block = ConvBlock(in_channels, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample:
            x = F.max_pool2d(x, 2)
        return self.block(x)


class DecoderStage(nn.Module):
    """Doubles the resolution, concatenates the encoder's skip, then a :class:`ConvBlock`."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2)
        self.block = ConvBlock(2 * out_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.block(torch.cat([self.up(x), skip], dim=1))


class UNet(nn.Module):
    """U-Net; ``forward(x, target)`` returns the mean squared error of its output to target.

    Encoder stage ``i`` has ``base_channels * 2**i`` channels at resolution ``size / 2**i``;
    decoder stage ``j`` upsamples and consumes the output of encoder stage ``depth - 2 - j``.
    The repeated layers are ``self.encoder`` (``depth`` stages, one input each) and
    ``self.decoder`` (``depth - 1`` stages, called as ``stage(x, skip)``).

    Example:
        >>> model = UNet(in_channels=3, out_channels=3, base_channels=8, depth=3)
        >>> x = torch.randn(2, 3, 16, 16)
        >>> model(x).shape
        torch.Size([2, 3, 16, 16])
    """

    def __init__(
        self,
        *,
        in_channels: int = 3,
        out_channels: int = 3,
        base_channels: int = 16,
        depth: int = 4,
    ) -> None:
        super().__init__()
        if depth < 2:
            raise ValueError(f"depth must be >= 2 for a U-Net with skips, got {depth}")
        if min(in_channels, out_channels, base_channels) <= 0:
            raise ValueError(
                f"channel counts must be > 0, got in_channels={in_channels}, "
                f"out_channels={out_channels}, base_channels={base_channels}"
            )
        self.depth = depth
        widths = [base_channels * 2**i for i in range(depth)]
        self.encoder = nn.ModuleList(
            EncoderStage(in_channels if i == 0 else widths[i - 1], widths[i], downsample=i > 0)
            for i in range(depth)
        )
        self.decoder = nn.ModuleList(
            DecoderStage(widths[i + 1], widths[i]) for i in reversed(range(depth - 1))
        )
        self.head = nn.Conv2d(widths[0], out_channels, 1)

    def forward(self, x: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        """Return the MSE loss to ``target`` or, without a target, the output image.

        Args:
            x: images of shape (batch, in_channels, H, W), H and W divisible by
                ``2**(depth - 1)``.
            target: tensor of the output's shape (batch, out_channels, H, W), or None.

        Returns:
            The scalar mean squared error if ``target`` is given, else the output.
        """
        factor = 2 ** (self.depth - 1)
        if x.shape[-2] % factor or x.shape[-1] % factor:
            raise ValueError(
                f"input height and width must be divisible by {factor} for depth "
                f"{self.depth}, got {tuple(x.shape[-2:])}"
            )
        skips: list[torch.Tensor] = []
        h = x
        for stage in self.encoder:
            h = stage(h)
            skips.append(h)
        skips.pop()  # the deepest stage's output is the decoder's input, not a skip
        for stage in self.decoder:
            h = stage(h, skips.pop())
        out = self.head(h)
        if target is None:
            return out
        return F.mse_loss(out, target)


def unet_example(
    batch: int = 4,
    size: int = 64,
    *,
    base_channels: int = 16,
    depth: int = 4,
    channels: int = 3,
    seed: int = 0,
) -> tuple[UNet, tuple[torch.Tensor, torch.Tensor]]:
    """Build a :class:`UNet` in training mode with random weights, images and targets.

    Weights and inputs depend only on ``seed``; the global RNG is left as it was. The defaults
    train one fp32 step in well under a second on a CPU.

    Args:
        batch: images per batch.
        size: height and width of the square images; divisible by ``2**(depth - 1)``.
        base_channels: channels of the first stage, doubled at every lower resolution.
        depth: number of encoder stages (the decoder has ``depth - 1``).
        channels: input and output channels.
        seed: seed for the weights and the inputs.

    Returns:
        ``(model, (x, target))``: call ``model(x, target)`` for the scalar loss.

    Example:
        >>> model, inputs = unet_example(batch=2, size=16, base_channels=4, depth=3)
        >>> model(*inputs).backward()
    """
    if batch <= 0 or size <= 0:
        raise ValueError(f"batch and size must be > 0, got batch={batch}, size={size}")
    if size % 2 ** (depth - 1):
        raise ValueError(
            f"size must be divisible by 2**(depth - 1) = {2 ** (depth - 1)}, got {size}"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = UNet(
            in_channels=channels, out_channels=channels, base_channels=base_channels, depth=depth
        )
    model.train()
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, size, size, generator=generator)
    target = torch.randn(batch, channels, size, size, generator=generator)
    return model, (x, target)
