"""Stage 1 of the pipeline: capture a model's joint forward+backward graph.

Dynamo captures the model (it handles third-party model code that ``fx.symbolic_trace`` and
``torch.export`` reject, see DESIGN.md), and AOTAutograd turns the captured graph into one joint
ATen graph. ``joint_backend`` hands that joint graph to a callback that returns the forward and
backward graphs to run: the place where the planner and the rewriter act.
"""

from __future__ import annotations

import contextlib
import copy
import types
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch._functorch.aot_autograd import aot_module_simplified
from torch._functorch.partitioners import _extract_fwd_bwd_outputs
from torch.utils._pytree import tree_leaves

from graphckpt.allocator import garbage_collection_paused
from graphckpt.errors import TraceError
from passes.meta import is_backward, is_forward

__all__ = [
    "JointGraph",
    "Partitioner",
    "capture_joint_graphs",
    "dynamo_settings",
    "fresh_module_call",
    "joint_backend",
    "untraced_bytes",
]


@dataclass(eq=False)
class JointGraph:
    """AOTAutograd's joint forward+backward graph of one captured (sub)graph, with its roles.

    ``primals`` are the graph's inputs in forward (parameters, buffers, user inputs),
    ``tangents`` the incoming gradients of its outputs, ``forward`` and ``backward`` the compute
    nodes of each pass in graph order. ``index`` numbers the subgraphs Dynamo produced.
    ``untraced_bytes`` are resident on the device through the step but read by no node: inputs
    of the call that Dynamo dropped from the graph because nothing uses them (the budget counts
    them, DESIGN.md).
    """

    gm: fx.GraphModule
    num_fwd_outputs: int
    partition_kwargs: dict[str, Any] = field(default_factory=dict)
    index: int = 0
    untraced_bytes: int = 0
    primals: list[fx.Node] = field(init=False)
    tangents: list[fx.Node] = field(init=False)
    forward: list[fx.Node] = field(init=False)
    backward: list[fx.Node] = field(init=False)
    fwd_outputs: list[fx.Node] = field(init=False)
    bwd_outputs: list[fx.Node] = field(init=False)

    def __post_init__(self) -> None:
        self.refresh()

    def refresh(self) -> None:
        """Recompute the role lists after the graph was edited."""
        nodes = list(self.gm.graph.nodes)
        self.primals = [n for n in nodes if n.op == "placeholder" and "tangents" not in n.name]
        self.tangents = [n for n in nodes if n.op == "placeholder" and "tangents" in n.name]
        compute = [n for n in nodes if n.op in ("call_function", "get_attr")]
        self.forward = [n for n in compute if is_forward(n)]
        self.backward = [n for n in compute if is_backward(n) or not is_forward(n)]
        fwd_out, bwd_out, _, _ = _extract_fwd_bwd_outputs(
            self.gm, num_fwd_outputs=self.num_fwd_outputs
        )
        self.fwd_outputs = [n for n in fwd_out if isinstance(n, fx.Node)]
        self.bwd_outputs = [n for n in bwd_out if isinstance(n, fx.Node)]


Partitioner = Callable[[JointGraph], tuple[fx.GraphModule, fx.GraphModule]]
Compiler = Callable[[fx.GraphModule, Sequence[Any]], Callable[..., Any]]


