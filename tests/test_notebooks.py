"""Every notebook in notebooks/ executes from top to bottom without an error (on the embedded default model), under
Jupyter's inline matplotlib backend: every cell whose value is a ``.plot()`` shows a PNG (the library never switches
the backend away)."""

import os
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path):
    nbformat = pytest.importorskip("nbformat")
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    root = str(path.parent.parent)  # the kernel imports this checkout's package, not another installed copy
    env = dict(os.environ, MPLBACKEND="module://matplotlib_inline.backend_inline",  # Jupyter's (CI exports Agg)
               PYTHONPATH=os.pathsep.join([root] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute(
        env=env)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    plots = [c for c in nb.cells if c.cell_type == "code" and ".plot(" in c.source.strip().splitlines()[-1]]
    for c in plots:
        pngs = [o for o in c.outputs if "image/png" in o.get("data", {})]
        assert len(pngs) == 1, (c.source, [o.get("data", {}).keys() for o in c.outputs])  # shown, and once
    assert any(c.get("outputs") for c in nb.cells if c.cell_type == "code")


def test_plot_cells_exist():
    """The PNG check above runs on real cells: notebooks 01 and 02 end cells with a .plot()."""
    nbformat = pytest.importorskip("nbformat")
    for name in ("01_quickstart.ipynb", "02_sink_dead_alive.ipynb"):
        nb = nbformat.read(NOTEBOOKS[0].parent / name, as_version=4)
        assert any(".plot(" in c.source.strip().splitlines()[-1] for c in nb.cells if c.cell_type == "code"), name


def test_notebooks_are_present():
    names = {p.name for p in NOTEBOOKS}
    assert {"01_quickstart.ipynb", "02_sink_dead_alive.ipynb", "03_interventions.ipynb",
            "04_compose_in_your_trace.ipynb", "05_remote_ndif.ipynb"} <= names
