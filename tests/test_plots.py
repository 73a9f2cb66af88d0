"""Every ``.plot()`` with the habits of the field (issue 16): whole-layer ticks, a legend on every panel that shows
series, readable names, and each group in the ONE palette (``views.figure.GROUP_COLORS``) — asserted on the
Figure's artists. A returned Figure shows inline in Jupyter (IPython's inline formatter gives a PNG)."""

import numpy as np
import pytest
from matplotlib.colors import to_hex

import mech_vtokens as mv
from mech_vtokens import testing as T
from mech_vtokens.probes import NormTracker, SinkChannels, ViTSinks
from mech_vtokens.views.figure import BACKGROUND, GROUP_COLORS


def _draw(fig):
    fig.canvas.draw()
    return fig


def _integer_ticks(ax, axis="x"):
    lo, hi = getattr(ax, f"get_{axis}lim")()
    ticks = [t for t in getattr(ax, f"get_{axis}ticks")() if min(lo, hi) - 1e-9 <= t <= max(lo, hi) + 1e-9]
    assert ticks, "no ticks"
    return all(float(t).is_integer() for t in ticks)


def _lines(ax):
    return {ln.get_label(): to_hex(ln.get_color()) for ln in ax.get_lines() if not ln.get_label().startswith("_")}


@pytest.fixture(scope="module")
def planted_llava(tmp_path_factory):
    path, truth = T.planted_partition_model("llava", tmp_path_factory.mktemp("plots") / "planted")
    vlm = mv.load(path, attn_implementation="eager")
    ims = [T.planted_image(truth, s)[0] for s in range(4)]
    return vlm, truth, ims, T.prompt("llava", "what is in the image ?")


def test_norms_plot_layers_legends_palette(tiny_vlm):
    vlm = tiny_vlm("llava")
    res = mv.run(vlm, [T.image(112, seed=1), T.image(112, seed=2)], [T.prompt("llava")] * 2,
                 probes=[NormTracker()])["norm_tracker"]
    fig = _draw(res.plot())
    axes = fig.axes
    assert len(axes) == 4
    for ax in axes:
        assert _integer_ticks(ax), (ax.get_title(), ax.get_xticks())
        assert ax.get_legend() is not None, ax.get_title()
        lines = _lines(ax)
        assert "unused" not in lines
        assert lines.get("visual tokens") == GROUP_COLORS["visual"]
    lm = [ax for ax in axes if ax.get_title().startswith("LM")]
    assert all(_lines(ax)["text tokens"] == GROUP_COLORS["text"] for ax in lm)
    # the plotted means are the table's (plain pandas)
    df = res.to_pandas()
    want = df[(df.tower == "lm") & (df.visual_index >= 0)].groupby("layer").l2.mean()
    got = next(ln for ln in lm[0].get_lines() if ln.get_label() == "visual tokens")
    np.testing.assert_allclose(got.get_ydata(), want.to_numpy(), rtol=1e-5)
    np.testing.assert_array_equal(got.get_xdata(), want.index.to_numpy())


def test_partition_plots_use_the_palette(planted_llava):
    from mech_vtokens.partition import GroupDynamics, calibrate, summarize
    from mech_vtokens.partition.partition import GROUPS

    vlm, truth, ims, pr = planted_llava
    part = calibrate(vlm, ims, pr, vit_threshold=truth["vit_threshold"], phi_threshold=truth["phi_threshold"])
    # summary: one bar per group, in its palette colour, with a legend; no checkpoint path in any title
    fig = _draw(summarize(vlm, ims, pr, partition=part).plot())
    for ax in fig.axes:
        assert [to_hex(b.get_facecolor()) for b in ax.patches] == [GROUP_COLORS[g] for g in GROUPS]
        assert "/" not in ax.get_title()
    assert any(ax.get_legend() is not None for ax in fig.axes)
    # dynamics: per group, palette colours, integer layers, legends on both panels
    gd = mv.run(vlm, ims[:2], [pr] * 2, probes=[GroupDynamics(part)])["group_dynamics"]
    fig = _draw(gd.plot())
    for ax in fig.axes:
        assert _integer_ticks(ax)
        assert ax.get_legend() is not None
        assert _lines(ax) == {g: GROUP_COLORS[g] for g in _lines(ax)} and set(_lines(ax)) == set(GROUPS)
    # the token grid: each cell's colour is its group's palette colour
    one = mv.run(vlm, ims[:1], [pr], probes=[part])[part]
    fig = _draw(one.plot(0))
    ax = fig.axes[0]
    im = ax.get_images()[0]
    rgba = im.cmap(im.norm(im.get_array()))
    d = one.to_pandas()
    for _, r in d.iterrows():
        assert to_hex(rgba[r.grid_row, r.grid_col]) == GROUP_COLORS[r.group]
    assert ax.get_legend() is not None and _integer_ticks(ax, "x") and _integer_ticks(ax, "y")


