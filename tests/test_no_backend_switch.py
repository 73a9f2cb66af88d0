"""Library code never switches the matplotlib backend (``matplotlib.use`` in a library turns Jupyter's inline
backend off, so plots never appear): a scan of the package sources, and ``.plot()`` returns a Figure that pyplot
does not keep open."""

import ast
from pathlib import Path

ROOT = Path(__file__).parent.parent
PACKAGES = ("mech_vtokens", "probes", "interventions")


def _calls_use(path: Path) -> list[int]:
    tree = ast.parse(path.read_text(), str(path))
    return [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
            and n.func.attr in ("use", "switch_backend")
            and isinstance(n.func.value, ast.Name) and n.func.value.id in ("matplotlib", "mpl", "plt", "pyplot")]


def test_no_library_module_switches_the_backend():
    files = [f for p in PACKAGES for f in sorted((ROOT / p).rglob("*.py"))]
    assert len(files) > 30  # the scan really sees the package
    hits = {str(f.relative_to(ROOT)): lines for f in files if (lines := _calls_use(f))}
    assert not hits, f"matplotlib backend switched in library code: {hits}"


def test_scan_finds_a_planted_call(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import matplotlib\n\ndef plot():\n    matplotlib.use('Agg', force=False)\n")
    assert _calls_use(f) == [4]


def test_plot_returns_a_detached_figure(tiny_vlm):
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    import mech_vtokens as mv
    from mech_vtokens import testing as T
    from mech_vtokens.probes import EmbedLens, NormTracker

    vlm = tiny_vlm("llava")
    plt.close("all")
    res = mv.run(vlm, [T.image(60)], [T.prompt("llava")], probes=[EmbedLens(k=2), NormTracker()])
    lens, norms = res["embed_lens"], res["norm_tracker"]
    for r in (lens, norms):
        fig = r.plot()
        assert isinstance(fig, Figure) and fig.axes
    assert plt.get_fignums() == []  # nothing left open for pyplot to show a second time
    fig, ax = plt.subplots()
    assert lens.plot(ax=ax) is fig  # drawn on the caller's axes: the caller's figure
    plt.close(fig)
