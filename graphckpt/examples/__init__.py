"""Built-in example models, pure torch, each with its loss inside ``forward``.

Used by the CLI, the tests and the benchmarks: a GPT-style decoder (a chain of identical
blocks with dropout) and a U-Net (long skip connections, BatchNorm).
"""

from graphckpt.examples.gpt import GPT, GPTConfig, gpt_example
from graphckpt.examples.unet import UNet, unet_example

__all__ = ["GPT", "GPTConfig", "UNet", "gpt_example", "unet_example"]
