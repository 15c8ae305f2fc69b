"""Compile-time graph passes of graphckpt, in pipeline order: trace, cost, plan, rewrite.

Analysis passes return data and never mutate a graph; only ``rewrite`` mutates.
"""

__all__: list[str] = []
