"""Tests of passes/layers.py: repeated blocks are found and identical ones share a signature."""

from __future__ import annotations

import pytest

from passes.layers import find_segments
from passes.trace import capture_joint_graphs


def test_gpt_blocks_are_identical_layers(tiny_gpt) -> None:
    model, inputs = tiny_gpt
    jg = capture_joint_graphs(model, inputs)[0]
    segments = find_segments(jg.forward)
    names = [s.name for s in segments]
    assert names == ["pre", "blocks.0", "blocks.1", "post"]
    assert segments[1].signature == segments[2].signature
    assert sum(len(s.nodes) for s in segments) == len(jg.forward)


def test_layers_hint_that_matches_nothing_is_an_error(tiny_gpt) -> None:
    model, inputs = tiny_gpt
    jg = capture_joint_graphs(model, inputs)[0]
    with pytest.raises(ValueError, match="matches no module"):
        find_segments(jg.forward, layers="nonexistent")


def test_a_list_of_bare_modules_is_one_chain_and_blocks_are_layers() -> None:
    import torch

    chain = torch.nn.Sequential(*[torch.nn.Linear(8, 8), torch.nn.ReLU()] * 3)
    blocks = torch.nn.Sequential(
        *[torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU()) for _ in range(3)]
    )
    x = torch.randn(4, 8)
    chunks = [s.name for s in find_segments(capture_joint_graphs(chain, (x,))[0].forward)]
    assert chunks[0] == "part.0" and len(chunks) >= 2
    names = [s.name for s in find_segments(capture_joint_graphs(blocks, (x,))[0].forward)]
    assert names[:3] == ["0", "1", "2"]
