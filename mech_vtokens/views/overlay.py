"""Patch-grid viewer: each image beside its colouring, a colour bar, a layer slider, a hover with every layer.

circuitsvis has no image widget, so this is a small self-contained page (inline PNG, CSS, vanilla JS; no CDN).
Cells are placed from ``batch.tokens["box"]`` — the adapter's geometry — so LLaVA's square grid, Qwen's variable
merged grid, InternVL's tiles (+ thumbnail, chosen with a selector) and LLaVA-NeXT's base image + high-res canvas
all land where the model saw them; tokens without a region (newline tokens) get no cell.

What a reader sees, per image (one panel each; several images form a grid): the image as the model got it
(``data.to_rgb``, untinted, a faint patch grid) and, beside it, the same patches filled with the colouring — a
value on the shared colour scale with a colour bar (``values=``), or a group in the shared palette with a legend
(``groups=``; :mod:`mech_vtokens.views.figure`, the colours every matplotlib plot uses). The layer slider appears
only when the colouring depends on the layer (``values={site: array}``) and moves the colouring and its colour
bar. Hovering a patch (on either side) shows that token's value / group, the prompt's text tokens, and a table of
EVERY layer's top-k words for each lens given (EmbedLens, LogitLens), the slider's layer marked.
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
from .figure import GROUP_COLORS, color_of, colorbar_stops, value_colors
from .topk import WordTable, lens_sites

_STOPS = 11


def _png(image, side: int) -> tuple[str, int, int]:
    """The image (converted by ``data.to_rgb``, the one conversion) as base64 PNG, scaled so its longer side is
    ``side`` px (small images are enlarged with nearest-neighbour to be seen)."""
    from ..data import to_rgb

    im = to_rgb(image)
    scale = side / max(im.size)
    if abs(scale - 1.0) > 1e-3:
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))),
                       Image.NEAREST if scale > 1 else Image.BILINEAR)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode(), im.width, im.height


# the viewer's script: __UID__ / __DATA__ are replaced by the element id and the JSON of data()
_JS = r"""<script>(function(){
const D=__DATA__;const root=document.getElementById("__UID__");
const info=root.querySelector(".info"),ctl=root.querySelector(".controls"),key=root.querySelector(".key");
const esc=s=>String(s).replace(/[&<>"]/g,c=>({"&":"&amp;","<":"&lt;",">":"&gt;",'"':"&quot;"}[c]));
let si=D.scales.length-1, cur=null;
const fmt=v=>Math.abs(v)>=100||(Math.abs(v)<0.01&&v!==0)?v.toExponential(2):v.toPrecision(3);
function drawKey(){key.innerHTML="";
if(D.scales.length){const s=D.scales[si];const bar=document.createElement("div");bar.className="colorbar";
bar.style.cssText="width:260px;height:12px;border:1px solid #888;background:linear-gradient(to right,"+D.stops.join(",")+")";
const ticks=document.createElement("div");ticks.className="colorbar-ticks";
ticks.style.cssText="width:262px;display:flex;justify-content:space-between";
[s.lo,(s.lo+s.hi)/2,s.hi].forEach(v=>{const t=document.createElement("span");t.textContent=fmt(v);ticks.appendChild(t);});
const cap=document.createElement("div");cap.className="colorbar-label";
cap.textContent=(D.label||"value")+(s.site?" at "+s.site:"");key.appendChild(cap);key.appendChild(bar);key.appendChild(ticks);}
D.legend.forEach(l=>{const e=document.createElement("span");e.className="legend-item";e.style.marginRight="12px";
e.innerHTML='<span style="display:inline-block;width:12px;height:12px;vertical-align:middle;background:'+l.color+'"></span> '+esc(l.label);
key.appendChild(e);});}
if(D.color_sites.length>1){const lab=document.createElement("label");lab.textContent="layer: ";
const s=document.createElement("input");s.type="range";s.min=0;s.max=D.color_sites.length-1;s.value=si;
s.className="layer-slider";const out=document.createElement("span");out.className="site-name";
out.textContent=" "+D.color_sites[si];
s.oninput=()=>{si=+s.value;out.textContent=" "+D.color_sites[si];recolor();drawKey();if(cur)show(cur[0],cur[1]);};
lab.appendChild(s);lab.appendChild(out);ctl.appendChild(lab);}
function color(c){return c.colors?c.colors[si]:(c.color||"transparent");}
function show(p,c){cur=[p,c];const k=p.cells.indexOf(c);
let h="<b>"+esc(p.name)+" · token "+c.i+"</b> · grid ("+c.row+","+c.col+")"+(c.tile>=0?" · tile "+c.tile:"")+" · "+c.kind;
if(c.values!==undefined)h+="<br>"+esc(D.label||"value")+(D.color_sites.length?" at "+esc(D.color_sites[si]):"")+": <b>"+c.values[si]+"</b>";
if(c.group!==undefined)h+="<br>group: <b>"+esc(c.group)+"</b>";
if(p.text&&p.text.length)h+='<div class="prompt-tokens" style="margin:4px 0">prompt: '+p.text.map(t=>'<span style="border:1px solid #ccc;margin:1px;padding:0 2px;white-space:pre">'+esc(t)+"</span>").join("")+"</div>";
if(D.lenses.length){const sites=[];D.lenses.forEach(l=>D.lens_sites[l].forEach(s=>{if(!sites.includes(s))sites.push(s);}));
const mark=D.color_sites.length?D.color_sites[si]:null;
h+='<table class="mvt-table layers"><tr><th>site</th>'+D.lenses.map(l=>"<th>"+esc(l)+" top-k</th>").join("")+"</tr>";
sites.forEach(s=>{h+='<tr class="layer-row"'+(s===mark?' style="background:#fff3c4"':"")+"><td>"+esc(s)+"</td>";
D.lenses.forEach(l=>{const r=p.tops[l][s];h+="<td>"+(r?r[k].map(e=>esc(D.words[e[0]])+" <small>"+e[1]+"</small>").join(", "):"")+"</td>";});
h+="</tr>";});h+="</table>";if(D.skip_special)h+='<small style="color:#666">special / punctuation-only words hidden</small>';}
info.innerHTML=h;}
function recolor(){root.querySelectorAll(".color-stage .cell").forEach(e=>{e.style.background=color(e._c);});}
D.panels.forEach((p,pi)=>{const panel=root.querySelectorAll(".panel")[pi];let tile=p.tiles[0];
const stages=[panel.querySelector(".image-stage"),panel.querySelector(".color-stage")];
function draw(){stages.forEach(st=>st.querySelectorAll(".cell").forEach(e=>e.remove()));
p.cells.filter(c=>c.tile===tile).forEach(c=>{const pair=[];stages.forEach((st,si2)=>{const e=document.createElement("div");
e.className="cell";e._c=c;const b=c.box;
Object.assign(e.style,{position:"absolute",left:(b[0]*100)+"%",top:(b[1]*100)+"%",width:((b[2]-b[0])*100)+"%",
height:((b[3]-b[1])*100)+"%",boxSizing:"border-box",border:si2?"1px solid rgba(255,255,255,.6)":"1px solid rgba(255,255,255,.25)",
background:si2?color(c):"transparent"});e.dataset.token=c.i;pair.push(e);st.appendChild(e);});
pair.forEach(e=>{e.onmouseenter=()=>{show(p,c);pair.forEach(x=>x.style.outline="2px solid #000");};
e.onmouseleave=()=>{pair.forEach(x=>x.style.outline="");};});});}
if(p.tiles.length>1){const sel=document.createElement("select");sel.className="tile-select";
p.tiles.forEach(t=>{const o=document.createElement("option");o.value=t;
o.textContent=p.cells.some(c=>c.tile===t&&c.kind==="thumbnail")?"thumbnail":"tile "+t;sel.appendChild(o);});
sel.onchange=()=>{tile=+sel.value;draw();};panel.querySelector(".tile-ctl").appendChild(sel);}
draw();});
drawKey();})();</script>"""  # noqa: E501


class PatchOverlay:
    """A viewer of one image (``image=0``) or several (``image=[0, 2]`` or ``"all"``: a grid) of a batch.

    ``values``: one number per visual token of the batch (e.g. L2 norm), or ``{site: one number per visual token}``
    for a layer-dependent colouring (the slider picks the site); ``groups``: one label per visual token (e.g.
    "dead" / "alive"); ``label``: what the values are (the colour bar's caption); ``lenses``: lens results of this
    batch (EmbedLens, LogitLens) whose top-k words the hover shows at every layer; ``skip_special``: hide special /
    punctuation-only words in the hover (as :class:`~mech_vtokens.views.topk.TopWords`).
    """

    def __init__(self, batch, image=0, values=None, groups=None, lenses=(), title: str = "", label: str = "",
                 skip_special: bool = True, side: int | None = None, image_names=None):
        if not batch.images:
            raise InputError("PatchOverlay needs a batch with images (vlm.prepare(images, prompts))")
        n_img = len(batch.images)
        images = list(range(n_img)) if isinstance(image, str) and image == "all" else (
            [image] if isinstance(image, (int, np.integer)) else list(image))
        if not images:
            raise InputError("PatchOverlay: no image to show; pass image=0, a list of indices or 'all'")
        for i in images:
            if not isinstance(i, (int, np.integer)) or not 0 <= i < n_img:
                raise InputError(f"image {i} is out of range: the batch has {n_img} image(s)")
        n = batch.n_visual
        if values is not None and groups is not None:
            raise InputError("PatchOverlay: pass values= or groups=, not both")
        if values is not None:
            per_site = values if isinstance(values, dict) else {"": values}
            values = {}
            for s, v in per_site.items():
                v = np.asarray(v, dtype=float).reshape(-1)
                if len(v) != n:
                    raise InputError(f"PatchOverlay: {len(v)} values{' at ' + s if s else ''} for {n} visual tokens;"
                                     f" pass one per token")
                values[s] = v
            if not values:
                raise InputError("PatchOverlay: values={} holds no site; pass {site: one value per token}")
        if groups is not None:
            groups = [str(g) for g in groups]
            if len(groups) != n:
                raise InputError(f"PatchOverlay: {len(groups)} group labels for {n} visual tokens")
        for r in lenses:
            if len(r._frames["lm"]) != n:
                raise InputError("PatchOverlay: lens results must read the visual positions of this same batch "
                                 "(run the lenses on these images and prompts, positions='visual')")
        self.batch, self.images, self.values, self.groups = batch, images, values, groups
        self.image = images[0]
        self.lenses = list(lenses)
        self.title, self.label, self.skip_special = title, label, skip_special
        self.side = side or (384 if len(images) == 1 else 224)
        if image_names is not None and len(image_names) != n_img:
            raise InputError(f"PatchOverlay: {len(image_names)} image_names for {n_img} images; pass one per image "
                             f"of the batch")
        self.image_names = [str(x) for x in image_names] if image_names is not None else [f"image {i}"
                                                                                          for i in range(n_img)]

    # ---------------------------------------------------------------------------------------------------------
    def _cells(self, image: int):
        t = self.batch.tokens
        # tokens without a region (LLaVA-NeXT / OneVision newline tokens: NaN box) have no cell
        idx = np.flatnonzero((t["image"].numpy() == image) & ~np.isnan(t["box"].numpy()).any(1))
        w, h = self.batch.image_sizes[image]
        kinds = self.batch.kinds
        cells = []
        for j in idx:
            x0, y0, x1, y1 = (float(v) for v in t["box"][j])
            cells.append({"i": int(j), "tile": int(t["tile"][j]), "row": int(t["row"][j]), "col": int(t["col"][j]),
                          "kind": kinds[j],
                          "box": [round(x0 / w, 5), round(y0 / h, 5), round(x1 / w, 5), round(y1 / h, 5)]})
        return idx, cells

    def _text_tokens(self, image: int) -> list[str]:
        """The prompt of ``image``'s row as tokens, the image's run of visual tokens as one ``<image ×N>``."""
        b = self.batch
        row = b.image_of_row[image] if b.image_of_row else 0
        tok = self.lenses[0]._tok if self.lenses else None
        if tok is None:
            return [str(b.prompts[row])] if b.prompts else []
        ids = b.inputs["input_ids"][row].tolist()
        att = b.inputs.get("attention_mask")
        att = att[row].tolist() if att is not None else [1] * len(ids)
        vis = b.visual_mask[row].tolist()
        out, run = [], 0
        for a, m, v in zip(ids, att, vis):
            if not m:
                continue
            if v:
                run += 1
                continue
            if run:
                out.append(f"<image ×{run}>")
                run = 0
            out.append(tok.decode([int(a)]))
        if run:
            out.append(f"<image ×{run}>")
        return out

    def data(self) -> dict:
        """What the page shows, as plain JSON-able data (also what tests check). The first panel's ``cells``,
        ``tiles`` and ``grid`` are repeated at the top level."""
        words = WordTable(self.lenses[0]._tok) if self.lenses else None
        color_sites = [s for s in self.values] if self.values is not None and list(self.values) != [""] else []
        panels, all_idx = [], []
        for image in self.images:
            idx, cells = self._cells(image)
            all_idx.append(idx)
            panels.append({"image": image, "name": self.image_names[image], "cells": cells,
                           "tiles": sorted({c["tile"] for c in cells}),
                           "grid": self.batch.grids[image] if self.batch.grids else {},
                           "text": self._text_tokens(image)})
        idx = np.concatenate(all_idx) if all_idx else np.zeros(0, int)
        legend, scales = [], []
        if self.values is not None:  # one scale per site, shared by the images shown
            for s, v in self.values.items():
                shown = v[idx]
                lo, hi = float(np.nanmin(shown)), float(np.nanmax(shown))
                scales.append({"site": s, "lo": lo, "hi": hi})
                for p, pidx in zip(panels, all_idx):
                    cols = value_colors(v[pidx], lo, hi)
                    for c, col, x in zip(p["cells"], cols, v[pidx]):
                        c.setdefault("colors", []).append(col)
                        c.setdefault("values", []).append(round(float(x), 4))
            for p in panels:  # the layer-independent / first site's colour, also as a plain field
                for c in p["cells"]:
                    c["color"], c["value"] = c["colors"][-1], c["values"][-1]
        elif self.groups is not None:
            names = sorted({self.groups[j] for j in idx})
            for p, pidx in zip(panels, all_idx):
                for c, j in zip(p["cells"], pidx):
                    c["color"], c["group"] = color_of(self.groups[j], names), self.groups[j]
            legend = [{"label": f"{g} ({sum(self.groups[j] == g for j in idx)})", "color": color_of(g, names)}
                      for g in names]
        lens_names, lens_site_lists = [], {}
        if self.lenses:
            for res in self.lenses:
                sites = lens_sites(res)
                lens_site_lists[res.lens] = sites
                lens_names.append(res.lens)
                for p, pidx in zip(panels, all_idx):
                    table = {}
                    for s in sites:
                        ids, sc = res.ids[s][pidx].tolist(), res.scores[s][pidx].float().tolist()
                        table[s] = [[[words.index(a), round(float(b), 2)] for a, b in zip(r1, r2)
                                     if not (self.skip_special and words.hidden[words.index(a)])]
                                    for r1, r2 in zip(ids, sc)]
                    p.setdefault("tops", {})[res.lens] = table
        first = panels[0]
        return {"cells": first["cells"], "tiles": first["tiles"], "grid": first["grid"], "panels": panels,
                "legend": legend, "color_sites": color_sites, "scales": scales, "label": self.label,
                "stops": colorbar_stops(_STOPS), "lenses": lens_names, "lens_sites": lens_site_lists,
                "words": words.words if words else [], "skip_special": self.skip_special,
                "group_colors": GROUP_COLORS}

    # ---------------------------------------------------------------------------------------------------------
    @property
    def html(self) -> str:
        uid = "ov" + uuid.uuid4().hex[:10]
        d = self.data()
        imgs = {}
        for i in self.images:
            b64, pw, ph = _png(self.batch.images[i], self.side)
            imgs[i] = (b64, pw, ph)
        panels = []
        for p in d["panels"]:
            b64, pw, ph = imgs[p["image"]]
            stage = (f'position:relative;width:{pw}px;height:{ph}px;')
            panels.append(
                f'<div class="panel" data-image="{p["image"]}" style="border:1px solid #ddd;padding:4px">'
                f'<div class="caption"><b>{_html.escape(self.image_names[p["image"]])}</b> '
                f'<span class="tile-ctl"></span></div>'
                f'<div style="display:flex;gap:4px">'
                f'<div class="stage image-stage" title="the image" style="{stage}background:url(data:image/png;'
                f'base64,{b64});background-size:100% 100%"></div>'
                f'<div class="stage color-stage" title="the colouring" style="{stage}background:#fff"></div>'
                f'</div></div>')
        title = f"<h4>{_html.escape(self.title)}</h4>" if self.title else ""
        cols = 1 if len(self.images) == 1 else 2
        payload = json.dumps(d)
        return f"""<div id="{uid}" class="mvt-overlay" style="font-family:sans-serif;font-size:12px">{title}
<div class="controls" style="margin:4px 0"></div>
<div class="key" style="margin:4px 0"></div>
<div style="display:flex;gap:12px;align-items:flex-start">
<div class="panels" style="display:grid;grid-template-columns:repeat({cols},max-content);gap:8px">
{''.join(panels)}</div>
<div class="info" style="min-width:320px;max-width:560px;position:sticky;top:4px">hover a patch</div></div></div>
{_JS.replace("__UID__", uid).replace("__DATA__", payload)}"""

    def _repr_html_(self) -> str:
        return self.html

    def save(self, path):
        from pathlib import Path

        from .circuits import page

        path = Path(path)
        path.write_text(page(self.title or "patch overlay", self.html), encoding="utf-8")
        return path
