"""Which layers' kept tensors the planner sends to host memory: those whose copies hide.

Offload is free when the host link keeps up: a layer's copy to host must finish before forward
ends, and its copy back must finish before backward reaches the layer, with one link shared by
all copies. Layers are taken in forward order (the first layers' tensors have the most compute
to hide behind in both directions) while both hold. Backward is priced at twice the forward
compute of a layer. Pure data in, a count out.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["hidden_offload_prefix"]


def hidden_offload_prefix(
    forward_seconds: Sequence[float],
    offload_bytes: Sequence[int],
    link_bytes_per_s: float,
    backward_factor: float = 2.0,
) -> int:
    """How many leading segments can offload their kept tensors with every copy hidden.

    Args:
        forward_seconds: forward compute seconds of each segment, in forward order.
        offload_bytes: bytes each segment would offload.
        link_bytes_per_s: host-link bandwidth; 0 means no offload.
        backward_factor: backward compute of a segment relative to its forward.

    Returns:
        The largest ``j`` such that offloading segments ``0..j-1`` stalls neither pass.

    Example:
        >>> hidden_offload_prefix([1.0, 1.0, 1.0], [1, 1, 1], link_bytes_per_s=1.0)
        2
    """
    if link_bytes_per_s <= 0:
        return 0
    n = len(forward_seconds)
    ends, t = [], 0.0
    for s in forward_seconds:
        t += s
        ends.append(t)
    forward_end = t
    # Backward visits segments in reverse; segment i's backward starts after the later ones'.
    bwd_start, t = [0.0] * n, 0.0
    for i in reversed(range(n)):
        bwd_start[i] = t
        t += backward_factor * forward_seconds[i]
    best, link_free = 0, 0.0
    for j in range(n):
        link_free = max(link_free, ends[j]) + offload_bytes[j] / link_bytes_per_s
        if link_free > forward_end:
            break
        # Copies back, latest-needed first (segment 0 is needed last), as late as possible.
        next_start, hidden = float("inf"), True
        for i in range(j + 1):
            finish = min(bwd_start[i], next_start)
            next_start = finish - offload_bytes[i] / link_bytes_per_s
            hidden = hidden and next_start >= 0
        if not hidden:
            break
        best = j + 1
    return best
