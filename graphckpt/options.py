"""Options of the planner: what it may do, and the device it plans for.

``PlanConfig`` is the one frozen config object ``auto_checkpoint``, ``plan`` and ``backend``
take; ``DeviceSpec`` holds the roofline numbers the cost model prices operations with.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Literal

import torch

__all__ = ["DeviceSpec", "PlanConfig"]


@dataclass(frozen=True, kw_only=True)
class DeviceSpec:
    """Roofline numbers of the device a plan is made for.

    Example:
        >>> DeviceSpec.preset("cuda").host_link_bytes_per_s > 0
        True
    """

    type: Literal["cpu", "cuda"] = "cpu"
    """Device type the plan runs on."""
    flops_per_s: float = 150e9
    """Sustained matmul/conv throughput in FLOP/s for the model's dtype."""
    bytes_per_s: float = 20e9
    """Effective memory bandwidth in bytes/s for layer-sized tensors (prices pointwise ops)."""
    host_link_bytes_per_s: float = 0.0
    """Device-to-host copy bandwidth in bytes/s; 0 means offload is impossible."""
    op_overhead_s: float = 5e-6
    """Fixed cost of launching one operator."""
    random_elements_per_s: float = 6e8
    """Throughput of random-number generation (dropout masks), in elements per second."""
    collective_bytes_per_s: float = 1e9
    """All-gather bandwidth per rank in bytes/s (prices tensor-parallel partitioned saves)."""
    collective_latency_s: float = 1e-4
    """Fixed cost of one all-gather."""

    def __post_init__(self) -> None:
        if self.type not in ("cpu", "cuda"):
            raise ValueError(f"DeviceSpec.type must be 'cpu' or 'cuda', got {self.type!r}")
        for name in (
            "flops_per_s",
            "bytes_per_s",
            "random_elements_per_s",
            "collective_bytes_per_s",
        ):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(
                    f"DeviceSpec.{name} must be a positive finite number, got {value!r}"
                )
        for name in ("host_link_bytes_per_s", "op_overhead_s", "collective_latency_s"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"DeviceSpec.{name} must be a finite number >= 0, got {value!r}")

    @classmethod
    def preset(cls, device: str | torch.device) -> DeviceSpec:
        """Fixed numbers for a device type: a 2-core x86 CPU, or an H100-class GPU.

        The CPU numbers were measured on the project's 2-core machine: about 150 GFLOP/s for
        fp32 matmuls, about 20 GB/s for pointwise ops on tensors of a few MiB (they stay in
        cache), about 6e8 dropout draws per second. The all-gather numbers are assumptions
        (gloo over local TCP; NVLink-class for the GPU), not measurements.

        Presets keep plans deterministic across runs and ranks; use :meth:`calibrate` to
        measure the machine instead.
        """
        kind = torch.device(device).type
        if kind == "cuda":
            return cls(
                type="cuda",
                flops_per_s=400e12,
                bytes_per_s=3.0e12,
                host_link_bytes_per_s=50e9,
                op_overhead_s=5e-6,
                random_elements_per_s=1e11,
                collective_bytes_per_s=100e9,
                collective_latency_s=2e-5,
            )
        if kind in ("cpu", "meta"):
            return cls(type="cpu")
        raise ValueError(f"no DeviceSpec preset for device type {kind!r}; pass DeviceSpec(...)")

    @classmethod
    def calibrate(cls, device: str | torch.device = "cpu") -> DeviceSpec:
        """Measure matmul throughput, memory bandwidth and host-link bandwidth on ``device``."""
        dev = torch.device(device)

        def seconds(fn: object, repeats: int = 5) -> float:
            assert callable(fn)
            fn()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            start = time.perf_counter()
            for _ in range(repeats):
                fn()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            return (time.perf_counter() - start) / repeats

        n = 1024 if dev.type == "cpu" else 4096
        a = torch.randn(n, n, device=dev)
        flops = 2 * n**3 / seconds(lambda: a @ a)
        x = torch.randn(8 << 20, device=dev)
        bandwidth = 2 * x.numel() * 4 / seconds(lambda: x.mul_(1.0))
        link = 0.0
        if dev.type == "cuda":
            host = torch.empty_like(x, device="cpu").pin_memory()
            link = x.numel() * 4 / seconds(lambda: host.copy_(x, non_blocking=True))
        small = torch.randn(8, device=dev)
        overhead = seconds(lambda: small.add_(1.0), repeats=200)
        random_rate = x.numel() / seconds(lambda: x.bernoulli_(0.5))
        return cls(
            type="cuda" if dev.type == "cuda" else "cpu",
            flops_per_s=flops,
            bytes_per_s=bandwidth,
            host_link_bytes_per_s=link,
            op_overhead_s=overhead,
            random_elements_per_s=random_rate,
        )


