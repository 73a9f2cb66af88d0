"""Figures for ``.plot()`` methods and the ONE palette every view uses.

Figures are made with ``plt.subplots`` under whatever backend is configured (the library never calls
``matplotlib.use``; Jupyter keeps its inline backend, whose formatter shows a Figure that is a cell's value), then
detached from pyplot, so a returned figure shows once as a cell's value (not a second time when pyplot flushes its
open figures) and loops of ``.plot()`` leave no open figures behind. Save one with ``fig.savefig(path)``.

``GROUP_COLORS``: one colour per token group (partition groups, visual / text tokens), used by every matplotlib
plot AND the HTML patch overlay, so a group has the same colour everywhere. ``color_of(name)`` also maps the long
names plots use ("visual sinks (φ>τ ...)", "alive (injected ...)") to their group's colour.
"""

from __future__ import annotations

# tab10 colours, fixed per group (the same hex in matplotlib plots and in the HTML overlay)
GROUP_COLORS = {
    "vit_sink": "#ff7f0e",   # orange
    "llm_sink": "#d62728",   # red
    "sink": "#d62728",
    "dead": "#7f7f7f",       # grey
    "alive": "#2ca02c",      # green
    "visual": "#1f77b4",     # blue
    "text": "#9467bd",       # purple
    "vision_only": "#8c564b",  # brown: vision-tower rows no visual token keeps (e.g. LLaVA's CLS)
}
# colours for anything else (a user's own groups), in a fixed order after the group colours
CYCLE = ["#17becf", "#bcbd22", "#e377c2", "#8c564b", "#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd"]
# rank tracking and other "the rest" series
BACKGROUND = "#c7c7c7"
# the colour scale of values (L2 norm, φ, lens scores) in plots and the overlay's colour bar
VALUE_CMAP = "viridis"

# names a plot may show for a group
GROUP_NAMES = {"vit_sink": "ViT sink", "llm_sink": "LLM sink", "dead": "dead", "alive": "alive",
               "visual": "visual tokens", "text": "text tokens", "vision_only": "vision rows without a token"}


def color_of(name: str, others: list | None = None) -> str:
    """The palette colour of group ``name`` (a long label whose first word names a group counts as that group);
    a name outside the palette gets the next CYCLE colour by its position in ``others`` (default: its hash)."""
    key = str(name)
    if key in GROUP_COLORS:
        return GROUP_COLORS[key]
    for g, long in GROUP_NAMES.items():
        if key == long or key.startswith(long + " "):
            return GROUP_COLORS[g]
    head = key.split(" ")[0]
    for g in GROUP_COLORS:
        if head == g or head.rstrip("s") == g:
            return GROUP_COLORS[g]
    pos = others.index(name) if others is not None and name in others else sum(map(ord, key))
    return CYCLE[pos % len(CYCLE)]


def integer_layers(ax, axis: str = "x") -> None:
    """Layer axes show whole layers only (no 1.5)."""
    from matplotlib.ticker import MaxNLocator

    getattr(ax, f"{axis}axis").set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))


def subplots(*args, **kwargs):
    """``matplotlib.pyplot.subplots(*args, **kwargs)`` with the figure closed in pyplot: (fig, axes). Uses
    ``layout="constrained"`` unless told otherwise (titles and labels do not overlap)."""
    import matplotlib.pyplot as plt

    kwargs.setdefault("layout", "constrained")
    fig, axes = plt.subplots(*args, **kwargs)
    plt.close(fig)
    return fig, axes


def figure_of(axes):
    """The Figure that ``axes`` (one Axes or an array / list of them) draw on."""
    import numpy as np

    return np.asarray(axes, dtype=object).flat[0].figure


def value_colors(values, lo=None, hi=None) -> list[str]:
    """Hex colours of ``values`` on the value colour scale between ``lo`` and ``hi`` (default: their range)."""
    import matplotlib
    import numpy as np

    v = np.asarray(values, dtype=float)
    lo = float(np.nanmin(v)) if lo is None else lo
    hi = float(np.nanmax(v)) if hi is None else hi
    norm = (v - lo) / (hi - lo) if hi > lo else np.zeros_like(v)
    cmap = matplotlib.colormaps[VALUE_CMAP]
    return [matplotlib.colors.to_hex(cmap(float(x))) if np.isfinite(x) else "#00000000" for x in norm]


def colorbar_stops(n: int = 11) -> list[str]:
    """``n`` evenly spaced hex colours of the value colour scale (the HTML colour bar's gradient)."""
    import matplotlib

    cmap = matplotlib.colormaps[VALUE_CMAP]
    return [matplotlib.colors.to_hex(cmap(i / (n - 1))) for i in range(n)]
