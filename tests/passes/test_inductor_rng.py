"""Tests of passes/inductor_rng.py: random ops become inductor's seeded draws before planning."""

from __future__ import annotations

import doctest
import importlib

import torch
from torch import fx, nn

from graphckpt.options import DeviceSpec
from passes.cost import estimate_costs
from passes.inductor_rng import keep_unread_draws, seed_random_draws
from passes.meta import is_random, is_seeded_draw
from passes.trace import capture_joint_graphs


class _RandomMask(nn.Module):
    """Two dropout-style masks drawn with ``torch.rand``, each read again by backward."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(32, 32)
        self.b = nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        h = h * (torch.rand(h.shape) > 0.1)
        h = self.b(h)
        return (h * (torch.rand(h.shape) > 0.2)).sum()


def test_draws_become_seeded_and_only_the_seeds_stay_random() -> None:
    (jg,) = capture_joint_graphs(_RandomMask(), (torch.randn(8, 32),))
    assert sum(is_random(n) for n in jg.forward) == 2
    assert seed_random_draws(jg) > 0
    random = [n for n in jg.gm.graph.nodes if is_random(n)]
    draws = [n for n in jg.gm.graph.nodes if is_seeded_draw(n)]
    assert [str(n.target) for n in random] == ["prims.inductor_seeds.default"]
    assert len(draws) == 2
    # Every node of the rewrite has a role, and the draws run in forward.
    assert all(n in jg.forward for n in [*random, *draws])
    computed = [n for n in jg.gm.graph.nodes if n.op == "call_function"]
    assert set(computed) == {*jg.forward, *jg.backward}
    assert all("val" in n.meta for n in computed)
    # A graph without random ops is left alone.
    (plain,) = capture_joint_graphs(nn.Linear(4, 4), (torch.randn(2, 4),))
    assert seed_random_draws(plain) == 0


def test_keeping_a_mask_costs_more_than_drawing_it_again() -> None:
    (jg,) = capture_joint_graphs(_RandomMask(), (torch.randn(8, 32),))
    seed_random_draws(jg)
    spec = DeviceSpec()
    costs = estimate_costs(
        [*jg.forward, *jg.backward], spec, fused_pointwise=True, backward=jg.backward
    )
    for draw in (n for n in jg.forward if is_seeded_draw(n)):
        drawn = draw.meta["val"].numel() / spec.random_elements_per_s
        assert costs[draw].seconds >= drawn
        (mask,) = draw.users  # the comparison with p
        assert costs[mask].keep_seconds > costs[draw].seconds + costs[mask].seconds


def test_unread_draws_get_a_reader_that_writes_them() -> None:
    def draws(x: torch.Tensor) -> torch.Tensor:
        torch.ops.aten.bernoulli.p(x, 0.5)  # unread
        return torch.ops.aten.bernoulli.p(x, 0.5) * x

    gm = fx.symbolic_trace(draws)
    for node in gm.graph.nodes:
        node.meta["val"] = torch.empty(4) if node.op != "output" else None
    assert keep_unread_draws(gm) == 1
    readers = [n for n in gm.graph.nodes if n.target is torch.ops.graphckpt.drawn.default]
    (reader,) = readers
    (unread,) = reader.args
    assert is_random(unread) and list(unread.users) == [reader]
    assert torch.ops.graphckpt.drawn.default._schema.is_mutable  # never removed as dead
    assert keep_unread_draws(gm) == 0  # every draw is read now
    gm(torch.ones(4))  # the reader runs, and does nothing


def test_docstring_examples() -> None:
    module = importlib.import_module("passes.inductor_rng")
    assert doctest.testmod(module).failed == 0