@dataclass(frozen=True, kw_only=True)
class PlanConfig:
    """Everything the planner may do, and what it knows about the target.

    Example:
        >>> PlanConfig(allow_offload=False).allow_recompute
        True
    """

    allow_recompute: bool = True
    """Recompute activations in backward instead of keeping them."""
    allow_offload: bool | None = None
    """Offload activations to host memory. None: only when the target is a GPU."""
    device: DeviceSpec | None = None
    """Target device cost numbers. None: the preset for the model's device."""
    layers: str | None = None
    """Module path of the model's repeated layers (e.g. ``"transformer.h"``); None: detected."""
    min_offload_bytes: int = 256 << 10
    """Smallest tensor worth a host copy (smaller ones stay on the device)."""
    num_lambda_points: int = 16
    """How many memory/recompute trade-offs the min-cut explores per distinct layer."""
    solver: Literal["search", "milp"] = "search"
    """``"search"``: min-cut layer search plus per-tensor local search (any size). ``"milp"``: the
    exact keep/recompute MILP (``passes/milp.py``, HiGHS), for small graphs only (at most
    ``MILP_MAX_NODES`` joint-graph nodes); it does not plan offload."""
    local_search_node_visits: int = 40_000
    """Work the per-tensor local search after the layer search may spend, in simulated graph
    nodes (``passes/refine.py``): many moves on small graphs, few on big ones; 0 turns it off."""
    check_plans: bool = True
    """Under torch.distributed, check before the first step that every rank of ``plan_group``
    made the same plan (``graphckpt.distributed``). Turn off where ranks plan different models
    (pipeline stages), or pass the group whose ranks share one."""
    plan_group: Any = None
    """Process group whose ranks must agree on the plan; None: the default group."""
    plan_check_timeout_s: float = 120.0
    """How long the plan check waits, on every rank, for the other ranks to arrive before failing
    (on any backend: the ranks meet in the process group's store, not in a collective)."""
    fused_pointwise: bool | None = None
    """Whether a compiler that fuses pointwise ops (inductor) runs the rewritten graphs. Then
    recomputing a pointwise op inside backward's fused kernels costs next to nothing, while
    keeping its output costs a write in forward that fusion would have saved; the cost model
    prices both (``passes/cost.py``). None: automatic, True under ``graphckpt.backend`` with
    ``compiler="inductor"``, False for ``auto_checkpoint`` (eager fx graphs)."""
    measure_op_seconds: bool = False
    """Time each forward op on this CPU and price it at the larger of its roofline and its
    measured time (``passes/op_seconds.py``; about a second on the benchmark models). Some
    kernels run far below the roofline (CPU max pooling, about 8x), so a plan that recomputes
    them is slower than the roofline says. Only for a model on this CPU, planned for a CPU and
    run eagerly (``auto_checkpoint``); ignored with a warning elsewhere. Off by default: timings
    vary from run to run, and so can plans near a tie and the smallest feasible budget an
    error states. Under a multi-rank ``torch.distributed`` job the ranks would time
    differently and make different plans."""
    recompute_random: bool = True
    """Whether backward may recompute random ops (dropout's draw), replaying the generator state
    forward used. False where the compiler draws random numbers its own way, which no replay
    reaches (``graphckpt.backend(exact_rng=False)``): every draw backward needs is then kept."""
    tp_group: Any = None
    """Process group of tensor-parallel ranks that hold identical activations. With one of more
    than one rank, the planner may keep only this rank's 1/world slice of a saved tensor and
    all-gather it before backward reads it (``passes/partition_plan.py``), priced with
    ``DeviceSpec.collective_bytes_per_s``."""

    def __post_init__(self) -> None:
        if self.fused_pointwise is not None and not isinstance(self.fused_pointwise, bool):
            raise TypeError(
                f"PlanConfig.fused_pointwise must be a bool or None, got {self.fused_pointwise!r}"
            )
        for name in ("allow_recompute", "check_plans", "recompute_random", "measure_op_seconds"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"PlanConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if self.allow_offload is not None and not isinstance(self.allow_offload, bool):
            raise TypeError(
                f"PlanConfig.allow_offload must be a bool or None, got {self.allow_offload!r}"
            )
        if self.device is not None and not isinstance(self.device, DeviceSpec):
            raise TypeError(
                f"PlanConfig.device must be a DeviceSpec, got {type(self.device).__name__}"
            )
        if self.layers is not None and not (isinstance(self.layers, str) and self.layers):
            raise ValueError(
                f"PlanConfig.layers must be a module path like 'blocks', got {self.layers!r}"
            )
        if not (isinstance(self.min_offload_bytes, int) and self.min_offload_bytes >= 0):
            raise ValueError(
                f"PlanConfig.min_offload_bytes must be an int >= 0, got {self.min_offload_bytes!r}"
            )
        timeout = self.plan_check_timeout_s
        if not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0):
            raise ValueError(
                f"PlanConfig.plan_check_timeout_s must be a positive number, got {timeout!r}"
            )
        if self.solver not in ("search", "milp"):
            raise ValueError(f"PlanConfig.solver must be 'search' or 'milp', got {self.solver!r}")
        visits = self.local_search_node_visits
        if not (isinstance(visits, int) and not isinstance(visits, bool) and visits >= 0):
            raise ValueError(
                f"PlanConfig.local_search_node_visits must be an int >= 0, got {visits!r}"
            )
        if not (isinstance(self.num_lambda_points, int) and 2 <= self.num_lambda_points <= 256):
            raise ValueError(
                "PlanConfig.num_lambda_points must be an int in [2, 256], "
                f"got {self.num_lambda_points!r}"
            )

    @classmethod
    def from_options(cls, config: PlanConfig | None, options: dict[str, object]) -> PlanConfig:
        """``config`` itself, or a PlanConfig built from keyword ``options`` (not both).

        Raises:
            TypeError: both were given, or an option is unknown.
        """
        if config is not None and options:
            raise TypeError("pass either config=PlanConfig(...) or keyword options, not both")
        return config if config is not None else cls(**options)  # type: ignore[arg-type]

    def device_for(self, device: torch.device) -> DeviceSpec:
        """The DeviceSpec to plan with for a model living on ``device``."""
        return self.device if self.device is not None else DeviceSpec.preset(device)

    def offload_allowed(self, spec: DeviceSpec) -> bool:
        """Whether the planner may offload on ``spec``."""
        if self.allow_offload is None:
            return spec.type == "cuda" and spec.host_link_bytes_per_s > 0
        return self.allow_offload and spec.host_link_bytes_per_s > 0
