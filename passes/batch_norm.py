"""Before planning: stop training-mode batch-norm backward from holding the new running stats.

AOTAutograd's functional batch norm returns the updated running mean and variance as new
tensors (the runtime copies them into the buffers), and the joint graph passes those new tensors
to ``native_batch_norm_backward``. In training mode that op never reads them: it normalises with
the saved batch statistics. Eager PyTorch updates the buffers in place, so nothing extra is held;
the joint graph, read literally, keeps two per-channel tensors per batch norm alive from forward
to backward (about 5.6 KB on the benchmark U-Net). This pass passes ``None`` instead, so the
plan, the simulator and the rewritten step hold exactly what eager holds. Mutates the joint
graph; reads ``partitioner_tag``.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from passes.meta import is_forward
from passes.trace import JointGraph

__all__ = ["drop_unread_batch_norm_stats"]

_BACKWARD = torch.ops.aten.native_batch_norm_backward.default
_RUNNING_STATS = (3, 4)
"""Positions of ``running_mean`` and ``running_var`` in ``native_batch_norm_backward``."""
_TRAIN = 7


def drop_unread_batch_norm_stats(jg: JointGraph) -> int:
    """Pass ``None`` for the running statistics of every training-mode batch-norm backward.

    Only forward values are replaced (the updated statistics the functional batch norm made);
    primal buffers are resident anyway and stay.

    Args:
        jg: the joint graph (mutated, then its role lists refreshed).

    Returns:
        How many arguments were replaced.

    Example:
        >>> # in a partitioner, before planning: drop_unread_batch_norm_stats(jg)
    """
    count = 0
    for node in jg.backward:
        if node.target is not _BACKWARD or node.args[_TRAIN] is not True:
            continue
        args = list(node.args)
        for i in _RUNNING_STATS:
            if isinstance(args[i], fx.Node) and is_forward(args[i]):
                args[i] = None
                count += 1
        node.args = tuple(args)
    if count:
        jg.gm.graph.lint()
        jg.gm.recompile()
        jg.refresh()
    return count
