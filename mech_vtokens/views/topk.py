"""The top-k WORDS of every visual token of one image, per site, from a lens result (EmbedLens / LogitLens).

circuitsvis' ``topk_tokens`` ranks its third dimension (neurons) per token and labels each sample with ONE fixed
string, so it cannot show a different word list per site; this small self-contained widget (vanilla JS, no network)
does: a Site selector, one row per visual token (its grid cell), one column per rank, the word and its score, the
cell shaded by the score on the shared value scale (:mod:`mech_vtokens.views.figure`).

``skip_special=True`` (default) hides special tokens (``</s>``, ``<unk>``, ...) and punctuation-only tokens
(``?``, ``.``) from the lists (the widget says how many it hid); the lens itself still ranked them (search them
out with ``EmbedLens(skip_special=True)``). ``skip_special=False`` shows every word the lens returned.
"""

from __future__ import annotations

import html as _html
import json
import unicodedata
import uuid

import numpy as np

from ..errors import InputError


def hidden_word(word: str, special: bool) -> bool:
    """True for a special token or a word made only of punctuation / symbols / spaces (what ``skip_special``
    hides)."""
    if special:
        return True
    w = word.strip()
    return not w or all(unicodedata.category(ch)[0] in "PSZ" for ch in w)


class WordTable:
    """The decoded words of a set of token ids, each stored once (a page refers to them by index)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.words: list[str] = []
        self.hidden: list[bool] = []
        self._index: dict[int, int] = {}
        self._special = set(int(i) for i in getattr(tokenizer, "all_special_ids", []))

    def index(self, token_id: int) -> int:
        token_id = int(token_id)
        if token_id not in self._index:
            w = self.tok.decode([token_id]) if token_id >= 0 else "∅"
            self._index[token_id] = len(self.words)
            self.words.append(w)
            self.hidden.append(token_id < 0 or hidden_word(w, token_id in self._special))
        return self._index[token_id]


def lens_sites(result) -> list[str]:
    """The LM sites of a lens result that hold one row per visual token (the projector site is left out)."""
    return [s for s in result.ids if s != "vision_projector.hook_out"]


def cell_label(batch, v: int) -> str:
    """A visual token's name on its image: ``(row,col)``, with its tile where the image has several."""
    t = batch.tokens
    tile = int(t["tile"][v])
    return f"({int(t['row'][v])},{int(t['col'][v])})" + (f" t{tile}" if tile >= 0 else "")


class TopWords:
    """The top-k words per visual token of ``image``, per site of a lens ``result`` (Site selector).

    ``.data()`` is what the page shows (``tops[site][token]``: one ``[word index, score]`` per rank, ``None``
    where ``skip_special`` hid the word) (also what tests check); ``.html`` a self-contained fragment;
    Jupyter shows it as a cell's value; ``.save(path)`` writes a page.
    """

    def __init__(self, result, image: int = 0, skip_special: bool = True, title: str | None = None):
        frame = result._frames["lm"]
        rows = np.flatnonzero((frame["image"].to_numpy() == image) & (frame["visual_index"].to_numpy() >= 0))
        if not len(rows):
            raise InputError(f"TopWords: image {image} has no visual tokens in this {result.lens} result "
                             f"(images 0..{int(frame['image'].max())})")
        self.result, self.image, self.skip_special, self.rows = result, image, skip_special, rows
        self.title = title or f"{result.lens}: top-{result.ids[lens_sites(result)[0]].shape[1]} words per visual " \
                              f"token, image {image}"

    def data(self) -> dict:
        res, rows = self.result, self.rows
        words = WordTable(res._tok)
        vi = res._frames["lm"]["visual_index"].to_numpy()[rows]
        sites = lens_sites(res)
        tops, n_hidden = {}, 0
        for s in sites:
            ids, sc = res.ids[s][rows].tolist(), res.scores[s][rows].float().tolist()
            per = []
            for r_ids, r_sc in zip(ids, sc):
                keep = []
                for a, b in zip(r_ids, r_sc):
                    w = words.index(a)
                    if self.skip_special and words.hidden[w]:
                        n_hidden += 1
                        keep.append(None)  # the rank keeps its column; the page shows "·"
                        continue
                    keep.append([w, round(float(b), 3)])
                per.append(keep)
            tops[s] = per
        return {"sites": sites, "tokens": [cell_label(res._batch, int(v)) for v in vi], "words": words.words,
                "tops": tops, "k": int(res.ids[sites[0]].shape[1]), "hidden": n_hidden,
                "skip_special": self.skip_special}

    @property
    def html(self) -> str:
        uid = "tw" + uuid.uuid4().hex[:10]
        d = self.data()
        note = (f"special and punctuation-only tokens hidden ({d['hidden']} entries; TopWords(..., "
                f"skip_special=False) shows them)" if self.skip_special else
                "every word the lens returned (special and punctuation tokens included)")
        head = "".join(f"<th>rank {i + 1}</th>" for i in range(d["k"]))
        return f"""<div id="{uid}" class="mvt-topwords" style="font-family:sans-serif;font-size:12px;margin:8px 0">
<h4>{_html.escape(self.title)}</h4>
<label>Site: <select class="site-select"></select></label> <span style="color:#666">{_html.escape(note)}</span>
<div style="max-height:360px;overflow:auto;margin-top:4px"><table class="mvt-table"><thead><tr><th>token</th>{head}
</tr></thead><tbody></tbody></table></div></div>
<script>(function(){{const D={json.dumps(d)};const root=document.getElementById("{uid}");
const sel=root.querySelector(".site-select"),body=root.querySelector("tbody");
D.sites.forEach(s=>{{const o=document.createElement("option");o.value=s;o.textContent=s;sel.appendChild(o);}});
sel.value=D.sites[D.sites.length-1];
function draw(){{const T=D.tops[sel.value];let lo=Infinity,hi=-Infinity;
T.forEach(r=>r.forEach(e=>{{if(e){{lo=Math.min(lo,e[1]);hi=Math.max(hi,e[1]);}}}}));body.innerHTML="";
T.forEach((r,i)=>{{const tr=document.createElement("tr");const th=document.createElement("td");
th.textContent=D.tokens[i];tr.appendChild(th);
for(let j=0;j<D.k;j++){{const td=document.createElement("td");td.className="word";
if(j<r.length&&!r[j]){{td.textContent="·";td.title="hidden (special / punctuation-only)";td.style.color="#999";}}
else if(j<r.length){{const a=hi>lo?(r[j][1]-lo)/(hi-lo):0.5;td.textContent=D.words[r[j][0]]+" "+r[j][1].toFixed(2);
td.style.background="rgba(31,119,180,"+(0.08+0.5*a).toFixed(3)+")";}}tr.appendChild(td);}}
body.appendChild(tr);}});}}
sel.onchange=draw;draw();}})();</script>"""

    def _repr_html_(self) -> str:
        return self.html

    def save(self, path):
        from pathlib import Path

        from .circuits import page

        path = Path(path)
        path.write_text(page(self.title, self.html), encoding="utf-8")
        return path
