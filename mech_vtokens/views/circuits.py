"""circuitsvis views that work offline.

circuitsvis' ``str()`` / ``show_code()`` load JavaScript from a public CDN and its ``_repr_html_`` probes the internet
on every display. A :class:`View` keeps only the element name and its props and renders them against the JavaScript
bundle that ships inside the circuitsvis wheel: ``view.html`` is self-contained (what ``RenderedHTML.local_src``
is), Jupyter displays it with no network, ``view.save(path)`` writes a page, and a report can share ONE copy of the
1.3 MB bundle across all its views.
"""

from __future__ import annotations

import html as _html
import uuid
from functools import lru_cache
from pathlib import Path

import numpy as np


@lru_cache(maxsize=1)
def bundle() -> str:
    """The circuitsvis JavaScript bundle shipped in its wheel (no CDN)."""
    import circuitsvis

    path = Path(circuitsvis.__file__).parent / "dist" / "cdn" / "iife.js"
    return path.read_text(encoding="utf-8").replace("</script>", "")


class View:
    """A circuitsvis element + props, rendered offline. ``.html`` standalone fragment; ``.fragment()`` without
    the bundle (for pages that include :func:`bundle` once); ``.save(path)`` a full page."""

    def __init__(self, element: str, title: str = "", **props):
        self.element = element
        self.title = title
        self.props = props

    def fragment(self) -> str:
        from circuitsvis.utils.convert_props import convert_props

        uid = "mvt-" + uuid.uuid4().hex[:12]
        head = f"<h4>{_html.escape(self.title)}</h4>" if self.title else ""
        return (f'{head}<div id="{uid}" class="mvt-cv" data-element="{self.element}" style="margin: 15px 0;"></div>'
                f'<script>CircuitsVis.render("{uid}", CircuitsVis.{self.element}, {convert_props(self.props)});'
                f"</script>")

    @property
    def html(self) -> str:
        return f"<script>{bundle()}</script>{self.fragment()}"

    def _repr_html_(self) -> str:  # Jupyter: self-contained, no network probe
        return self.html

    def save(self, path) -> Path:
        path = Path(path)
        path.write_text(page(self.title or self.element, self.html), encoding="utf-8")
        return path


def page(title: str, body: str) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{_html.escape(title)}</title></head>"
            f"<body style='font-family: sans-serif'>{body}</body></html>")


def token_values(labels, values, title: str = "", min_value=None, max_value=None) -> View:
    """circuitsvis ``colored_tokens``: one coloured chip per token (e.g. visual tokens coloured by L2 norm or φ)."""
    vals = [round(float(v), 4) for v in np.asarray(values, dtype=float).reshape(-1)]
    if len(vals) != len(labels):
        from ..errors import InputError

        raise InputError(f"token_values: {len(labels)} labels but {len(vals)} values; pass one value per token")
    return View("ColoredTokens", title=title, tokens=[str(x) for x in labels], values=vals, minValue=min_value,
                maxValue=max_value)


def attention(pattern, labels, title: str = "", head_names=None) -> View:
    """circuitsvis ``attention_heads``: ``pattern`` (heads, query, key) e.g. text→visual attention at one layer."""
    import torch

    pat = torch.as_tensor(pattern).float()
    if pat.ndim == 2:
        pat = pat[None]
    props = dict(attention=pat.numpy().round(4).tolist(), tokens=[str(x) for x in labels])
    if head_names is not None:
        props["attentionHeadNames"] = list(head_names)
    return View("AttentionHeads", title=title, **props)
