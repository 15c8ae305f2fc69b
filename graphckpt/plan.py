"""The Plan: what graphckpt decided for one model, input shape and budget. Pure data.

A Plan lists, per layer, how many tensors backward reads are kept, recomputed or offloaded and
what that costs, plus the predicted peak of the whole step. It renders as a table and
round-trips through JSON so it can be saved, diffed and reapplied.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

__all__ = ["LayerPlan", "Plan", "TensorDecision"]

Action = Literal["keep", "recompute", "offload", "partition"]
_MIB = float(1 << 20)


@dataclass(frozen=True)
class TensorDecision:
    """What happens to one forward tensor that backward reads."""

    node: str
    """Name of the node in the joint graph (stable for the same model and input shapes)."""
    layer: str
    action: Action
    nbytes: int
    reload_before: str | None = None
    """For ``offload``: the backward node before whose recompute the copy back starts."""


@dataclass(frozen=True)
class LayerPlan:
    """Totals of one layer (or the ``pre`` / ``post`` code around the layers)."""

    name: str
    num_kept: int
    num_recomputed: int
    kept_bytes: int
    recompute_flops: int
    recompute_seconds: float
    offload_bytes: int = 0
    partition_bytes: int = 0
    """Whole size of the layer's partitioned tensors (``kept_bytes`` counts this rank's slices)."""
    partition_seconds: float = 0.0
    """Estimated seconds of the all-gathers that rebuild them in backward."""


@dataclass(frozen=True)
class Plan:
    """A memory plan for one training step of one (sub)graph.

    Example:
        >>> p = Plan(budget_bytes=1 << 30, predicted_peak_bytes=1 << 29, min_peak_bytes=1 << 28,
        ...          max_peak_bytes=1 << 30, layers=[], tensors=[])
        >>> Plan.from_json(p.to_json()) == p
        True
    """

    budget_bytes: int
    predicted_peak_bytes: int
    """The simulator's peak of the whole step under this plan."""
    min_peak_bytes: int
    """The smallest budget any plan fits (the least peak found, plus the planner's headroom)."""
    max_peak_bytes: int
    """The smallest budget at which nothing is recomputed (keep-all peak, plus headroom)."""
    layers: list[LayerPlan]
    tensors: list[TensorDecision]
    device: str = "cpu"
    graph_index: int = 0
    """Which Dynamo subgraph this plan is for (0 when the model captures as one graph)."""
    planning_seconds: float = field(default=0.0, compare=False)

    @property
    def kept_bytes(self) -> int:
        """Bytes of activations kept for backward."""
        return sum(layer.kept_bytes for layer in self.layers)

    @property
    def recompute_flops(self) -> int:
        """Extra FLOPs backward spends recomputing (FlopCounterMode's counting)."""
        return sum(layer.recompute_flops for layer in self.layers)

    @property
    def recompute_seconds(self) -> float:
        """Estimated extra seconds of recompute on the target device."""
        return sum(layer.recompute_seconds for layer in self.layers)

    @property
    def offload_bytes(self) -> int:
        """Bytes moved to host memory in forward (and back in backward)."""
        return sum(layer.offload_bytes for layer in self.layers)

    def saved_nodes(self) -> set[str]:
        """Names of the joint-graph nodes kept for backward (on the device, offloaded or
        partitioned)."""
        return {t.node for t in self.tensors if t.action in ("keep", "offload", "partition")}

    def partitioned_nodes(self) -> set[str]:
        """Names of the kept nodes of which each rank keeps only a slice until backward."""
        return {t.node for t in self.tensors if t.action == "partition"}

    def offloaded_nodes(self) -> dict[str, str]:
        """Offloaded node names, each with the backward node its reload is issued before."""
        return {
            t.node: t.reload_before
            for t in self.tensors
            if t.action == "offload" and t.reload_before is not None
        }

    def table(self) -> str:
        """The plan as a terminal table: one row per layer, then totals (fits 100 columns)."""
        from tabulate import tabulate

        rows = [
            [
                layer.name[-22:],
                layer.num_kept,
                layer.num_recomputed,
                f"{layer.kept_bytes / _MIB:.2f}",
                f"{layer.recompute_flops / 1e9:.3f}",
                f"{layer.recompute_seconds * 1e3:.2f}",
                f"{layer.offload_bytes / _MIB:.2f}",
            ]
            for layer in self.layers
        ]
        rows.append(
            [
                "total",
                sum(r.num_kept for r in self.layers),
                sum(r.num_recomputed for r in self.layers),
                f"{self.kept_bytes / _MIB:.2f}",
                f"{self.recompute_flops / 1e9:.3f}",
                f"{self.recompute_seconds * 1e3:.2f}",
                f"{self.offload_bytes / _MIB:.2f}",
            ]
        )
        headers = ["layer", "kept", "recomp", "kept MiB", "recomp GFLOP", "recomp ms", "offl MiB"]
        if any(layer.partition_bytes for layer in self.layers):  # tensor-parallel plans only
            parts = [layer.partition_bytes for layer in self.layers]
            for row, nbytes in zip(rows, [*parts, sum(parts)]):
                row.append(f"{nbytes / _MIB:.2f}")
            headers.append("part MiB")
        body = tabulate(rows, headers=headers, tablefmt="simple", disable_numparse=True)
        summary = (
            f"budget {self.budget_bytes / _MIB:.1f} MiB | predicted peak "
            f"{self.predicted_peak_bytes / _MIB:.1f} MiB | feasible "
            f"{self.min_peak_bytes / _MIB:.1f}..{self.max_peak_bytes / _MIB:.1f} MiB | "
            f"device {self.device}"
        )
        return f"{body}\n{summary}"

    def to_json(self) -> str:
        """Serialise to a JSON string (``Plan.from_json`` reads it back)."""
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        """Read a plan written by :meth:`to_json`.

        Raises:
            ValueError: the text is not a graphckpt plan.
        """
        try:
            data: dict[str, Any] = json.loads(text)
            layers = [LayerPlan(**layer) for layer in data.pop("layers")]
            tensors = [TensorDecision(**t) for t in data.pop("tensors")]
            return cls(layers=layers, tensors=tensors, **data)
        except (KeyError, TypeError, json.JSONDecodeError) as e:
            raise ValueError(f"not a graphckpt plan JSON: {e}") from e
