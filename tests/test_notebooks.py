"""Every notebook in notebooks/ executes from top to bottom without an error (on the embedded default model)."""

from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path):
    nbformat = pytest.importorskip("nbformat")
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    assert any(c.get("outputs") for c in nb.cells if c.cell_type == "code")


def test_notebooks_are_present():
    names = {p.name for p in NOTEBOOKS}
    assert {"01_quickstart.ipynb", "02_sink_dead_alive.ipynb", "03_interventions.ipynb", "04_compose_in_your_trace.ipynb",
            "05_remote_ndif.ipynb"} <= names
