"""The notebooks: each .ipynb matches its .md twin, and both run top to bottom.

They run headless with the smoke settings (``OOD_JAX_NOTEBOOK_SMOKE=1``), each in
under three minutes; a cell that raises fails the test.
"""

import time
from pathlib import Path

import jupytext
import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(p.stem for p in (ROOT / "notebooks").glob("*.md"))
LIMIT_S = 180


def cells(nb):
    return [(c.cell_type, c.source.strip()) for c in nb.cells]


def test_every_notebook_has_its_pair():
    assert NOTEBOOKS == ["library", "quickstart"]
    for name in NOTEBOOKS:
        text = jupytext.read(ROOT / "notebooks" / f"{name}.md")
        notebook = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
        assert cells(text) == cells(notebook), (
            f"notebooks/{name}.ipynb and .md differ: run `jupytext --sync notebooks/{name}.md`"
        )
        assert "colab.research.google.com" in notebook.cells[0].source


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_top_to_bottom(name, tmp_path, monkeypatch):
    monkeypatch.setenv("OOD_JAX_NOTEBOOK_SMOKE", "1")
    monkeypatch.setenv("OOD_JAX_NOTEBOOK_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    notebook = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    start = time.perf_counter()
    NotebookClient(
        notebook,
        timeout=LIMIT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(ROOT)}},
    ).execute()
    elapsed = time.perf_counter() - start
    assert elapsed < LIMIT_S, f"{name} took {elapsed:.0f} s"
    errors = [o for c in notebook.cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