def _eager_compiler(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
    """Run a graph as its generated Python code, freeing each input after its last use.

    AOTAutograd keeps calling ``gm`` with its normal convention, so the boxed convention (one
    list argument, cleared on entry, so inputs die at their last use) goes on a copy.
    """
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    graph.set_codegen(fx.graph._BoxedCodeGen())
    boxed = fx.GraphModule(gm, graph)
    forward = boxed.forward

    def run(args: list[Any]) -> Any:
        return forward(args)

    run._boxed_call = True  # type: ignore[attr-defined]
    return run


def untraced_bytes(resident: Iterable[Any], traced: Sequence[Any]) -> int:
    """Bytes of the storages of ``resident`` that no tensor of ``traced`` lives in.

    Only storages on the devices of the ``traced`` tensors count (each counted once): what a
    captured graph leaves out of the call's resident tensors.

    Args:
        resident: the call's parameters, buffers and inputs (non-tensors are skipped).
        traced: the tensors the captured graph takes as inputs.

    Returns:
        The bytes.

    Example:
        >>> x, unused = torch.ones(4), torch.ones(8)
        >>> untraced_bytes([x, unused, x[:2]], [x])
        32
    """

    def key(t: torch.Tensor) -> tuple[str, int]:
        return (str(t.device), t.untyped_storage().data_ptr())

    tensors = [t for t in traced if isinstance(t, torch.Tensor)]
    devices = {str(t.device) for t in tensors}
    seen = {key(t) for t in tensors}
    total = 0
    for t in resident:
        if not isinstance(t, torch.Tensor) or str(t.device) not in devices:
            continue
        k = key(t)
        if k not in seen:
            seen.add(k)
            total += t.untyped_storage().nbytes()
    return total


def joint_backend(
    partitioner: Partitioner,
    compiler: Compiler | None = None,
    *,
    decompositions: dict[Any, Callable[..., Any]] | None = None,
    resident: Callable[[], Iterable[Any]] | None = None,
) -> Callable[[fx.GraphModule, list[Any]], Callable[..., Any]]:
    """A Dynamo backend that calls ``partitioner`` on each joint graph AOTAutograd builds.

    Args:
        partitioner: gets the :class:`JointGraph`, returns ``(forward_gm, backward_gm)``.
        compiler: compiles the forward and backward graphs; runs them eagerly when None.
        decompositions: ATen decompositions AOTAutograd applies while tracing (the joint graph
            the partitioner sees is then the decomposed one); none when None.
        resident: returns the compiled call's parameters, buffers and inputs; what of them the
            graph does not take (unused inputs) becomes :attr:`JointGraph.untraced_bytes`.

    Returns:
        A callable ``(gm, example_inputs) -> compiled`` to pass as ``torch.compile(backend=)``.

    Example:
        >>> from torch._functorch.partitioners import default_partition
        >>> def keep_all(jg):
        ...     return default_partition(jg.gm, None, num_fwd_outputs=jg.num_fwd_outputs)
        >>> f = torch.compile(torch.nn.Linear(4, 4), backend=joint_backend(keep_all))
        >>> f(torch.randn(2, 4)).sum().backward()
    """
    compile_fn = compiler or _eager_compiler
    counter = iter(range(1 << 30))

    def backend(gm: fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        outside = untraced_bytes(resident(), example_inputs) if resident is not None else 0

        def partition_fn(joint: fx.GraphModule, _inputs: Any, **kwargs: Any) -> Any:
            num_fwd_outputs = kwargs.pop("num_fwd_outputs")
            index = next(counter)
            return partitioner(JointGraph(joint, num_fwd_outputs, kwargs, index, outside))

        # The collector is paused while a graph is traced and planned: tracing allocates
        # millions of objects that live until the trace ends, so each automatic collection
        # rescans them and frees little (48-layer GPT-2-XL shape, benchmarks/planner_speed.py:
        # collector CPU time 1.5 s -> 1.2 s of 12-15 s). It runs again once the trace is over.
        with garbage_collection_paused():
            return aot_module_simplified(
                gm,
                example_inputs,
                fw_compiler=compile_fn,
                bw_compiler=compile_fn,
                inference_compiler=compile_fn,
                partition_fn=partition_fn,
                decompositions=decompositions,
            )

    return backend


@contextlib.contextmanager
def dynamo_settings() -> Iterator[None]:
    """Dynamo settings graphckpt needs, scoped to the call: static shapes (a new shape gets a new
    plan), an error, never a silent eager fallback, when recompiles run out, and random ops kept
    when their result is unused (AOTAutograd's dead-code elimination drops them unless
    ``fallback_random`` is set; eager still draws, so later dropout masks would differ)."""
    with (
        torch._dynamo.config.patch(
            automatic_dynamic_shapes=False,
            recompile_limit=64,
            fail_on_recompile_limit_hit=True,
        ),
        torch._inductor.config.patch(fallback_random=True),
    ):
        yield


def describe_trace_failure(model: torch.nn.Module, error: BaseException) -> TraceError:
    """Turn a Dynamo/AOTAutograd failure into a TraceError that names the module and the op."""
    from graphckpt.parallel import wrapping_hint

    detail = str(error).strip()
    advice = wrapping_hint(model) or (
        "Make the operation traceable (avoid data-dependent Python control flow, .item(), "
        "or printing inside forward), or apply graphckpt to the submodules around it."
    )
    return TraceError(
        f"graphckpt could not capture {type(model).__name__} as a single graph, so it cannot plan "
        f"it under a budget (it never falls back to running without a plan).\n{detail}\n{advice}"
    )


class _Captured(Exception):
    """Raised by the capturing partitioner to stop compilation once the joint graph is seen."""


def _materialise_meta(
    model: torch.nn.Module, args: Sequence[Any], kwargs: dict[str, Any]
) -> tuple[torch.nn.Module, tuple[Any, ...], dict[str, Any]]:
    """Give meta tensors CPU storage that is never touched, so tracing sees real devices.

    On the meta device some losses (``nll_loss``) have no autograd kernel and backward would
    vanish from the joint graph. ``torch.empty`` reserves address space without touching it,
    and nothing executes: capture stops before the forward runs.
    """

    def real(x: Any) -> Any:
        if isinstance(x, torch.Tensor) and x.is_meta:
            out = torch.zeros(x.shape, dtype=x.dtype) if not x.is_floating_point() else None
            out = out if out is not None else torch.empty(x.shape, dtype=x.dtype)
            return out.requires_grad_(x.requires_grad)
        return x

    on_meta = any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    if on_meta:
        model = copy.deepcopy(model).to_empty(device="cpu")
    return model, tuple(real(a) for a in args), {k: real(v) for k, v in kwargs.items()}


def capture_joint_graphs(
    model: torch.nn.Module,
    args: Sequence[Any],
    kwargs: dict[str, Any] | None = None,
) -> list[JointGraph]:
    """Capture the joint graph of one training call of ``model``, without running it.

    Dynamo and AOTAutograd trace the call on fake tensors; capture stops as soon as the joint
    graph exists, so nothing executes and the model is not modified. A model and inputs on the
    meta device are traced as CPU tensors of the same shapes (never allocated in full).

    Args:
        model: the module to capture.
        args: positional inputs of one call.
        kwargs: keyword inputs of one call.

    Returns:
        The :class:`JointGraph` (empty when nothing in the call requires grad).

    Raises:
        TraceError: Dynamo or AOTAutograd could not capture the model as one graph.

    Example:
        >>> graphs = capture_joint_graphs(torch.nn.Linear(4, 4), (torch.randn(2, 4),))
        >>> len(graphs[0].forward) > 0
        True
    """
    captured: list[JointGraph] = []

    def record(jg: JointGraph) -> tuple[fx.GraphModule, fx.GraphModule]:
        captured.append(jg)
        raise _Captured

    model, args, kwargs = _materialise_meta(model, args, dict(kwargs or {}))
    # What the call holds resident, for the backend to read once while compiling. Emptied
    # afterwards: whatever keeps the backend (the exception that ends the capture, say) must
    # not keep the model and its inputs alive with it.
    call: list[Any] = [*model.parameters(), *model.buffers(), *tree_leaves((args, kwargs))]
    backend = joint_backend(record, resident=lambda: list(call))
    call_model = fresh_module_call()
    compiled = torch.compile(call_model, backend=backend, fullgraph=True)
    # Dynamo's own collection at the end of a compile is skipped: with the collector paused it
    # would scan every object the trace allocated, and this compile is thrown away at once.
    no_gc_after = torch._dynamo.config.patch(run_gc_after_compile=False)
    try:
        with dynamo_settings(), no_gc_after, garbage_collection_paused():
            compiled(model, *args, **kwargs)
    except Exception as e:  # Dynamo raises many types; all but ours mean "not capturable"
        if not captured:
            raise describe_trace_failure(model, e) from e
    finally:
        call.clear()
        # Only this capture's compiled code goes: torch._dynamo.reset() would drop every
        # compiled function in the process, so each planned model (auto_checkpoint's, the
        # backend's) would plan again on its next call, on this rank alone in a
        # tensor-parallel job, where the others would not join its plan check.
        torch._C._dynamo.eval_frame.reset_code(call_model.__code__)
    return captured


def _call_module(model: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    return model(*args, **kwargs)


def fresh_module_call() -> Callable[..., Any]:
    """A new function ``f(model, *args, **kwargs)`` that returns ``model(*args, **kwargs)``,
    with a code object no other function shares.

    Dynamo keeps compiled code and its guards per code object. Compiling a fresh one keeps
    them apart from every other compile: they can be dropped alone (``reset_code``), and they
    go with the function when it is freed, where on a shared code object they would pile up
    (each a model's compiled graphs) until Dynamo's limit on compiles of one code object. The
    model is an argument, so Dynamo names it ``L['model']`` in the graph's module paths.

    Example:
        >>> a, b = fresh_module_call(), fresh_module_call()
        >>> a.__code__ is b.__code__, a(torch.nn.Identity(), 3)
        (False, 3)
    """
    code = _call_module.__code__.replace()  # a copy, not the shared original
    return types.FunctionType(code, _call_module.__globals__, _call_module.__name__)
