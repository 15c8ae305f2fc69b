"""Executes notebooks/walkthrough.ipynb end to end, as a reader would run it."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "walkthrough.ipynb"
_MISSING = [
    name
    for name in ("nbclient", "nbformat", "ipykernel", "matplotlib")
    if importlib.util.find_spec(name) is None
]


@pytest.mark.skipif(
    bool(_MISSING),
    reason=f"executing the notebook needs {', '.join(_MISSING)}: pip install -e '.[dev]'",
)
def test_walkthrough_notebook_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import nbclient
    import nbformat

    # Run a copy from a scratch directory, so that nothing it writes lands in the repository;
    # the kernel inherits PYTHONPATH and finds the repository's benchmarks package through it.
    work = tmp_path / "notebooks"
    work.mkdir()
    shutil.copy(NOTEBOOK, work / NOTEBOOK.name)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    nb = nbformat.read(work / NOTEBOOK.name, as_version=4)
    assert all(not cell.get("outputs") for cell in nb.cells if cell.cell_type == "code"), (
        "commit the notebook with its outputs cleared"
    )
    client = nbclient.NotebookClient(
        nb, kernel_name="python3", timeout=120, resources={"metadata": {"path": str(work)}}
    )
    client.execute()

    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    images = [out for out in outputs if "image/png" in out.get("data", {})]
    assert len(images) == 2, "the Pareto chart and the memory timeline"
    text = "".join(out.get("text", "") for out in outputs)
    assert "gradients match: True" in text
