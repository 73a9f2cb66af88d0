"""Patch-grid overlay: the image with every visual token's patch coloured by a value or a group.

circuitsvis has no image widget, so this is a small self-contained page (inline PNG, CSS, vanilla JS; no CDN).
Cells are placed from ``batch.tokens["box"]`` — the adapter's geometry — so LLaVA's square grid, Qwen's variable
merged grid, InternVL's tiles (+ thumbnail, chosen with a selector) and LLaVA-NeXT's base image + high-res canvas
all land where the model saw them; tokens without a region (newline tokens) get no cell. Hovering a
cell shows that token's top-k EmbedLens and LogitLens tokens at the layer chosen with the slider.
"""

from __future__ import annotations

import base64
import html as _html
import io
import json
import uuid

import numpy as np
from PIL import Image

from ..errors import InputError

GROUP_COLORS = {"sink": "#d62728", "vit_sink": "#ff7f0e", "llm_sink": "#d62728", "dead": "#7f7f7f",
                "alive": "#2ca02c", "visual": "#1f77b4"}
_PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22"]


def _png(image, side: int = 384) -> tuple[str, int, int]:
    """The image as base64 PNG, scaled so its longer side is ``side`` px (small images are enlarged to be seen)."""
    im = image.convert("RGB")
    scale = side / max(im.size)
    if abs(scale - 1.0) > 1e-3:
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))),
                       Image.NEAREST if scale > 1 else Image.BILINEAR)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode(), im.width, im.height


def _colormap(values: np.ndarray) -> list[str]:
    import matplotlib

    lo, hi = float(np.nanmin(values)), float(np.nanmax(values))
    norm = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
    cmap = matplotlib.colormaps["viridis"]
    return [matplotlib.colors.to_hex(cmap(float(v))) for v in norm]


