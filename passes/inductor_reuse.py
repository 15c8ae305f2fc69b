"""While inductor compiles our graphs: give its buffer reuse the sizes it needs.

``graphckpt.backend`` compiles with inductor's ``reorder_for_peak_memory`` off (the planner
simulated the peak in program order; see ``graphckpt.backend._inductor_settings``). That pass
is also what fills in each scheduler buffer's memory-planning info (its size and the nodes that
free it). Without it, every buffer reads as 0 bytes, inductor's peak estimate is 0, and its
wrapper reuses a freed buffer for a new one only between adjacent kernels (a reuse may not raise
the estimated peak, and nothing fits under 0). Measured on the benchmark Hugging Face GPT-2:
the forward allocated 198 buffers and reused 54, against 74 and 158 for a plain torch.compile;
with the info filled in, 99 and 153, and the compiled step 2% faster.

:func:`assign_planning_info` is a scheduler pass (inductor's ``_post_fusion_custom_pass``) that
fills in the info the way the reorder pass would, and leaves the order alone. Reads and writes
inductor's scheduler buffers only; ``planning_info_for_reuse()`` installs it for one compile.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

__all__ = ["assign_planning_info", "planning_info_for_reuse"]


def assign_planning_info(nodes: list[Any]) -> list[Any]:
    """Fill in the memory-planning info of every buffer of ``nodes``; same nodes, same order.

    Args:
        nodes: inductor scheduler nodes after fusion, in program order (one compile's).

    Returns:
        ``nodes``, unchanged.

    Example:
        >>> assign_planning_info([])
        []
    """
    if not nodes:
        return nodes
    from torch._inductor.memory import assign_memory_planning_info_for_scheduler_buffers
    from torch._inductor.virtualized import V

    scheduler = nodes[0].scheduler
    # The scheduler is still being built, so the graph does not point at it yet; inductor's
    # helper reads its mutation names through the graph.
    graph = V.graph
    before = graph.scheduler
    graph.scheduler = scheduler
    try:
        assign_memory_planning_info_for_scheduler_buffers(nodes, scheduler.name_to_buf)
    finally:
        graph.scheduler = before
    return nodes


@contextlib.contextmanager
def planning_info_for_reuse() -> Iterator[None]:
    """While inductor compiles, fill in buffer sizes for its buffer reuse (scoped config).

    Example:
        >>> with planning_info_for_reuse():
        ...     pass  # compile_fx_inner(gm, inputs)
    """
    import torch._inductor.config as inductor_config

    with inductor_config.patch(_post_fusion_custom_pass=assign_planning_info):
        yield
