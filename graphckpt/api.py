"""The one verb: ``auto_checkpoint(model, budget_gb)``, and ``plan`` to look without changing.

Both capture the model with Dynamo + AOTAutograd, plan with ``passes`` and (for
``auto_checkpoint``) run the rewritten forward and backward graphs eagerly.
"""

from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from graphckpt.errors import GraphCkptError
from graphckpt.graph_offload import GraphOffloader
from graphckpt.options import PlanConfig
from graphckpt.original_step import (
    call_key,
    may_run_original,
    original_step_peak,
    state_restored,
)
from graphckpt.plan import Plan

__all__ = ["CheckpointedModule", "auto_checkpoint", "budget_to_bytes", "plan"]


def budget_to_bytes(budget_gb: object) -> int:
    """Validate a budget in GiB and convert it to bytes.

    Raises:
        TypeError: not a real number.
        ValueError: not positive and finite.
    """
    if isinstance(budget_gb, bool) or not isinstance(budget_gb, (int, float)):
        raise TypeError(f"budget_gb must be a number of GiB, got {type(budget_gb).__name__}")
    if not math.isfinite(budget_gb) or budget_gb <= 0:
        raise ValueError(f"budget_gb must be a positive finite number of GiB, got {budget_gb!r}")
    return int(budget_gb * (1 << 30))


def _model_device(model: nn.Module, inputs: Sequence[Any]) -> torch.device:
    for t in model.parameters():
        return t.device
    for x in inputs:
        if isinstance(x, torch.Tensor):
            return x.device
    return torch.device("cpu")


