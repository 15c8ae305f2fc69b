"""Before planning, for deep models: find the period of a layer stack's joint graph.

The joint graph of a stack of identical layers is periodic: the 3-layer graph is the 2-layer one
with one layer's block inserted wherever layers appear (parameters, forward, backward, gradient
outputs). ``learn_period`` finds those blocks by a diff of the two graphs, pairs each inserted
block (layer 2, the top) with the layer-1 block beside it, checks that the two differ only in the
layer index, and encodes every reference relative to the layer that makes it (same layer, the
next one, the previous one, or a node outside the layers). ``passes/synthesize.py`` builds deeper
graphs from it. Reads ``val``, ``nn_module_stack``, ``fwd_nn_module_stack``, ``partitioner_tag``;
writes nothing.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten

from passes.meta import NN_MODULE_STACK, PARTITIONER_TAG, VAL
from passes.trace import JointGraph

__all__ = [
    "FIXED",
    "STACK_KEYS",
    "TOP",
    "TWIN",
    "Item",
    "OutEntry",
    "Period",
    "PeriodError",
    "Ref",
    "exact_key",
    "flat_args",
    "item_name",
    "items_of",
    "learn_period",
    "shifted_stack",
]

_FWD_STACK = "fwd_nn_module_stack"
STACK_KEYS = (NN_MODULE_STACK, _FWD_STACK)
FIXED, TWIN, TOP = "fixed", "twin", "top"


class PeriodError(ValueError):
    """The two traced graphs are not one layer apart: the caller traces the full model."""


@dataclass(frozen=True)
class OutEntry:
    """One entry of the graph's output list, as an item of the graph's sequence."""

    node: fx.Node | None


Item: TypeAlias = fx.Node | OutEntry
Ref: TypeAlias = tuple[str, int, int]
"""How an item refers to a node: ("fixed", position, 0), or (base, twin position, delta): the
layer ``base + delta`` version of a layer-1 item, base "item" (the referring item's own layer),
"one" (layer 1) or "top" (layer N-1)."""


def items_of(gm: fx.GraphModule) -> list[Item]:
    nodes = list(gm.graph.nodes)
    if nodes[-1].op != "output" or len(nodes[-1].args) != 1:
        raise PeriodError("joint graph without a single output list")
    return [*nodes[:-1], *(OutEntry(e) for e in nodes[-1].args[0])]


def _val_sig(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return (tuple(value.shape), tuple(value.stride()), str(value.dtype), value.requires_grad)
    if isinstance(value, (tuple, list)):
        return tuple(_val_sig(v) for v in value)
    return repr(value)


def _stack(node: fx.Node) -> dict[str, tuple[str, Any]]:
    for key in STACK_KEYS:
        stack = node.meta.get(key)
        if stack:
            return dict(stack)
    return {}


def _labels(node: fx.Node) -> tuple[str, ...]:
    """Strings that carry the layer index: the module stack, or a placeholder's users' stacks."""
    stack = _stack(node)
    if stack:
        return tuple(s for path, cls in stack.values() for s in (path, cls.__qualname__))
    if node.op == "placeholder":
        return tuple(sorted({p for u in node.users for _k, (p, _c) in _stack(u).items()}))
    return ()


def flat_args(item: Item) -> tuple[list[Any], Any]:
    if isinstance(item, OutEntry):
        return [item.node], None
    return tree_flatten((item.args, item.kwargs))


def exact_key(item: Item) -> tuple[Any, ...]:
    """What must be equal between an item and its copy in another layer."""
    if isinstance(item, OutEntry):
        return ("out", item.node is None)
    leaves, spec = flat_args(item)
    consts = tuple(repr(a) for a in leaves if not isinstance(a, fx.Node))
    tag = item.meta.get(PARTITIONER_TAG)
    target = item.name.split("_")[0] if item.op == "placeholder" else str(item.target)
    return (item.op, target, tag, _val_sig(item.meta.get(VAL)), str(spec), consts)


def _diff_key(item: Item) -> tuple[Any, ...]:
    if isinstance(item, OutEntry):
        return ("out", None if item.node is None else _diff_key(item.node))
    return (exact_key(item), _labels(item))


def _shift(low: str, high: str, lo: int, hi: int) -> tuple[str, str] | None:
    """``(prefix, suffix)`` when ``low`` = prefix + str(lo) + suffix and ``high`` is the same
    with ``hi``; None when the strings are equal (no layer index in them)."""
    if low == high:
        return None
    a, b = str(lo), str(hi)
    for i in range(len(low)):
        if low[i : i + len(a)] == a and low[:i] + b + low[i + len(a) :] == high:
            return low[:i], low[i + len(a) :]
    raise PeriodError(f"{low!r} and {high!r} differ by more than the layer index")


def shifted_stack(
    low: dict[str, tuple[str, Any]], high: dict[str, tuple[str, Any]], layer: int
) -> dict[str, tuple[str, Any]]:
    """Layer 1's stack ``low`` (layer 2's is ``high``) rewritten for ``layer``."""
    if len(low) != len(high):
        raise PeriodError("module stacks of two layers differ in depth")
    out = {}
    for (k1, (p1, c1)), (_k2, (p2, c2)) in zip(low.items(), high.items()):
        if c1 is not c2:
            raise PeriodError(f"layers 1 and 2 run different modules: {c1} and {c2}")
        path = _put(p1, p2, layer)
        # Dynamo keys the stack by id(module); a copy has no module of its own, so its key is
        # its path, which is unique within a stack.
        out[k1 if path == p1 else path] = (path, c1)
    return out


def _put(low: str, high: str, layer: int) -> str:
    cut = _shift(low, high, 1, 2)
    return low if cut is None else f"{cut[0]}{layer}{cut[1]}"


def _pair_labels(twin: Item, top: Item) -> bool:
    """Whether ``top`` is ``twin`` one layer up: same op, arguments and shapes, and module
    paths that differ only in the layer index (1 and 2)."""
    if exact_key(twin) != exact_key(top):
        return False
    if isinstance(twin, OutEntry) or isinstance(top, OutEntry):
        return True
    low, high = _labels(twin), _labels(top)
    if len(low) != len(high):
        return False
    try:
        for a, b in zip(low, high):
            _shift(a, b, 1, 2)
    except PeriodError:
        return False
    return True


@dataclass
class Period:
    """The 3-layer graph split into the code outside the layers and layer 0 (``fixed``), layer 1
    (``twin``: the template of layers 1..N-2) and layer 2 (``top``: the template of layer N-1),
    with each reference encoded relative to the layer of the item that makes it."""

    jg: JointGraph
    items: list[Item]
    role: list[str]
    blocks: list[tuple[int, int, bool]]
    """Twin blocks as (start, length, ascending): ascending when the top block follows it."""
    top_of: dict[int, int]
    twin_of: dict[int, int]
    below: dict[int, int] = field(default_factory=dict)
    """Twin position -> position of the same item in layer 0 (a fixed item)."""
    refs: list[list[Ref]] = field(default_factory=list)
    """Per item, how each node among its flattened arguments is referred to."""
    flat: list[tuple[list[Any], Any]] = field(default_factory=list)
    """Per item, its flattened arguments and their tree spec (flattened once, copied N times)."""


def _diff(items2: list[Item], items3: list[Item]) -> list[tuple[int, int]]:
    """Ranges of ``items3`` inserted into ``items2``; anything else is an error."""
    keys2 = [_diff_key(i) for i in items2]
    keys3 = [_diff_key(i) for i in items3]
    matcher = difflib.SequenceMatcher(None, keys2, keys3, autojunk=False)
    inserted = []
    for op, _i1, _i2, j1, j2 in matcher.get_opcodes():
        if op == "insert":
            inserted.append((j1, j2))
        elif op != "equal":
            raise PeriodError(f"the 3-layer graph is not the 2-layer one plus a layer ({op})")
    if not inserted:
        raise PeriodError("the 2- and 3-layer graphs are equal: the layers were not traced")
    return inserted


def _find_twin(items: list[Item], role: list[str], j1: int, j2: int) -> tuple[int, bool]:
    """Start of the layer-1 block beside the inserted block ``j1..j2``, and whether it comes
    before it (layers ascend, as in forward) or after it (they descend, as in backward)."""
    k = j2 - j1
    for start, ascending in ((j1 - k, True), (j2, False)):
        span = range(start, start + k)
        if start < 0 or start + k > len(items) or any(role[p] != FIXED for p in span):
            continue
        if all(_pair_labels(items[start + i], items[j1 + i]) for i in range(k)):
            return start, ascending
    raise PeriodError(f"no layer-1 block matches the inserted block at {j1}..{j2}")


def _pair_blocks(
    items: list[Item], inserted: list[tuple[int, int]]
) -> tuple[list[str], list[tuple[int, int, bool]], dict[int, int], dict[int, int]]:
    """Roles of the items, twin blocks, and the twin <-> top pairing, position by position."""
    role = [FIXED] * len(items)
    for j1, j2 in inserted:
        role[j1:j2] = [TOP] * (j2 - j1)
    blocks, top_of, twin_of = [], {}, {}
    for j1, j2 in inserted:
        k = j2 - j1
        start, ascending = _find_twin(items, role, j1, j2)
        role[start : start + k] = [TWIN] * k
        blocks.append((start, k, ascending))
        for i in range(k):
            top_of[start + i], twin_of[j1 + i] = j1 + i, start + i
    return role, blocks, top_of, twin_of


def _node_leaves(item: Item) -> list[fx.Node]:
    return [a for a in flat_args(item)[0] if isinstance(a, fx.Node)]


def _encode_pair(period: Period, pos: dict[fx.Node, int], t: int) -> None:
    """Encode the references of twin item ``t`` and of its top item, checking they agree."""
    b = period.top_of[t]
    role, below = period.role, period.below
    for a_t, a_b in zip(_node_leaves(period.items[t]), _node_leaves(period.items[b])):
        qt, qb = pos[a_t], pos[a_b]
        if role[qt] == TWIN and period.top_of[qt] == qb:  # same layer
            enc_t = enc_b = ("item", qt, 0)
        elif role[qt] == TOP and role[qb] == FIXED:  # the next layer; the top has none
            enc_t, enc_b = ("item", period.twin_of[qt], 1), ("fixed", qb, 0)
        elif role[qt] == FIXED and qt == qb:  # shared by every layer
            enc_t = enc_b = ("fixed", qt, 0)
        elif role[qt] == FIXED and role[qb] == TWIN and below.get(qb, qt) == qt:
            below[qb] = qt  # the previous layer
            enc_t = enc_b = ("item", qb, -1)
        else:
            raise PeriodError(
                f"{item_name(period.items[t])} and {item_name(period.items[b])} refer to "
                f"{a_t.name} and {a_b.name}: not one layer apart"
            )
        period.refs[t].append(enc_t)
        period.refs[b].append(enc_b)


def item_name(item: Item) -> str:
    return "output" if isinstance(item, OutEntry) else item.name


def learn_period(g2: JointGraph, g3: JointGraph) -> Period:
    """Find the layer blocks of the 3-layer graph ``g3`` against the 2-layer graph ``g2``.

    Args:
        g2, g3: joint graphs of the same model with 2 and 3 layers in its layer stack.

    Returns:
        The Period ``synthesize`` builds deeper graphs from.

    Raises:
        PeriodError: ``g3`` is not ``g2`` with one layer's blocks inserted.

    Example:
        >>> # period = learn_period(capture(two_layers)[0], capture(three_layers)[0])
    """
    if g2.num_fwd_outputs != g3.num_fwd_outputs:
        raise PeriodError("the number of forward outputs changes with the depth")
    items = items_of(g3.gm)
    role, blocks, top_of, twin_of = _pair_blocks(items, _diff(items_of(g2.gm), items))
    period = Period(g3, items, role, blocks, top_of, twin_of, refs=[[] for _ in items])
    period.flat = [flat_args(item) for item in items]
    pos = {item: p for p, item in enumerate(items) if isinstance(item, fx.Node)}
    for p, item in enumerate(items):
        if period.role[p] == TWIN:
            _encode_pair(period, pos, p)
        elif period.role[p] == FIXED:
            for a in _node_leaves(item):
                q = pos[a]
                kind = {FIXED: ("fixed", q, 0), TWIN: ("one", q, 0)}.get(period.role[q])
                period.refs[p].append(kind or ("top", period.twin_of[q], 0))
    return period
