"""Tests of graphckpt/plan.py: a Plan round-trips through JSON and renders within 100 columns."""

from __future__ import annotations

import pytest

from graphckpt.plan import LayerPlan, Plan, TensorDecision


def _plan() -> Plan:
    layers = [
        LayerPlan("transformer.h.10", 12, 30, 3 << 20, 10**9, 0.004),
        LayerPlan("post", 2, 0, 1 << 20, 0, 0.0),
    ]
    tensors = [TensorDecision("addmm_3", "transformer.h.10", "keep", 1 << 20)]
    return Plan(
        budget_bytes=1 << 30,
        predicted_peak_bytes=900 << 20,
        min_peak_bytes=300 << 20,
        max_peak_bytes=2 << 30,
        layers=layers,
        tensors=tensors,
    )


def test_json_round_trip() -> None:
    p = _plan()
    assert Plan.from_json(p.to_json()) == p
    assert p.saved_nodes() == {"addmm_3"}
    assert p.kept_bytes == 4 << 20 and p.recompute_flops == 10**9


def test_table_fits_a_terminal() -> None:
    table = _plan().table()
    assert all(len(line) <= 100 for line in table.splitlines())
    assert "total" in table and "predicted peak 900.0 MiB" in table


def test_from_json_rejects_other_json() -> None:
    with pytest.raises(ValueError, match="not a graphckpt plan"):
        Plan.from_json('{"hello": 1}')
