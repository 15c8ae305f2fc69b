"""Tests of passes/op_seconds.py: forward ops timed on this CPU, once per distinct op and shape,
and priced by the cost model at no less than their roofline."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from torch import nn

from graphckpt.options import DeviceSpec, PlanConfig
from passes.cost import estimate_costs
from passes.op_seconds import measurable, measure_op_seconds, measures_op_seconds
from passes.trace import capture_joint_graphs

_POOL = torch.ops.aten.max_pool2d_with_indices.default


class _PoolNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(self.a(x).relu(), 2)
        return nn.functional.max_pool2d(self.b(x).relu(), 1).square().mean()


def _joint() -> object:
    torch.manual_seed(0)
    return capture_joint_graphs(_PoolNet(), (torch.randn(4, 8, 32, 32),))[0]


def test_each_distinct_forward_op_is_timed_and_views_and_placeholders_are_not() -> None:
    jg = _joint()
    seconds = measure_op_seconds(jg.forward)  # type: ignore[attr-defined]
    assert seconds and all(s > 0 for s in seconds.values())
    assert all(measurable(n) for n in seconds)
    pools = [n for n in jg.forward if n.target is _POOL]  # type: ignore[attr-defined]
    assert len(pools) == 2 and all(n in seconds for n in pools)
    assert not any(n.op == "placeholder" for n in seconds)


def test_nodes_with_the_same_op_and_shapes_share_one_measurement() -> None:
    g = torch.fx.Graph()
    xs = [g.placeholder(f"x{i}") for i in range(3)]
    for x in xs:
        x.meta["val"] = torch.empty(256, 256)
    ys = [g.call_function(torch.ops.aten.relu.default, (x,)) for x in xs]
    for y in ys:
        y.meta["val"] = torch.empty(256, 256)
    seconds = measure_op_seconds(ys)
    assert len({seconds[y] for y in ys}) == 1


def test_a_spent_time_allowance_warns_and_leaves_the_rest_to_the_roofline() -> None:
    jg = _joint()
    with pytest.warns(UserWarning, match="priced by the roofline alone"):
        seconds = measure_op_seconds(jg.forward, max_total_s=0.0)  # type: ignore[attr-defined]
    assert seconds == {}


def test_measured_prices_are_never_below_the_roofline_and_raise_slow_kernels() -> None:
    jg = _joint()
    nodes = [*jg.forward, *jg.backward]  # type: ignore[attr-defined]
    # A device whose roofline is 1000x too optimistic: every timed forward op costs more than it
    # says, so measurement decides; backward ops are never timed.
    fast = dataclasses.replace(DeviceSpec(), flops_per_s=1e15, bytes_per_s=1e14, op_overhead_s=1e-9)
    modelled = estimate_costs(nodes, fast, backward=jg.backward)  # type: ignore[attr-defined]
    timed = estimate_costs(
        nodes,
        fast,
        measure_seconds=True,
        backward=jg.backward,  # type: ignore[attr-defined]
    )
    assert all(timed[n].seconds >= modelled[n].seconds for n in nodes)
    pools = [n for n in jg.forward if n.target is _POOL]  # type: ignore[attr-defined]
    assert all(timed[n].seconds > 10 * modelled[n].seconds for n in pools)
    assert all(timed[n].seconds == modelled[n].seconds for n in jg.backward)  # type: ignore[attr-defined]
    # Under a fusing compiler the timings are of the wrong kernels: not used.
    fused = estimate_costs(
        nodes,
        fast,
        measure_seconds=True,
        fused_pointwise=True,
        backward=jg.backward,  # type: ignore[attr-defined]
    )
    assert fused == estimate_costs(nodes, fast, fused_pointwise=True, backward=jg.backward)  # type: ignore[attr-defined]


def test_timing_is_asked_for_and_only_taken_for_an_eager_cpu_plan() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    spec, on = DeviceSpec(), PlanConfig(measure_op_seconds=True)
    assert not measures_op_seconds(PlanConfig(), cpu, spec)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert measures_op_seconds(on, cpu, spec)
    for device, target, config in [
        (cuda, spec, on),
        (cpu, DeviceSpec.preset("cuda"), on),
        (cpu, spec, dataclasses.replace(on, fused_pointwise=True)),
    ]:
        with pytest.warns(UserWarning, match="measure_op_seconds=True is ignored"):
            assert not measures_op_seconds(config, device, target)


def test_measure_op_seconds_must_be_a_bool() -> None:
    with pytest.raises(TypeError, match="measure_op_seconds must be a bool"):
        PlanConfig(measure_op_seconds="yes")  # type: ignore[arg-type]


def test_a_timed_plan_of_a_pooling_net_fits_and_runs() -> None:
    import graphckpt

    torch.manual_seed(0)
    model, x = _PoolNet(), torch.randn(4, 8, 32, 32)
    wide = graphckpt.plan(model, (x,), budget_gb=1.0, measure_op_seconds=True)
    budget = (wide.min_peak_bytes + wide.max_peak_bytes) // 2
    ckpt = graphckpt.auto_checkpoint(
        model, budget / 2**30, example_inputs=(x,), measure_op_seconds=True
    )
    ckpt(x).backward()
    assert ckpt.plan.predicted_peak_bytes <= budget
