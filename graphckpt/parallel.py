"""auto_checkpoint with data-parallel wrappers: DistributedDataParallel and FSDP2's fully_shard.

``graphckpt.api.auto_checkpoint`` calls in here when the module it is given is already wrapped.
DDP's forward and FSDP2's hooks run collectives Dynamo cannot capture in one graph, so the
planned graph is always the model's own forward, with the wrapper's code run eagerly around it.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from graphckpt.api import CheckpointedModule
from graphckpt.errors import UnsupportedWrappingError
from graphckpt.options import PlanConfig
from graphckpt.plan import Plan

__all__ = [
    "CheckpointedDDP",
    "CheckpointedFSDPRoot",
    "UnsupportedWrappingError",
    "checkpoint_module",
    "sharded_submodules",
    "wrapping_hint",
]

_SUPPORTED = (
    "Supported: DDP(auto_checkpoint(m)), auto_checkpoint(DDP(m)), fully_shard(auto_checkpoint(m)) "
    "and auto_checkpoint(fully_shard(m)), with fully_shard on the root module only"
)


def _is_fsdp(module: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch built without distributed
        return False
    return isinstance(module, FSDPModule)


def sharded_submodules(model: nn.Module) -> list[str]:
    """Names of the submodules of ``model`` (not ``model`` itself) that fully_shard manages.

    Example:
        >>> sharded_submodules(nn.Sequential(nn.Linear(2, 2)))
        []
    """
    return [name for name, m in model.named_modules() if name and _is_fsdp(m)]


def wrapping_hint(model: nn.Module) -> str | None:
    """Why ``model`` cannot be captured as one graph because of fully_shard, or None.

    Used to explain a trace failure: FSDP2's hooks on submodules all-gather parameters inside
    the forward that graphckpt captures, and Dynamo does not trace them.
    """
    names = sharded_submodules(model)
    if not names:
        return None
    shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    return (
        f"fully_shard was applied to submodules of {type(model).__name__} ({shown}); their "
        "hooks gather parameters inside the forward graphckpt captures as one graph. Apply "
        f"fully_shard to the root module only. {_SUPPORTED}."
    )


class CheckpointedDDP(CheckpointedModule):
    """``auto_checkpoint(DDP(m))``: the DDP, with its ``module`` replaced by the planned ``m``.

    Calls go through DDP's forward (buffer broadcast, gradient-reducer setup) to a
    CheckpointedModule of the inner module, which is what ``DDP(auto_checkpoint(m))`` builds;
    ``state_dict()`` keys stay DDP's (``module.``-prefixed).
    """

    def __init__(self, ddp: DistributedDataParallel, inner: CheckpointedModule) -> None:
        super().__init__(ddp, inner.budget_bytes, inner.config)
        object.__setattr__(self, "inner", inner)
        object.__setattr__(self, "plans", inner.plans)
        ddp.module = inner

    @property
    def plan(self) -> Plan | None:
        """The inner module's plan for its latest training call."""
        plan: Plan | None = self.inner.plan
        return plan

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run DDP's forward, which calls the planned inner module."""
        return self.wrapped(*args, **kwargs)


class _OwnForward(nn.Module):
    """Calls ``model``'s class forward, skipping the hooks registered on ``model`` itself."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return type(self.model).forward(self.model, *args, **kwargs)


class CheckpointedFSDPRoot(CheckpointedModule):
    """``auto_checkpoint(fully_shard(m))``: FSDP2's root hooks run eagerly around the plan.

    A call runs ``m``'s hooks (all-gather parameters before forward, reshard after, gradient
    reduce-scatter in backward) as ``fully_shard`` set them up, with ``m.forward`` replaced for
    that call by the planned forward, as ``fully_shard(auto_checkpoint(m))`` does.
    """

    def __init__(self, model: nn.Module, budget_bytes: int, config: PlanConfig) -> None:
        super().__init__(model, budget_bytes, config)
        inner = CheckpointedModule(_OwnForward(model), budget_bytes, config)
        object.__setattr__(self, "inner", inner)
        object.__setattr__(self, "plans", inner.plans)

    @property
    def plan(self) -> Plan | None:
        """The inner module's plan for its latest training call."""
        plan: Plan | None = self.inner.plan
        return plan

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Call ``m`` (and so its FSDP hooks) with the planned forward in place of its own."""
        model = self.wrapped
        # An instance attribute shadows the class forward for this call only; plain
        # object.__setattr__, since nn.Module.__setattr__ would register a module as a child.
        object.__setattr__(model, "forward", self.inner)
        try:
            return model(*args, **kwargs)
        finally:
            del model.__dict__["forward"]


def checkpoint_module(
    model: nn.Module, budget_bytes: int, config: PlanConfig
) -> CheckpointedModule:
    """The CheckpointedModule ``auto_checkpoint`` returns for a model that is not a DDP.

    Args:
        model: the module to plan (a plain module, or one fully_shard was applied to).
        budget_bytes: the step's budget in bytes.
        config: planner options.

    Returns:
        A CheckpointedModule, or a CheckpointedFSDPRoot when ``model`` is an FSDP2 root.

    Raises:
        UnsupportedWrappingError: fully_shard was applied to submodules of ``model``.

    Example:
        >>> type(checkpoint_module(nn.Linear(2, 2), 1 << 30, PlanConfig())).__name__
        'CheckpointedModule'
    """
    hint = wrapping_hint(model)
    if hint is not None:
        raise UnsupportedWrappingError(f"auto_checkpoint cannot plan this model: {hint}")
    if _is_fsdp(model):
        return CheckpointedFSDPRoot(model, budget_bytes, config)
    return CheckpointedModule(model, budget_bytes, config)
