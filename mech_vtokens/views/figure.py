"""Figures for ``.plot()`` methods: made with ``plt.subplots`` under whatever backend is configured (the library
never calls ``matplotlib.use``; Jupyter keeps its inline backend), then detached from pyplot, so a returned
figure shows once as a cell's value (not a second time when pyplot flushes its open figures) and loops of
``.plot()`` leave no open figures behind. Save one with ``fig.savefig(path)``."""

from __future__ import annotations


def subplots(*args, **kwargs):
    """``matplotlib.pyplot.subplots(*args, **kwargs)`` with the figure closed in pyplot: (fig, axes)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(*args, **kwargs)
    plt.close(fig)
    return fig, axes


def figure_of(axes):
    """The Figure that ``axes`` (one Axes or an array / list of them) draw on."""
    import numpy as np

    return np.asarray(axes, dtype=object).flat[0].figure
