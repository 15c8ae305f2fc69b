"""Tests of graphckpt/cli.py: the main job runs on a user factory and fails in one line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from graphckpt.cli import main


def test_plan_on_a_small_factory(tmp_path, capsys) -> None:
    out = tmp_path / "plan.json"
    status = main(["plan", "--model", "tests.graphckpt.test_cli:tiny_factory", "--json", str(out)])
    assert status == 0
    printed = capsys.readouterr().out
    assert "predicted peak" in printed and "measured peak" in printed and "extra FLOPs" in printed
    assert json.loads(out.read_text())["budget_bytes"] > 0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["plan", "--budget-gb", "-1"], "budget_gb must be a positive finite"),
        (["plan", "--model", "no_such_module:f"], "cannot import"),
        (["plan", "--model", "graphckpt.examples"], "package.module:factory"),
        (["plan", "--model", "graphckpt.examples:missing"], "no callable"),
    ],
)
def test_bad_arguments_are_one_line_errors(argv, message, capsys) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_module_entry_point_exits_nonzero_without_traceback() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "graphckpt", "plan", "--budget-gb", "0"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "graphckpt: error:" in proc.stderr


def tiny_factory():
    from graphckpt.examples import gpt_example

    return gpt_example(batch=2, seq=16, n_layer=2, n_embd=32, n_head=2, vocab_size=64)
