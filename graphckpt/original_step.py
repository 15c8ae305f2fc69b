"""When ``auto_checkpoint`` may run the original module instead of the rewritten graphs.

If the original step fits the budget, running it is the best plan there is: no recompute, no
offload, no per-op overhead of the fx graphs, and the same step bitwise. Whether it fits is
measured, never assumed: eager PyTorch can hold more than the joint graph keeps (its CPU
attention kernel with dropout saves the attention weights, +19 MB on the benchmark GPT). Where
it holds exactly what the keep-all plan predicts (the benchmark U-Net), a budget equal to its
peak is still 64 bytes short of the planner's headroom, and the plan recomputes a few cheap
tensors that the original step does not need. So the original step is measured once per input
signature, for plans that recompute no FLOPs and offload nothing (below those budgets it cannot
fit).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_leaves

from graphckpt.memory import step_peak_bytes
from graphckpt.plan import Plan

__all__ = ["CallKey", "call_key", "may_run_original", "original_step_peak", "state_restored"]

CallKey = tuple[Any, ...]
_PLAIN = (int, float, bool, str, type(None), torch.dtype, torch.device)


def may_run_original(plan: Plan) -> bool:
    """True when ``plan`` recomputes no FLOPs and offloads nothing: then the original step may fit
    the same budget (worth measuring).

    Example:
        >>> from graphckpt.examples import gpt_example
        >>> import graphckpt
        >>> model, inputs = gpt_example(n_layer=2, n_embd=32, seq=16, batch=2)
        >>> may_run_original(graphckpt.plan(model, inputs, budget_gb=1.0))
        True
    """
    return plan.recompute_flops == 0 and plan.offload_bytes == 0


def call_key(model: nn.Module, args: Sequence[Any], kwargs: dict[str, Any]) -> CallKey | None:
    """What a plan depends on in one call: the arguments' structure, each tensor's shape,
    dtype, device and ``requires_grad`` (the arguments', the parameters' and the buffers'), plain
    values, and the training flag.

    Returns:
        A hashable key, or None when an argument is neither a tensor nor a plain value.

    Example:
        >>> call_key(nn.Linear(3, 1), (torch.ones(2, 3),), {"scale": 2.0}) is not None
        True
    """
    # Runs on every training call: about 80 us on the benchmark U-Net (92 parameters and
    # buffers), where collecting model.parameters() and model.buffers() took 200 us.
    leaves, spec = tree_flatten((tuple(args), kwargs))
    key: list[Any] = [model.training, spec]
    for x in leaves:
        if isinstance(x, torch.Tensor):
            key.append((x.shape, x.dtype, x.device, x.requires_grad))
        elif isinstance(x, _PLAIN):
            key.append((type(x), x))
        else:
            return None
    for module in model.modules():
        for group in (module._parameters, module._buffers):
            for t in group.values():
                if t is not None:
                    key.append((t.shape, t.dtype, t.device, t.requires_grad))
    return tuple(key)


@contextlib.contextmanager
def state_restored(model: nn.Module, inputs: Sequence[Any]) -> Iterator[None]:
    """Put the model's buffers, the tensor ``inputs`` and the CPU RNG back as they were.

    Planning runs (or traces) one training forward; it must not update BatchNorm statistics,
    mutate the caller's inputs or advance the generator.

    Example:
        >>> bn = nn.BatchNorm1d(3)
        >>> with state_restored(bn, ()):
        ...     _ = bn(torch.randn(4, 3))
        >>> int(bn.num_batches_tracked)
        0
    """
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    tensors = [x for x in inputs if isinstance(x, torch.Tensor)]
    before = [x.detach().clone() for x in tensors]
    rng = torch.get_rng_state()
    try:
        yield
    finally:
        torch.set_rng_state(rng)
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
            for x, saved in zip(tensors, before):
                x.copy_(saved)


def _detached(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach().requires_grad_(x.requires_grad)
    return x


def original_step_peak(model: nn.Module, args: Sequence[Any], kwargs: dict[str, Any]) -> int:
    """Measure the peak of one plain forward+backward of ``model``, leaving no trace of it.

    The budget's peak (DESIGN.md): parameters, buffers and tensor inputs, plus what the step
    allocates, with ``.grad`` None at the start, measured at the allocator (kernel scratch
    memory included; CUDA memory stats on a GPU). Backward runs from every output that requires
    grad (a non-scalar output with a gradient of ones), down to the parameters and the (detached)
    inputs. Buffers, inputs, the CPU RNG and the parameters' ``.grad`` are restored afterwards.

    Returns:
        The peak in bytes.

    Example:
        >>> lin = nn.Linear(4, 4)
        >>> original_step_peak(lin, (torch.randn(2, 4),), {}) > 0
        True
    """
    params = list(model.parameters())
    # Detached inputs: backward must stop here, not run into the caller's graph upstream.
    args = tuple(_detached(x) for x in args)
    kwargs = {k: _detached(v) for k, v in kwargs.items()}
    inputs = [*args, *kwargs.values()]
    resident = [*params, *model.buffers(), *(x for x in inputs if isinstance(x, torch.Tensor))]
    device = params[0].device if params else torch.device("cpu")
    grads = [p.grad for p in params]

    def step() -> None:
        outs = [o for o in tree_leaves(model(*args, **kwargs)) if isinstance(o, torch.Tensor)]
        outs = [o for o in outs if o.requires_grad]
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])

    try:
        for p in params:
            p.grad = None
        with state_restored(model, inputs), torch.enable_grad():
            # At the allocator: kernel scratch (oneDNN convolutions) counts against the budget,
            # and the dispatch-level tracker cannot see it (passes/scratch.py).
            return step_peak_bytes(step, resident, device, method="allocator")
    finally:
        for p, g in zip(params, grads):
            p.grad = g
