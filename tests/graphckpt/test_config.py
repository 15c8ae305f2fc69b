"""Tests of graphckpt/config.py: DeepSpeed's keys and defaults, validation, and reading a
DeepSpeed config."""

from __future__ import annotations

import dataclasses
import doctest
import importlib
import json
from pathlib import Path

import pytest

from graphckpt.config import CheckpointConfig


def test_defaults_are_deepspeed_defaults() -> None:
    cfg = CheckpointConfig()
    assert dataclasses.asdict(cfg) == {
        "partition_activations": False,
        "contiguous_memory_optimization": False,
        "cpu_checkpointing": False,
        "number_checkpoints": None,
        "synchronize_checkpoint_boundary": False,
        "profile": False,
        "release_inputs": False,
    }


def test_frozen_and_keyword_only() -> None:
    cfg = CheckpointConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.profile = True  # type: ignore[misc]
    with pytest.raises(TypeError):
        CheckpointConfig(True)  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"partition_activations": 1}, TypeError, "partition_activations must be a bool, got 1"),
        ({"profile": "yes"}, TypeError, "profile must be a bool"),
        ({"number_checkpoints": 2.0}, TypeError, "number_checkpoints must be an int"),
        ({"number_checkpoints": True}, TypeError, "number_checkpoints must be an int"),
        ({"number_checkpoints": 0}, ValueError, "number_checkpoints must be >= 1, got 0"),
        ({"contiguous_memory_optimization": True}, ValueError, "set number_checkpoints"),
    ],
)
def test_validation(kwargs: dict, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        CheckpointConfig(**kwargs)


def test_from_deepspeed_dict() -> None:
    cfg = CheckpointConfig.from_deepspeed(
        {
            "train_batch_size": 8,
            "activation_checkpointing": {
                "partition_activations": True,
                "cpu_checkpointing": True,
                "contiguous_memory_optimization": True,
                "number_checkpoints": 4,
                "synchronize_checkpoint_boundary": False,
                "profile": True,
            },
        }
    )
    assert cfg == CheckpointConfig(
        partition_activations=True,
        cpu_checkpointing=True,
        contiguous_memory_optimization=True,
        number_checkpoints=4,
        profile=True,
    )


def test_from_deepspeed_json_file_and_missing_section(tmp_path: Path) -> None:
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps({"activation_checkpointing": {"profile": True}}))
    assert CheckpointConfig.from_deepspeed(path).profile
    assert CheckpointConfig.from_deepspeed(str(path)).profile
    assert CheckpointConfig.from_deepspeed({"train_batch_size": 1}) == CheckpointConfig()


@pytest.mark.parametrize(
    ("section", "error", "match"),
    [
        (
            {"partition_activation": True},
            ValueError,
            r"activation_checkpointing\.partition_activation",
        ),
        ({"release_inputs": True}, ValueError, r"activation_checkpointing\.release_inputs"),
        ({"cpu_checkpointing": "true"}, TypeError, r"activation_checkpointing\.cpu_checkpointing"),
        ({"number_checkpoints": "4"}, TypeError, r"activation_checkpointing\.number_checkpoints"),
        ([], TypeError, "must be a JSON object"),
    ],
)
def test_from_deepspeed_errors_name_the_key(
    section: object, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        CheckpointConfig.from_deepspeed({"activation_checkpointing": section})


def test_from_deepspeed_file_must_hold_an_object(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        CheckpointConfig.from_deepspeed(path)


def test_docstring_examples_run() -> None:
    # importlib: the package re-exports names that shadow some of its submodules.
    result = doctest.testmod(importlib.import_module("graphckpt.config"))
    assert result.attempted > 0 and result.failed == 0
