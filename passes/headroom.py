"""What the planner leaves free under the budget: the room a plan's simulated peak must fit.

The simulator models every tensor of the step, but not every byte: a few bytes of scalar
bookkeeping always (``HEADROOM_BYTES``), and, when inductor compiles the rewritten graphs, the
buffers its generated code allocates in its own order (``COMPILED_HEADROOM_FRACTION``). Every
solver plans into ``budget - headroom_bytes(budget)`` and states the smallest feasible budget
as :func:`smallest_budget` of the lowest peak it found.
"""

from __future__ import annotations

import math

from graphckpt.options import PlanConfig

__all__ = ["COMPILED_HEADROOM_FRACTION", "HEADROOM_BYTES", "headroom_bytes", "smallest_budget"]

HEADROOM_BYTES = 64
"""Left under the budget for allocations the simulator does not model (4 bytes of scalar
bookkeeping were measured on every model tried)."""


COMPILED_HEADROOM_FRACTION = 0.02
"""Share of the budget also left unplanned when inductor compiles the rewritten graphs
(``PlanConfig.fused_pointwise``): its generated code allocates and frees buffers in its own
order, which the simulator does not follow. Measured on the benchmark GPT at its tightest plan:
0.28 MiB (0.9%) over the prediction of 31.44 MiB; 1.0 MiB (3.3%) before the fused costs."""


def headroom_bytes(budget_bytes: int, config: PlanConfig) -> int:
    """Bytes of ``budget_bytes`` the planner leaves free: ``HEADROOM_BYTES``, plus
    ``COMPILED_HEADROOM_FRACTION`` of the budget when inductor compiles the graphs.

    Example:
        >>> headroom_bytes(1 << 20, PlanConfig())
        64
    """
    extra = math.ceil(COMPILED_HEADROOM_FRACTION * budget_bytes) if config.fused_pointwise else 0
    return HEADROOM_BYTES + extra


def smallest_budget(peak_bytes: int, config: PlanConfig) -> int:
    """The smallest budget whose room (budget less :func:`headroom_bytes`) holds ``peak_bytes``.

    Example:
        >>> smallest_budget(1000, PlanConfig())
        1064
    """
    budget = peak_bytes + HEADROOM_BYTES
    if config.fused_pointwise:
        budget = math.ceil(budget / (1 - COMPILED_HEADROOM_FRACTION))
    while budget - headroom_bytes(budget, config) < peak_bytes:
        budget += 1
    return budget