class PatchOverlay:
    """Overlay of one image of a batch.

    ``values``: one number per visual token of the batch (e.g. L2 norm, φ) or ``groups``: one label per visual token
    (e.g. "sink" / "dead" / "alive"); ``lenses``: lens results (EmbedLens, LogitLens) whose top-k tokens the hover
    shows, per site, with a slider over their common sites.
    """

    def __init__(self, batch, image: int = 0, values=None, groups=None, lenses=(), title: str = ""):
        if not batch.images:
            raise InputError("PatchOverlay needs a batch with images (vlm.prepare(images, prompts))")
        if not 0 <= image < len(batch.images):
            raise InputError(f"image {image} is out of range: the batch has {len(batch.images)} image(s)")
        n = batch.n_visual
        if values is not None and groups is not None:
            raise InputError("PatchOverlay: pass values= or groups=, not both")
        if values is not None:
            values = np.asarray(values, dtype=float).reshape(-1)
            if len(values) != n:
                raise InputError(f"PatchOverlay: {len(values)} values for {n} visual tokens; pass one per token")
        if groups is not None:
            groups = [str(g) for g in groups]
            if len(groups) != n:
                raise InputError(f"PatchOverlay: {len(groups)} group labels for {n} visual tokens")
        self.batch, self.image, self.values, self.groups = batch, image, values, groups
        self.lenses = list(lenses)
        self.title = title

    def data(self) -> dict:
        """What the page shows, as plain JSON-able data (also what tests check)."""
        t = self.batch.tokens
        # tokens without a region (LLaVA-NeXT / OneVision newline tokens: NaN box) have no cell
        idx = np.flatnonzero((t["image"].numpy() == self.image) & ~np.isnan(t["box"].numpy()).any(1))
        w, h = self.batch.image_sizes[self.image]
        cells, kinds = [], self.batch.kinds
        for j in idx:
            x0, y0, x1, y1 = (float(v) for v in t["box"][j])
            cells.append({"i": int(j), "tile": int(t["tile"][j]), "row": int(t["row"][j]), "col": int(t["col"][j]),
                          "kind": kinds[j],
                          "box": [round(x0 / w, 5), round(y0 / h, 5), round(x1 / w, 5), round(y1 / h, 5)]})
        legend = []
        if self.values is not None:
            colors = _colormap(self.values[idx])
            for c, col, v in zip(cells, colors, self.values[idx]):
                c["color"], c["value"] = col, round(float(v), 4)
            legend = [{"label": f"min {np.nanmin(self.values[idx]):.3g}", "color": colors[int(np.argmin(
                self.values[idx]))]}, {"label": f"max {np.nanmax(self.values[idx]):.3g}",
                                       "color": colors[int(np.argmax(self.values[idx]))]}]
        elif self.groups is not None:
            names = sorted({self.groups[j] for j in idx})
            cmap = {g: GROUP_COLORS.get(g, _PALETTE[k % len(_PALETTE)]) for k, g in enumerate(names)}
            for c, j in zip(cells, idx):
                c["color"], c["group"] = cmap[self.groups[j]], self.groups[j]
            legend = [{"label": f"{g} ({sum(self.groups[j] == g for j in idx)})", "color": cmap[g]} for g in names]
        sites, tops = self._lens_tops(idx)
        tiles = sorted({c["tile"] for c in cells})
        return {"cells": cells, "legend": legend, "sites": sites, "tops": tops, "tiles": tiles,
                "grid": self.batch.grids[self.image] if self.batch.grids else {}}

    def _lens_tops(self, idx):
        if not self.lenses:
            return [], {}
        sites = [s for s in self.lenses[0].ids if all(s in r.ids for r in self.lenses)
                 and s != "vision_projector.hook_out"]
        tops = {}
        for res in self.lenses:
            frame = res._frames["lm"]
            if len(frame) != self.batch.n_visual:
                raise InputError("PatchOverlay: lens results must read the visual positions of this same batch")
            table = {}
            for s in sites:
                ids, sc = res.ids[s][idx], res.scores[s][idx]
                table[s] = [[f"{res._tok.decode([int(a)])} {float(b):.2f}" for a, b in zip(r1, r2)]
                            for r1, r2 in zip(ids.tolist(), sc.float().tolist())]
            tops[res.lens] = table
        return sites, tops

    @property
    def html(self) -> str:
        b64, pw, ph = _png(self.batch.images[self.image])
        uid = "ov" + uuid.uuid4().hex[:10]
        payload = json.dumps(self.data())
        title = f"<h4>{_html.escape(self.title)}</h4>" if self.title else ""
        return f"""{title}<div id="{uid}" class="mvt-overlay" style="font-family:sans-serif;font-size:12px">
<div class="controls" style="margin:4px 0"></div>
<div style="display:flex;gap:12px;align-items:flex-start">
<div class="stage" style="position:relative;width:{pw}px;height:{ph}px;background:url(data:image/png;base64,{b64});
background-size:100% 100%"></div>
<div><div class="legend"></div><pre class="info" style="min-width:260px;white-space:pre-wrap;margin:6px 0">hover a patch
</pre></div></div></div>
<script>(function(){{
const D={payload};const root=document.getElementById("{uid}");
const stage=root.querySelector(".stage"),info=root.querySelector(".info"),ctl=root.querySelector(".controls");
let site=D.sites.length?D.sites[D.sites.length-1]:null, tile=D.tiles[0], cur=null;
if(D.sites.length){{const lab=document.createElement("label");lab.textContent="layer: ";
const s=document.createElement("input");
s.type="range";s.min=0;s.max=D.sites.length-1;s.value=D.sites.length-1;s.className="layer-slider";
const out=document.createElement("span");out.className="site-name";out.textContent=" "+site;
s.oninput=()=>{{site=D.sites[+s.value];out.textContent=" "+site;if(cur)show(cur);}};
lab.appendChild(s);lab.appendChild(out);ctl.appendChild(lab);}}
if(D.tiles.length>1){{const sel=document.createElement("select");sel.className="tile-select";
D.tiles.forEach(t=>{{const o=document.createElement("option");o.value=t;
o.textContent=D.cells.some(c=>c.tile===t&&c.kind==="thumbnail")?"thumbnail":"tile "+t;
sel.appendChild(o);}});
sel.onchange=()=>{{tile=+sel.value;draw();}};ctl.appendChild(document.createTextNode(" "));ctl.appendChild(sel);}}
const leg=root.querySelector(".legend");D.legend.forEach(l=>{{const d=document.createElement("div");
d.innerHTML='<span style="display:inline-block;width:12px;height:12px;background:'+l.color+'"></span> '+l.label;
leg.appendChild(d);}});
function show(c){{cur=c;let t="token "+c.i+"  grid ("+c.row+","+c.col+")"+(c.tile>=0?" tile "+c.tile:"");
if(c.value!==undefined)t+="\\nvalue "+c.value;if(c.group!==undefined)t+="\\ngroup "+c.group;
for(const lens in D.tops){{const k=D.cells.indexOf(c);
t+="\\n\\n"+lens+" @ "+site+"\\n  "+D.tops[lens][site][k].join("\\n  ");}}
info.textContent=t;}}
function draw(){{stage.querySelectorAll(".cell").forEach(e=>e.remove());
D.cells.filter(c=>c.tile===tile).forEach(c=>{{const e=document.createElement("div");e.className="cell";
const b=c.box;
Object.assign(e.style,{{position:"absolute",left:(b[0]*100)+"%",top:(b[1]*100)+"%",width:((b[2]-b[0])*100)+"%",
height:((b[3]-b[1])*100)+"%",boxSizing:"border-box",border:"1px solid rgba(255,255,255,.35)",
background:c.color||"transparent",opacity:c.color?0.55:1}});e.dataset.token=c.i;
e.onmouseenter=()=>{{show(c);e.style.outline="2px solid #000";}};
e.onmouseleave=()=>{{e.style.outline="";}};stage.appendChild(e);}});}}
draw();}})();</script>"""

    def _repr_html_(self) -> str:
        return self.html

    def save(self, path):
        from pathlib import Path

        from .circuits import page

        path = Path(path)
        path.write_text(page(self.title or "patch overlay", self.html), encoding="utf-8")
        return path
