"""``graphckpt.backend``: the planner as a ``torch.compile`` backend.

The last pipeline stage for compiled models: each joint graph Dynamo and AOTAutograd produce is
planned under the budget and rewritten (``passes.pipeline``), then its forward and backward
graphs run as eager fx code or are compiled by inductor.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.fx as fx

from graphckpt.api import budget_to_bytes
from graphckpt.errors import InfeasibleBudgetError
from graphckpt.graph_offload import GraphOffloader
from graphckpt.options import PlanConfig
from graphckpt.plan import Plan

__all__ = ["CompilerName", "GraphCkptBackend", "backend"]

CompilerName = Literal["inductor", "eager"]
_COMPILERS: tuple[str, ...] = ("inductor", "eager")
_SUBGRAPH_KEY = "graphckpt_subgraph"
"""``GraphModule.meta`` key on the forward and backward graphs: ``(role, position)`` in the
backend's subgraph list (AOTAutograd deep-copies the backward graph, so no objects there)."""
_MIB = float(1 << 20)


@dataclass(eq=False)
class _Subgraph:
    """One planned Dynamo subgraph and how many of its forwards await their backward."""

    plan: Plan
    num_live: int = 0


@contextlib.contextmanager
def _inductor_settings(exact_rng: bool = True) -> Iterator[None]:
    """Inductor config for our graphs, scoped to one compile.

    ``fallback_random`` (``exact_rng``): inductor would otherwise replace ATen random ops by its
    own generator, which the rewriter's ``run_and_save_rng_state`` / ``run_with_rng_state``
    replay cannot see, so recomputed dropout masks would differ from the forward ones (and from
    eager). It also keeps a random op whose result is unused through AOTAutograd's dead-code
    elimination, so the scope covers the trace as well as the compiles. With
    ``exact_rng=False`` random ops become inductor's seeded draws before planning and the
    planner keeps their seeds instead (no replay needed).

    ``reorder_for_peak_memory`` off: that pass moves the planner's split dropout draws
    (``bernoulli`` into a fresh buffer, no data dependence on each other) out of program order,
    so they take other numbers from the generator than eager's dropouts (measured: GPT gradients
    off by 0.05); it would also undo the order the planner simulated the peak for. It is also
    what gives inductor's buffer reuse the buffer sizes it needs; ``passes/inductor_reuse.py``
    gives them instead, around each compile.

    ``fx_graph_cache`` off: the cache key does not see the segment fence
    (``passes/fusion_fence.py``) the backward graphs compile under, so a kernel cached from a
    compile without it (fusing two layers' recompute, measured 27 MiB over plan on Hugging Face
    GPT-2) could come back. Planned graphs are compiled afresh.
    """
    import torch._inductor.config as inductor_config

    with inductor_config.patch(
        fallback_random=exact_rng, reorder_for_peak_memory=False, fx_graph_cache=False
    ):
        yield


def _eager_only_reason(gm: fx.GraphModule) -> str | None:
    """Why inductor cannot compile ``gm`` (None when it can): calls to GraphOffloader methods."""
    for node in gm.graph.nodes:
        owner = getattr(node.target, "__self__", None)
        if node.op == "call_function" and isinstance(owner, GraphOffloader):
            return (
                f"it calls GraphOffloader.{node.target.__name__} (host offload of planned "
                "activations), which inductor cannot lower"
            )
    return None


