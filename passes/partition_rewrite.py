"""Rewrite step for partitioned saves: a slice in forward, an all-gather before backward reads.

Called by ``passes/rewrite.py`` once recompute copies are in place, so every backward reader
(recompute copies included) reads the gathered tensor and only the slice crosses from forward
to backward. Reads ``val`` and ``partitioner_tag``; writes both on the nodes it adds.
"""

from __future__ import annotations

from collections.abc import Collection

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode

from graphckpt.graph_partition import GraphPartitioner
from passes.meta import PARTITIONER_TAG, VAL, node_val
from passes.trace import JointGraph

__all__ = ["insert_partitions"]


def _shard_val(node: fx.Node, world_size: int) -> torch.Tensor:
    val = node_val(node)
    fake_mode = detect_fake_mode([val])
    assert fake_mode is not None, "joint graph nodes carry fake tensors"
    with fake_mode:
        return torch.empty(-(-val.numel() // world_size), dtype=val.dtype, device=val.device)


def insert_partitions(
    jg: JointGraph, nodes: Collection[fx.Node], partitioner: GraphPartitioner
) -> None:
    """Keep only a slice of each of ``nodes`` between forward and backward.

    Args:
        jg: the joint graph being rewritten (mutated).
        nodes: forward tensors backward reads; each gets ``partition`` right after it is made
            and ``gather`` just before its first backward reader.
        partitioner: the object whose methods the new nodes call.

    Example:
        >>> # in rewrite_pass, after recompute copies: insert_partitions(jg, nodes, parts)
    """
    graph = jg.gm.graph
    position = {n: i for i, n in enumerate(graph.nodes)}
    world = partitioner.world_size
    for node in nodes:
        readers = [u for u in node.users if u.meta.get(PARTITIONER_TAG) == "is_backward"]
        if not readers:
            continue
        first = min(readers, key=position.__getitem__)
        with graph.inserting_after(node):
            shard = graph.call_function(partitioner.partition, (node,))
        shard.meta[PARTITIONER_TAG], shard.meta[VAL] = "is_forward", _shard_val(node, world)
        with graph.inserting_before(first):
            whole = graph.call_function(partitioner.gather, (shard,))
        whole.meta[PARTITIONER_TAG], whole.meta[VAL] = "is_backward", node_val(node)
        for reader in readers:
            reader.replace_input_with(node, whole)
