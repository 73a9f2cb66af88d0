"""The notebooks in notebooks/ are current and clean.

- The committed .ipynb files hold exactly the cells ``notebooks/build.py`` generates, WITH outputs.
- Each one, executed fresh here (on the embedded default model, under Jupyter's inline matplotlib backend, as
  ``build.py`` runs it), raises no error, writes nothing to stderr (no warning, no text progress bar), shows one PNG
  per ``.plot(`` call of a cell, and gives the committed outputs: the same outputs per cell (type and MIME types),
  the same text (stdout and ``text/plain``) with numbers equal to a tolerance (``NUMBERS_ATOL`` + ``NUMBERS_RTOL``,
  for another machine's float rounding), images and HTML by presence (their bytes depend on matplotlib's version and
  the fonts). Run ``python notebooks/build.py`` when one of these fails.
"""

import importlib.util
import math
import re
from pathlib import Path

import pytest

HERE = Path(__file__).parent.parent / "notebooks"
NOTEBOOKS = sorted(HERE.glob("*.ipynb"))
NUMBERS_ATOL, NUMBERS_RTOL = 2e-3, 1e-3
NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")


def _build():
    spec = importlib.util.spec_from_file_location("notebooks_build", HERE / "build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _read(path):
    nbformat = pytest.importorskip("nbformat")
    return nbformat.read(path, as_version=4)


def _cells(nb):
    return [(c.cell_type, c.source) for c in nb.cells]


def _text(o) -> str:
    """What a reader reads of one output: the stream's text or the plain-text view."""
    t = o.get("text", o.get("data", {}).get("text/plain", ""))
    return "".join(t) if isinstance(t, list) else t


def _shape(o):
    return o.output_type, o.get("name"), tuple(sorted(o.get("data", {})))


def same_text(got: str, want: str) -> bool:
    """Equal words, numbers equal to NUMBERS_ATOL + NUMBERS_RTOL * |want|."""
    if NUMBER.split(got) != NUMBER.split(want):
        return False
    a, b = NUMBER.findall(got), NUMBER.findall(want)
    return len(a) == len(b) and all(math.isclose(float(x), float(y), rel_tol=NUMBERS_RTOL, abs_tol=NUMBERS_ATOL)
                                    for x, y in zip(a, b))


def test_same_text_tolerates_rounding_only():
    assert same_text("|Δ|: [0.1389 0.2117] four", "|Δ|: [0.1390 0.2117] four")
    assert not same_text("|Δ|: [0.1489 0.2117] four", "|Δ|: [0.1389 0.2117] four")  # a changed number
    assert not same_text("|Δ|: [0.1389 0.2117] two", "|Δ|: [0.1389 0.2117] four")  # a changed word
    assert not same_text("alive 288", "alive 288 1")


def test_committed_notebooks_are_the_build_with_outputs():
    """Every notebook build.py writes is committed with exactly its cells, and its code cells have outputs."""
    build = _build()
    assert {p.name for p in NOTEBOOKS} == set(build.NOTEBOOKS), "run python notebooks/build.py"
    for name, cells in build.NOTEBOOKS.items():
        nb = _read(HERE / name)
        assert _cells(nb) == _cells(build.notebook(cells)), f"{name}: cells differ from build.py; rebuild"
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(c.get("execution_count") for c in code), f"{name}: committed unexecuted"
        assert any(c.outputs for c in code) and code[-1].outputs, f"{name}: committed without outputs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs_clean_and_matches_committed(path):
    pytest.importorskip("nbclient")
    build = _build()
    committed = _read(path)
    fresh = build.execute(build.notebook(build.NOTEBOOKS[path.name]))
    code = [(c, k) for c, k in zip(fresh.cells, committed.cells) if c.cell_type == "code"]
    for c, _ in code:
        errors = [o for o in c.outputs if o.output_type == "error"]
        assert not errors, (c.source, [(o.ename, o.evalue) for o in errors])
        stderr = [o.text for o in c.outputs if o.output_type == "stream" and o.name == "stderr"]
        assert not stderr, (c.source, stderr)  # a warning or a text progress bar leaked
        assert not any("Warning:" in _text(o) and "ThresholdWarning:" not in _text(o) for o in c.outputs), c.source
        n_plots = len(re.findall(r"\.plot\(", c.source))
        pngs = [o for o in c.outputs if "image/png" in o.get("data", {})]
        if n_plots:
            assert len(pngs) == n_plots, (c.source, [_shape(o) for o in c.outputs])  # each shown, once
    for c, k in code:
        assert [_shape(o) for o in c.outputs] == [_shape(o) for o in k.outputs], (path.name, c.source)
        for o, ko in zip(c.outputs, k.outputs):
            assert same_text(_text(o), _text(ko)), (path.name, c.source, _text(o), _text(ko))


def test_plot_cells_exist():
    """The PNG check above runs on real cells: notebooks 01 and 02 have cells with a .plot()."""
    for name in ("01_quickstart.ipynb", "02_sink_dead_alive.ipynb"):
        nb = _read(HERE / name)
        assert any(".plot(" in c.source for c in nb.cells if c.cell_type == "code"), name


def test_notebooks_are_present():
    names = {p.name for p in NOTEBOOKS}
    assert {"01_quickstart.ipynb", "02_sink_dead_alive.ipynb", "03_interventions.ipynb",
            "04_compose_in_your_trace.ipynb", "05_remote_ndif.ipynb"} <= names


def test_every_notebook_states_a_finding():
    """Each notebook has prose after its first code cell (what to look at, what it means), not only a title."""
    for path in NOTEBOOKS:
        nb = _read(path)
        first = next(i for i, c in enumerate(nb.cells) if c.cell_type == "code")
        prose = [c.source for c in nb.cells[first:] if c.cell_type == "markdown"]
        assert prose and sum(len(p) for p in prose) > 200, path.name
        assert not any("FINDING_" in p for p in prose), path.name  # a placeholder left in build.py