def _fake_inputs(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> list[Any]:
    """Example inputs with real tensors turned fake, placeholder ``val`` metadata to match.

    The CPU generator state that ``run_and_save_rng_state`` returns is a real tensor even under
    fake tracing (``torch.get_rng_state`` does not dispatch), so the backward graph's state
    input arrives real and inductor's fake re-run of ``run_with_rng_state`` rejects it.
    """
    from torch._guards import detect_fake_mode
    from torch._subclasses.fake_tensor import FakeTensor

    fake_mode = detect_fake_mode(example_inputs)
    inputs = list(example_inputs)
    if fake_mode is None:
        return inputs
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for i, x in enumerate(inputs):
        if isinstance(x, torch.Tensor) and not isinstance(x, FakeTensor):
            inputs[i] = fake_mode.from_tensor(x)
            if i < len(placeholders):
                placeholders[i].meta["val"] = inputs[i]
    return inputs


def _counting(
    compiled: Callable[..., Any],
    before: Callable[[], None] | None = None,
    after: Callable[[], None] | None = None,
) -> Callable[..., Any]:
    """A boxed wrapper of ``compiled`` that calls ``before`` / ``after`` around each run."""
    boxed = getattr(compiled, "_boxed_call", False)

    def run(args: list[Any]) -> Any:
        if before is not None:
            before()
        out = compiled(args) if boxed else compiled(*args)
        if after is not None:
            after()
        return out

    run._boxed_call = True  # type: ignore[attr-defined]
    return run


class GraphCkptBackend:
    """A ``torch.compile`` backend that plans every joint graph under one absolute budget.

    Built by :func:`backend`; see there. ``plans`` lists every Plan made, in order.
    """

    def __init__(
        self,
        budget_bytes: int,
        compiler: CompilerName,
        config: PlanConfig,
        on_plan: Callable[[Plan], None] | None,
        exact_rng: bool = True,
    ) -> None:
        from passes.trace import joint_backend

        self.budget_bytes = budget_bytes
        self.compiler = compiler
        self.config = config
        self.exact_rng = exact_rng
        self.plans: list[Plan] = []
        self.offloader = GraphOffloader()
        self._on_plan = on_plan
        self._subgraphs: list[_Subgraph] = []
        self._device = torch.device("cpu")
        decompositions = None
        if compiler == "inductor":
            # Inductor's decompositions (max_pool2d's) read torch._inductor.lowering, which a
            # fresh process has not imported until inductor first compiles something.
            importlib.import_module("torch._inductor.lowering")
            from torch._inductor.decomposition import select_decomp_table

            with _inductor_settings(exact_rng):
                decompositions = dict(select_decomp_table())
        self._joint = joint_backend(self._partition, self._compile, decompositions=decompositions)

    def live_kept_bytes(self) -> int:
        """Device bytes kept by forwards that ran and whose backward has not yet run."""
        return sum(s.plan.kept_bytes * s.num_live for s in self._subgraphs)

    def __call__(self, gm: fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        """Compile one Dynamo graph: plan and rewrite its joint graph, compile the parts."""
        tensors = [x for x in example_inputs if isinstance(x, torch.Tensor)]
        self._device = tensors[0].device if tensors else torch.device("cpu")
        # Our compilers are not cacheable; a cache hit would also skip the planner.
        import torch._functorch.config as functorch_config

        # Inductor's settings cover the trace too: under a tracing context, fx's dead-code
        # elimination keeps random ops whose result is unused only with fallback_random set
        # (exact_rng). Eager draws for them all the same, so without it a dropout whose output
        # nothing reads would vanish and every later mask (and the loss) would differ.
        with (
            functorch_config.patch(enable_autograd_cache=False),
            _inductor_settings(self.exact_rng),
        ):
            return self._joint(gm, example_inputs)

    def _partition(self, jg: Any) -> tuple[fx.GraphModule, fx.GraphModule]:
        from passes.pipeline import planning_partitioner

        if self.compiler == "inductor" and not self.exact_rng:
            from passes.inductor_rng import seed_random_draws

            seed_random_draws(jg)  # under __call__'s _inductor_settings, as the whole trace
        held = self.live_kept_bytes()
        made: list[Plan] = []
        partition = planning_partitioner(
            self.budget_bytes - held, self.config, self._device, made.append, self.offloader
        )
        try:
            fw, bw = partition(jg)
        except InfeasibleBudgetError as e:
            if not held:
                raise
            raise InfeasibleBudgetError(
                f"{e}\n(subgraph {jg.index}: activations kept by the subgraphs that ran before it "
                f"hold {held / _MIB:.1f} MiB of the {self.budget_bytes / _MIB:.1f} MiB budget "
                "until their backward)",
                min_feasible_bytes=e.min_feasible_bytes + held,
            ) from e
        subgraph = _Subgraph(made[-1])
        fw.meta[_SUBGRAPH_KEY] = ("forward", len(self._subgraphs))
        bw.meta[_SUBGRAPH_KEY] = ("backward", len(self._subgraphs))
        self._subgraphs.append(subgraph)
        self.plans.append(subgraph.plan)
        if self._on_plan is not None:
            self._on_plan(subgraph.plan)
        return fw, bw

    def _compile(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
        role, position = gm.meta.get(_SUBGRAPH_KEY, ("inference", None))
        compiled = self._compile_graph(gm, example_inputs, role)
        if position is None:
            return compiled
        subgraph = self._subgraphs[position]

        def started() -> None:
            subgraph.num_live += 1

        def finished() -> None:
            subgraph.num_live = max(subgraph.num_live - 1, 0)

        if role == "forward":
            return _counting(compiled, before=started)
        return _counting(compiled, after=finished)

    def _compile_graph(
        self, gm: fx.GraphModule, example_inputs: Sequence[Any], role: str
    ) -> Callable[..., Any]:
        from passes.trace import _eager_compiler

        if self.compiler == "eager":
            return _eager_compiler(gm, example_inputs)
        reason = _eager_only_reason(gm)
        if reason is not None:
            warnings.warn(
                f"graphckpt.backend: running this {role} graph as eager fx code instead of "
                f"compiling it with inductor: {reason}",
                stacklevel=2,
            )
            return _eager_compiler(gm, example_inputs)
        from torch._inductor.compile_fx import compile_fx_inner

        from passes.fusion_fence import mark_segments, segment_fence
        from passes.inductor_reuse import planning_info_for_reuse

        inputs = _fake_inputs(gm, example_inputs)
        with _inductor_settings(self.exact_rng):
            if self.exact_rng:
                from passes.inductor_dropout import merge_dropout
                from passes.inductor_rng import keep_unread_draws

                merge_dropout(gm)
                keep_unread_draws(gm)
            else:
                # Training graphs had their random ops seeded before planning (_partition);
                # a graph with no backward (inference) has not: do it here, as compile_fx does.
                from torch._guards import detect_fake_mode

                from passes.inductor_rng import seed_draws_in

                seed_draws_in(gm, detect_fake_mode(inputs))
            if role == "backward":
                mark_segments(gm)
            with segment_fence(), planning_info_for_reuse():
                return compile_fx_inner(
                    gm, inputs, is_backward=role == "backward", is_inference=role == "inference"
                )


def backend(
    budget_gb: float,
    *,
    compiler: CompilerName = "inductor",
    on_plan: Callable[[Plan], None] | None = None,
    config: PlanConfig | None = None,
    exact_rng: bool = True,
    **options: Any,
) -> GraphCkptBackend:
    """A ``torch.compile`` backend that plans each training graph to fit ``budget_gb`` GiB.

    Every joint forward+backward graph is planned (keep / recompute per tensor, DESIGN.md's
    budget) and rewritten; dropout and other random ops replay their generator state when
    recomputed, so results equal the uncompiled model's.

    With ``compiler="inductor"`` AOTAutograd traces with inductor's decompositions (the planner
    plans the decomposed graph) and inductor compiles the rewritten forward and backward graphs,
    with ``torch._inductor.config.fallback_random=True`` scoped to each compile so random ops
    keep torch's generator (and its replay); a random op whose result nothing reads still
    draws, as in eager (``passes.inductor_rng.keep_unread_draws``), and a dropout the graph
    draws and applies itself runs as one ``native_dropout`` (``passes.inductor_dropout``). A
    graph that offloads to host memory calls Python methods inductor cannot lower: it runs as
    eager fx code, with a warning.
    ``compiler="eager"`` runs every rewritten graph as eager fx code, like ``auto_checkpoint``.

    ``exact_rng=False`` (inductor only) lets inductor draw random numbers its own way, fused into
    its kernels, as a plain ``torch.compile`` does: faster dropout, but masks that differ from
    eager's. As inductor does before its own partitioner, each training graph's random ops
    become seeded draws (``passes/inductor_rng.py``): only the seeds come from torch's generator,
    and the planner keeps them (``PlanConfig.recompute_random=False`` pins random ops). A draw
    is a pure function of its seed, so backward can regenerate a dropout mask inside its own
    kernels instead of keeping it, and still sees exactly forward's masks.

    Graph breaks: one budget covers the whole step. Dynamo compiles subgraphs in execution order,
    and the activations a subgraph keeps stay alive until its backward, which runs after the
    backward of every later subgraph. So each subgraph is planned under the total budget minus
    the device bytes kept (``Plan.kept_bytes``, offloaded bytes excluded) by the subgraphs whose
    forward has run and whose backward has not. Within one step the budgets therefore add up:
    ``plans[1].budget_bytes == budget - plans[0].kept_bytes``. Parameters and gradients of the
    other subgraphs are not charged to a subgraph. Each Plan's ``graph_index`` numbers the
    subgraphs in compile order.

    Inductor compiles each backward graph with a fence around every recompute group: it
    does not fuse two independent nodes from different groups when that would run a later
    group's recompute early, all layers' temporaries alive at once (``passes/fusion_fence.py``).

    Only compile-time torch config is changed, each scoped to the compile call
    (``config.patch``): inductor's ``fallback_random``, ``reorder_for_peak_memory`` and
    ``fx_graph_cache``, its choices handler (the fence) and ``_post_fusion_custom_pass``
    (buffer sizes for its buffer reuse, ``passes/inductor_reuse.py``), and functorch's
    ``enable_autograd_cache`` (off, since a cache hit would skip the planner).

    Args:
        budget_gb: the budget in GiB (2**30 bytes) for one forward+backward of the model.
        compiler: ``"inductor"`` or ``"eager"``.
        on_plan: called with each Plan as it is made.
        config: a PlanConfig; or give its fields as keyword ``options``.
        exact_rng: draw random numbers from torch's generator in eager's order (masks equal to
            eager's), or, False, from inductor's own (needs ``compiler="inductor"``).

    Returns:
        A GraphCkptBackend: the callable ``(gm, example_inputs) -> compiled`` to pass as
        ``torch.compile(backend=...)``; its ``.plans`` lists the Plans made.

    Raises:
        TypeError, ValueError: a bad budget, compiler name or option.

    Example:
        >>> from graphckpt.examples import gpt_example
        >>> model, inputs = gpt_example(n_layer=2, n_embd=32, seq=16, batch=2)
        >>> be = backend(budget_gb=1.0, compiler="eager")
        >>> torch.compile(model, backend=be)(*inputs).backward()
        >>> print(be.plans[0].table())  # doctest: +SKIP
    """
    budget_bytes = budget_to_bytes(budget_gb)
    if compiler not in _COMPILERS:
        raise ValueError(
            f"compiler must be one of {', '.join(map(repr, _COMPILERS))}, got {compiler!r}"
        )
    if on_plan is not None and not callable(on_plan):
        raise TypeError(f"on_plan must be callable, got {type(on_plan).__name__}")
    if not isinstance(exact_rng, bool):
        raise TypeError(f"exact_rng must be a bool, got {exact_rng!r}")
    if not exact_rng and compiler != "inductor":
        raise ValueError(
            "exact_rng=False asks inductor to draw random numbers its own way; it needs "
            f"compiler='inductor', got compiler={compiler!r}"
        )
    cfg = PlanConfig.from_options(config, options)
    if not exact_rng:
        cfg = dataclasses.replace(cfg, recompute_random=False)
    if cfg.fused_pointwise is None:
        # Inductor fuses pointwise ops: the planner prices recomputing them inside backward's
        # kernels as nearly free and keeping them as a forward write (passes/cost.py).
        cfg = dataclasses.replace(cfg, fused_pointwise=compiler == "inductor")
    return GraphCkptBackend(budget_bytes, compiler, cfg, on_plan, exact_rng)