class CheckpointedModule(nn.Module):
    """``model`` with its training step planned and rewritten to fit a budget.

    It shares the original's parameters, buffers and submodules (same objects, same
    ``state_dict()`` keys), so optimizers, checkpoints and ``.to()`` work as on the original.
    Without grad (``torch.no_grad()``, ``inference_mode``) it calls the original directly.
    It can be saved whole (``torch.save``, ``pickle``) or deep-copied: the copy keeps the plans
    made so far and plans again, for itself, on its first training call.
    """

    def __init__(self, model: nn.Module, budget_bytes: int, config: PlanConfig) -> None:
        super().__init__()
        self._modules = model._modules
        self._parameters = model._parameters
        self._buffers = model._buffers
        object.__setattr__(self, "wrapped", model)
        object.__setattr__(self, "plans", [])
        object.__setattr__(self, "budget_bytes", budget_bytes)
        object.__setattr__(self, "config", config)
        object.__setattr__(self, "offloader", GraphOffloader())
        object.__setattr__(self, "_plan_for_call", {})
        object.__setattr__(self, "_original_peaks", {})
        object.__setattr__(self, "_latest", None)
        # The measured peak of the original step the latest call ran (None: the plan ran).
        object.__setattr__(self, "_ran_original", None)
        # The tensor inputs of the call being compiled: resident, so counted in the budget
        # even where the graph drops them as unused.
        object.__setattr__(self, "_call_inputs", ())
        self.training = model.training
        object.__setattr__(self, "_compiled", self._make_compiled())

    def _make_compiled(self) -> Any:
        from passes.pipeline import planning_partitioner
        from passes.trace import fresh_module_call, joint_backend

        model = self.wrapped
        device = _model_device(model, ())
        partitioner = planning_partitioner(
            self.budget_bytes, self.config, device, self.plans.append, self.offloader
        )

        # Dynamo's cache lives in the code object, out of the garbage collector's sight, and keeps
        # the backend alive: the backend must not keep this wrapper or its model alive (a weak
        # reference), or neither would ever be freed.
        me = weakref.ref(self)

        def resident() -> list[Any]:
            owner = me()
            if owner is None:
                return []
            inner = owner.wrapped
            return [*inner.parameters(), *inner.buffers(), *owner._call_inputs]

        # A function of this wrapper's own: Dynamo's compiled code for it goes when the wrapper
        # goes, where on a code object shared by every wrapper it would stay until the process
        # ends (or reaches Dynamo's limit of compiles per code object).
        compiled = torch.compile(
            fresh_module_call(),
            backend=joint_backend(partitioner, resident=resident),
            fullgraph=True,
            dynamic=False,
        )
        return functools.partial(compiled, model)

    @property
    def plan(self) -> Plan | None:
        """The plan for the input shapes of the latest training call (None before the first)."""
        if self._latest is not None:
            return self._latest
        return self.plans[-1] if self.plans else None

    @property
    def predicted_peak_bytes(self) -> int | None:
        """The expected peak of what the latest training call ran: the plan's prediction, or,
        when the original module ran, the peak its step was measured at (None before a call)."""
        plan = self.plan
        if plan is None:
            return None
        if self._ran_original is not None:
            return int(self._ran_original)
        return plan.predicted_peak_bytes

    @property
    def runs_original(self) -> bool:
        """Whether the latest training call ran the original module instead of the rewritten
        graphs of ``plan`` (its step was measured to fit the budget: :meth:`measure_original`)."""
        return self._ran_original is not None

    def backend(self, **options: Any) -> Any:
        """A ``torch.compile`` backend that plans this module's step under the same budget.

        ``torch.compile(ckpt, backend=ckpt.backend())`` compiles the wrapped model as one graph
        (no break at the wrapper) and applies a plan made for the same budget and options inside
        it; by default inductor compiles the rewritten forward and backward graphs.

        Args:
            options: keyword arguments of :func:`graphckpt.backend` other than the budget and
                config (``compiler``, ``on_plan``).

        Returns:
            A :class:`graphckpt.backend.GraphCkptBackend`.
        """
        from graphckpt.backend import backend

        return backend(self.budget_bytes / (1 << 30), config=self.config, **options)

    def compile(self, *, backend_options: dict[str, Any] | None = None, **kwargs: Any) -> None:
        """Compile this module in place, like ``nn.Module.compile``, with :meth:`backend` as the
        backend unless ``backend`` is given, so the compiled step is planned for this budget.

        Args:
            backend_options: keyword arguments for :meth:`backend`.
            kwargs: keyword arguments of ``torch.compile``.
        """
        if "backend" not in kwargs:
            kwargs["backend"] = self.backend(**(backend_options or {}))
        super().compile(**kwargs)

    def __getstate__(self) -> dict[str, Any]:
        """What ``pickle``, ``torch.save`` and ``copy.deepcopy`` keep: everything but the
        compiled step and the offloader, which belong to this object (the compiled step plans
        into this object's list and calls this model); :meth:`__setstate__` makes new ones."""
        state = dict(self.__dict__)
        for name in ("_compiled", "offloader", "_call_inputs"):
            del state[name]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Restore a pickled or copied wrapper: same model, budget, config and plans made so
        far, and a compiled step of its own, which plans again on its first training call."""
        self.__dict__.update(state)
        object.__setattr__(self, "offloader", GraphOffloader())
        object.__setattr__(self, "_call_inputs", ())
        object.__setattr__(self, "_compiled", self._make_compiled())

    def train(self, mode: bool = True) -> CheckpointedModule:
        """Set training mode on the wrapped model too (its own forward may read it)."""
        self.wrapped.train(mode)
        self.training = mode
        return self

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.wrapped, name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the wrapped model: planned and rewritten when grad is enabled, as-is otherwise."""
        if not torch.is_grad_enabled() or torch.compiler.is_compiling():
            # Inside an outer torch.compile the wrapped model is traced as it is, so the outer
            # compile sees one graph; ``self.backend()`` plans that graph under the same budget.
            return self.wrapped(*args, **kwargs)
        key = call_key(self.wrapped, args, kwargs)
        known = self._plan_for_call.get(key) if key is not None else None
        peak = self._original_peaks.get(key) if known is not None else None
        fits = peak is not None and peak <= self.budget_bytes
        object.__setattr__(self, "_ran_original", peak if fits else None)
        if fits:
            # The original step fits the budget: the same step, bitwise, with no recompute and
            # without the fx graphs' per-op overhead.
            object.__setattr__(self, "_latest", known)
            return self.wrapped(*args, **kwargs)
        num_plans = len(self.plans)
        out = self._run_compiled(args, kwargs)
        if len(self.plans) > num_plans and key is not None:
            self._plan_for_call[key] = self.plans[-1]
        object.__setattr__(self, "_latest", self._plan_for_call.get(key, self.plan))
        return out

    def measure_original(self, args: Sequence[Any], kwargs: dict[str, Any]) -> None:
        """Let calls like this one run the original module when its step fits the budget.

        When the plan for these inputs recomputes no FLOPs and offloads nothing, measure one
        plain step of the original module (state restored afterwards); if it fits the budget,
        later calls with the same input signature call the original directly. The plan made for
        them stays in ``plans``. :func:`auto_checkpoint` does this when given example inputs,
        outside any training step, since the measurement itself allocates a step's memory.
        """
        key = call_key(self.wrapped, args, kwargs)
        known = self._plan_for_call.get(key) if key is not None else None
        if known is None or not may_run_original(known) or key in self._original_peaks:
            return
        self._original_peaks[key] = original_step_peak(self.wrapped, args, kwargs)

    def _run_compiled(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        from passes.trace import describe_trace_failure, dynamo_settings

        leaves = torch.utils._pytree.tree_leaves((args, kwargs))
        object.__setattr__(self, "_call_inputs", tuple(leaves))
        try:
            with dynamo_settings():
                return self._compiled(*args, **kwargs)
        except GraphCkptError:
            raise
        except torch._dynamo.exc.BackendCompilerFailed as e:
            if isinstance(e.inner_exception, GraphCkptError):
                raise e.inner_exception from None
            raise describe_trace_failure(self.wrapped, e) from e
        except (torch._dynamo.exc.Unsupported, torch._dynamo.exc.UserError) as e:
            raise describe_trace_failure(self.wrapped, e) from e
        finally:
            object.__setattr__(self, "_call_inputs", ())


def _plan_now(wrapped: CheckpointedModule, args: Sequence[Any], kwargs: dict[str, Any]) -> None:
    """Plan by running one training forward, leaving the model's state as it was."""
    with state_restored(wrapped.wrapped, [*args, *kwargs.values()]), torch.enable_grad():
        wrapped(*args, **kwargs)
    wrapped.measure_original(args, kwargs)


def auto_checkpoint(
    model: nn.Module,
    budget_gb: float,
    example_inputs: Sequence[Any] | None = None,
    *,
    example_kwargs: dict[str, Any] | None = None,
    config: PlanConfig | None = None,
    **options: Any,
) -> CheckpointedModule:
    """Return ``model`` planned so that one training step peaks at most ``budget_gb`` GiB.

    The budget covers parameters, buffers, inputs, gradients, kept and recomputed activations
    and temporaries of one forward+backward on the model's device (DESIGN.md). Activations are
    kept or recomputed per tensor to meet it with the least estimated recompute time; dropout
    and other random ops replay their generator state, so results equal the original's.

    Args:
        model: the module to train.
        budget_gb: the budget in GiB (2**30 bytes).
        example_inputs: positional inputs of one training call: plan now. Without them, the
            first training call plans (with the same result).
        example_kwargs: keyword inputs of that call.
        config: a PlanConfig; or give its fields as keyword ``options``.

    Returns:
        A CheckpointedModule; its ``.plan`` is the Plan for the latest input shapes. A call with
        new input shapes plans again.

    Raises:
        TypeError, ValueError: a bad budget or option.
        InfeasibleBudgetError: no plan fits (it states the smallest feasible peak).
        TraceError: the model cannot be captured as one graph (names module and operation).

    Example:
        >>> from graphckpt.examples import gpt_example
        >>> model, inputs = gpt_example(n_layer=2, n_embd=32, seq=16, batch=2)
        >>> ckpt = auto_checkpoint(model, budget_gb=1.0, example_inputs=inputs)
        >>> ckpt(*inputs).backward()
        >>> ckpt.plan.predicted_peak_bytes <= 2**30
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"auto_checkpoint expects an nn.Module, got {type(model).__name__}")
    budget_bytes = budget_to_bytes(budget_gb)
    cfg = PlanConfig.from_options(config, options)
    from graphckpt.parallel import CheckpointedDDP, checkpoint_module

    if isinstance(model, nn.parallel.DistributedDataParallel):
        inner = auto_checkpoint(
            model.module, budget_gb, example_inputs, example_kwargs=example_kwargs, config=cfg
        )
        return CheckpointedDDP(model, inner)
    wrapped = checkpoint_module(model, budget_bytes, cfg)
    if example_inputs is not None or example_kwargs is not None:
        _plan_now(wrapped, tuple(example_inputs or ()), dict(example_kwargs or {}))
    return wrapped


def plan(
    model: nn.Module,
    example_inputs: Sequence[Any],
    budget_gb: float,
    *,
    example_kwargs: dict[str, Any] | None = None,
    config: PlanConfig | None = None,
    **options: Any,
) -> Plan:
    """Plan ``model`` under ``budget_gb`` and return the Plan, changing nothing.

    Runs one forward to capture the graph (with meta-device parameters and inputs, nothing is
    computed). Arguments and errors as :func:`auto_checkpoint`.

    Example:
        >>> from graphckpt.examples import gpt_example
        >>> model, inputs = gpt_example(n_layer=2, n_embd=32, seq=16, batch=2)
        >>> p = plan(model, inputs, budget_gb=1.0)
        >>> p.predicted_peak_bytes <= p.budget_bytes
        True
    """
    from passes.batch_norm import drop_unread_batch_norm_stats
    from passes.decompose import split_dropout
    from passes.partition_plan import plan_for_group
    from passes.replicate import capture_for_planning

    budget_bytes = budget_to_bytes(budget_gb)
    cfg = PlanConfig.from_options(config, options)
    kwargs = dict(example_kwargs or {})
    with state_restored(model, [*example_inputs, *kwargs.values()]):
        # A deep stack of identical layers is built from 2 and 3 traced layers (seconds saved on
        # a 48-layer model); anything else is traced in full.
        graphs = capture_for_planning(model, tuple(example_inputs), kwargs, layers=cfg.layers)
    if not graphs:
        raise ValueError(
            "nothing in this call requires grad (no parameter or input with requires_grad), "
            "so there is no backward to plan"
        )
    split_dropout(graphs[0])
    drop_unread_batch_norm_stats(graphs[0])
    # With a tp_group of more than one rank: the partitioned plan auto_checkpoint would make.
    return plan_for_group(graphs[0], budget_bytes, cfg, _model_device(model, example_inputs))
