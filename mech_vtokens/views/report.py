"""A self-contained HTML report: sections (with a table of contents), text, tables (pandas), matplotlib figures
(inline PNG, and the same PNG written next to the HTML by ``save``), circuitsvis views (sharing ONE inline copy of
the circuitsvis bundle), patch viewers and top-k widgets. No CDN, no network."""

from __future__ import annotations

import base64
import html as _html
import io
import re
from pathlib import Path

from .circuits import View, bundle, page


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48] or "section"


class Report:
    """``heading(text)`` opens a section (listed in the table of contents), ``text`` / ``note`` / ``table`` /
    ``figure`` / ``view`` add to it; ``save(path)`` writes the page and every figure as ``<stem>_figures/NN_name.png``
    beside it."""

    def __init__(self, title: str, subtitle: str = ""):
        self.title, self.subtitle = title, subtitle
        self.parts: list[str] = []
        self.sections: list[tuple[str, str]] = []  # (anchor, heading)
        self.figures: list[tuple[str, bytes]] = []  # (file name, PNG)
        self._has_cv = False

    def heading(self, text: str) -> "Report":
        anchor = f"s{len(self.sections) + 1}-{_slug(text)}"
        self.sections.append((anchor, text))
        self.parts.append(f"<h2 id='{anchor}' class='mvt-section'>{_html.escape(text)}</h2>")
        return self

    def text(self, text: str) -> "Report":
        self.parts.append(f"<p>{_html.escape(text)}</p>")
        return self

    def note(self, text: str) -> "Report":
        """A boxed sentence: why a section has nothing to show, or what a planted fixture is."""
        self.parts.append(f"<p class='mvt-note'>{_html.escape(text)}</p>")
        return self

    def table(self, df, caption: str = "", max_rows: int = 40) -> "Report":
        cap = f"<p><b>{_html.escape(caption)}</b></p>" if caption else ""
        more = (f"<p><small>first {max_rows} of {len(df)} rows (all rows in the CSV)</small></p>"
                if len(df) > max_rows else "")
        self.parts.append(cap + df.head(max_rows).to_html(index=False, float_format=lambda v: f"{v:.4g}",
                                                         classes="mvt-table", border=0, na_rep="–") + more)
        return self

    def figure(self, fig, caption: str = "", name: str | None = None) -> "Report":
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
        import matplotlib.pyplot as plt

        plt.close(fig)
        png = buf.getvalue()
        fname = f"{len(self.figures) + 1:02d}_{_slug(name or caption or 'figure')}.png"
        self.figures.append((fname, png))
        b64 = base64.b64encode(png).decode()
        cap = f"<figcaption>{_html.escape(caption)}</figcaption>" if caption else ""
        self.parts.append(f"<figure data-file='{fname}'><img alt='{_html.escape(caption)}' "
                          f"src='data:image/png;base64,{b64}'/>{cap}</figure>")
        return self

    def view(self, v) -> "Report":
        if isinstance(v, View):
            self._has_cv = True
            self.parts.append(v.fragment())
        else:  # PatchOverlay, TopWords or anything with .html
            self.parts.append(v.html)
        return self

    @property
    def html(self) -> str:
        style = ("<style>.mvt-table{border-collapse:collapse;font-size:12px}"
                 ".mvt-table td,.mvt-table th{padding:2px 6px;border-bottom:1px solid #ddd;text-align:left}"
                 "figure img{max-width:900px}figcaption{font-size:13px;color:#333;max-width:900px}"
                 ".mvt-note{background:#fff8e1;border-left:4px solid #f0b400;padding:6px 10px;max-width:900px}"
                 ".mvt-toc{font-size:14px}.mvt-main p{max-width:1000px}</style>")
        head = f"<script>{bundle()}</script>" if self._has_cv else ""
        toc = ""
        if self.sections:
            toc = ("<nav class='mvt-toc'><b>Contents</b><ol>" + "".join(
                f"<li><a href='#{a}'>{_html.escape(t)}</a></li>" for a, t in self.sections) + "</ol></nav>")
        sub = f"<p>{_html.escape(self.subtitle)}</p>" if self.subtitle else ""
        return page(self.title, f"{style}{head}<div class='mvt-main'><h1>{_html.escape(self.title)}</h1>{sub}{toc}"
                    + "\n".join(self.parts) + "</div>")

    def save(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if self.figures:
            folder = path.parent / f"{path.stem}_figures"
            folder.mkdir(exist_ok=True)
            for fname, png in self.figures:
                (folder / fname).write_bytes(png)
        path.write_text(self.html, encoding="utf-8")
        return path