def test_sink_plots_rank_tracking_and_vit_sinks(planted_llava):
    vlm, truth, ims, pr = planted_llava
    out = mv.run(vlm, ims[:2], [pr] * 2, probes=[SinkChannels(threshold=truth["phi_threshold"]),
                                                 ViTSinks(layer=-1, threshold=truth["vit_threshold"])])
    sk = out["sink_channels"]
    fig = _draw(sk.plot())
    left, right = fig.axes[:2]
    assert left.get_legend() is not None and right.get_legend() is not None
    lines = _lines(left)
    assert lines["visual tokens"] == GROUP_COLORS["visual"] and lines["text tokens"] == GROUP_COLORS["text"]
    assert lines["sink tokens (φ>τ at any site)"] == GROUP_COLORS["llm_sink"]  # the planted LLM sinks
    # rank tracking: exactly 3 coloured lines (the lowest mean rank), every other tracked token grey
    rt = sk.rank_tracking()
    mean_rank = rt.groupby(["row", "tracked"])["rank"].mean().sort_values(kind="stable")
    coloured = [ln for ln in right.get_lines() if to_hex(ln.get_color()) != BACKGROUND and len(ln.get_ydata())]
    grey = [ln for ln in right.get_lines() if to_hex(ln.get_color()) == BACKGROUND and len(ln.get_ydata())]
    assert len(coloured) == 3 and len(grey) == len(mean_rank) - 3
    got = sorted(float(np.mean(ln.get_ydata())) for ln in coloured)
    np.testing.assert_allclose(got, sorted(mean_rank.iloc[:3].to_numpy()))
    # ViT sinks as a plot: the planted sinks marked in the ViT-sink colour, a labelled colour bar
    vs = out["vit_sinks"]
    fig = _draw(vs.plot(0))
    ax = fig.axes[0]
    marks = ax.collections[0]
    assert to_hex(marks.get_edgecolor()[0]) == GROUP_COLORS["vit_sink"]
    want = sorted(tuple(c) for c in truth["vit"])
    got = sorted((int(r), int(c)) for c, r in marks.get_offsets())
    assert got == want
    assert ax.get_legend() is not None and fig.axes[1].get_ylabel() == "L2 norm"


def test_plot_shows_inline_in_jupyter(tiny_vlm):
    """A .plot() Figure, as a cell's value under the inline backend, is displayed as a PNG (IPython's formatter),
    without the library switching the backend."""
    ipy = pytest.importorskip("IPython")
    pytest.importorskip("matplotlib_inline")
    from IPython.core.interactiveshell import InteractiveShell
    from matplotlib_inline.backend_inline import configure_inline_support

    vlm = tiny_vlm("llava")
    res = mv.run(vlm, [T.image(112, seed=1)], [T.prompt("llava")], probes=[NormTracker()])["norm_tracker"]
    fig = res.plot()
    shell = InteractiveShell.instance()
    try:
        configure_inline_support(shell, "inline")  # what `%matplotlib inline` / ipykernel sets up
        data, _ = shell.display_formatter.format(fig)
    finally:
        InteractiveShell.clear_instance()
    assert data.get("image/png", b"")[:4] in (b"\x89PNG", "iVBO"), list(data)
    assert ipy is not None
