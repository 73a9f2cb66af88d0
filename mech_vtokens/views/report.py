"""A self-contained HTML report: sections of text, tables (pandas), matplotlib figures (inline PNG), circuitsvis
views (sharing ONE inline copy of the circuitsvis bundle) and patch overlays. No CDN, no network."""

from __future__ import annotations

import base64
import html as _html
import io
from pathlib import Path

from .circuits import View, bundle, page


class Report:
    def __init__(self, title: str):
        self.title = title
        self.parts: list[str] = []
        self._has_cv = False

    def heading(self, text: str) -> "Report":
        self.parts.append(f"<h2>{_html.escape(text)}</h2>")
        return self

    def text(self, text: str) -> "Report":
        self.parts.append(f"<p>{_html.escape(text)}</p>")
        return self

    def table(self, df, caption: str = "", max_rows: int = 40) -> "Report":
        cap = f"<p><b>{_html.escape(caption)}</b></p>" if caption else ""
        self.parts.append(cap + df.head(max_rows).to_html(index=False, float_format=lambda v: f"{v:.4g}",
                                                         classes="mvt-table", border=0))
        return self

    def figure(self, fig, caption: str = "") -> "Report":
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
        import matplotlib.pyplot as plt

        plt.close(fig)
        b64 = base64.b64encode(buf.getvalue()).decode()
        cap = f"<figcaption>{_html.escape(caption)}</figcaption>" if caption else ""
        self.parts.append(f"<figure><img alt='{_html.escape(caption)}' src='data:image/png;base64,{b64}'/>{cap}"
                          f"</figure>")
        return self

    def view(self, v) -> "Report":
        if isinstance(v, View):
            self._has_cv = True
            self.parts.append(v.fragment())
        else:  # PatchOverlay or anything with .html
            self.parts.append(v.html)
        return self

    @property
    def html(self) -> str:
        style = ("<style>.mvt-table{border-collapse:collapse;font-size:12px}"
                 ".mvt-table td,.mvt-table th{padding:2px 6px;"
                 "border-bottom:1px solid #ddd}figure img{max-width:720px}</style>")
        head = f"<script>{bundle()}</script>" if self._has_cv else ""
        return page(self.title, f"{style}{head}<h1>{_html.escape(self.title)}</h1>" + "\n".join(self.parts))

    def save(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.html, encoding="utf-8")
        return path
