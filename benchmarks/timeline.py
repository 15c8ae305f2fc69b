"""Memory of one training step, op by op: the simulator's prediction next to a measurement.

The model is planned and rewritten exactly as ``auto_checkpoint`` does (the same partitioner);
a wrapper around that partitioner also replays the chosen plan through the simulator with
``timeline=True``. One step then runs under a :class:`~graphckpt.memory.LiveTensorTracker`
recording the live bytes after every operator. ``benchmarks/plots.py`` draws the result.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from graphckpt.memory import LiveTensorTracker, resident_bytes
from graphckpt.options import PlanConfig
from graphckpt.plan import Plan
from passes.cost import estimate_costs
from passes.pipeline import planning_partitioner
from passes.plan import rng_state_bytes
from passes.simulate import Simulation, StepGraph, simulate
from passes.trace import JointGraph, dynamo_settings, fresh_module_call, joint_backend

__all__ = ["StepTimeline", "step_timeline"]


@dataclass(frozen=True)
class StepTimeline:
    """Live bytes during one planned training step, predicted and measured."""

    plan: Plan
    """The plan the step ran under."""
    predicted_bytes: list[int]
    """The simulator's live bytes after each node it schedules (forward, then backward with
    recomputation), parameters and inputs included."""
    measured_bytes: list[int]
    """Live bytes after each operator the step dispatched, parameters and inputs included
    (the tracker's count on top of its baseline, plus the model's resident bytes)."""
    predicted_peak_bytes: int
    """Peak of ``predicted_bytes`` as the simulator reports it (equals the plan's prediction)."""
    measured_peak_bytes: int
    """Peak of the measured step, counted like ``graphckpt.memory.step_peak_bytes``."""


def _simulate_plan(
    jg: JointGraph, plan: Plan, config: PlanConfig, device: torch.device
) -> Simulation:
    """Index ``jg`` like the planner does and simulate ``plan``'s saved set with a timeline."""
    spec = config.device_for(device)
    costs = estimate_costs([*jg.primals, *jg.forward, *jg.tangents, *jg.backward], spec)
    sg = StepGraph.build(jg, costs, rng_state_bytes(spec.type), 512 if spec.type == "cuda" else 1)
    index = {n.name: i for i, n in enumerate(sg.nodes)}
    saved = {index[name] for name in plan.saved_nodes()}
    offloaded = {index[name] for name in plan.offloaded_nodes()}

    return simulate(
        sg,
        saved,
        offloaded=offloaded,
        link_bytes_per_s=spec.host_link_bytes_per_s if offloaded else 0.0,
        timeline=True,
    )


def step_timeline(
    model: nn.Module,
    inputs: tuple[Any, ...],
    budget_bytes: int,
    *,
    config: PlanConfig | None = None,
    seed: int = 0,
) -> StepTimeline:
    """Plan ``model`` under ``budget_bytes``, run one step and return both memory timelines.

    The model is compiled once (its first call plans and is not measured), then one more
    forward+backward runs with ``torch.manual_seed(seed)`` under the tracker. CPU only: the
    measured timeline needs the dispatch-level tracker.

    Args:
        model: a module whose ``model(*inputs)`` is the scalar loss (its parameters get grads).
        inputs: the step's positional inputs.
        budget_bytes: the whole step's budget, as ``auto_checkpoint`` takes it (in bytes).
        config: planner options (defaults when None).
        seed: RNG seed set before the measured step.

    Returns:
        The :class:`StepTimeline`.

    Example:
        >>> from graphckpt.examples import gpt_example
        >>> model, inputs = gpt_example(batch=2, seq=16, n_layer=2, n_embd=32)
        >>> t = step_timeline(model, inputs, 1 << 30)
        >>> t.predicted_peak_bytes == t.plan.predicted_peak_bytes == max(t.predicted_bytes)
        True
    """
    cfg = config or PlanConfig()
    device = torch.device("cpu")
    plans: list[Plan] = []
    simulations: list[Simulation] = []

    def partition(jg: JointGraph) -> tuple[fx.GraphModule, fx.GraphModule]:
        # on_plan runs between planning and rewriting, while ``jg`` is still the graph the
        # planner indexed (dropout already split), so the simulation sees what the planner saw.
        def on_plan(p: Plan) -> None:
            plans.append(p)
            simulations.append(_simulate_plan(jg, p, cfg, device))

        return planning_partitioner(budget_bytes, cfg, device, on_plan)(jg)

    call = torch.compile(
        fresh_module_call(), backend=joint_backend(partition), fullgraph=True, dynamic=False
    )
    compiled = functools.partial(call, model)
    params = list(model.parameters())
    with dynamo_settings():
        compiled(*inputs).backward()  # compile and plan; not measured
        for p in params:
            p.grad = None
        resident = resident_bytes([*params, *model.buffers(), *inputs])
        torch.manual_seed(seed)
        with LiveTensorTracker("cpu").record_timeline() as tracker:
            compiled(*inputs).backward()
    if len(plans) != 1 or len(simulations) != 1:
        raise ValueError(f"expected the model to capture as one graph, got {len(plans)} plans")
    sim = simulations[0]
    assert sim.timeline is not None and tracker.timeline is not None
    offset = resident - tracker.baseline_bytes
    return StepTimeline(
        plan=plans[0],
        predicted_bytes=list(sim.timeline),
        measured_bytes=[b + offset for b in tracker.timeline],
        predicted_peak_bytes=sim.peak_bytes,
        measured_peak_bytes=tracker.peak_bytes + offset,
    )
