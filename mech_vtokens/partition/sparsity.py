"""Semantic sparsity from boxes (paper Sec. 6.2 "Sparse Distribution of Object Semantics", Fig. 7).

``semantic_sparsity(vlm, images, prompts=None, annotations=..., k=5)``. ``annotations``: per image a list of COCO-style
objects ``{"bbox": [x, y, w, h], "label": "cat"}`` (``"category"`` / ``"name"`` are accepted for the label),
boxes in ORIGINAL-image pixels. Object tokens of an object: the visual tokens whose box centre
(``batch.tokens["box"]``: the adapter's geometry, tiles included) lies inside its bbox. One EmbedLens forward per
batch (``hook_embed`` + every ``blocks.{i}.hook_resid_post``); per layer:

- ``object_hit``: fraction of (object token, its object) pairs whose label is in the token's EmbedLens top-k
  (paper: ~2 % at the input, ~10 % after layer 7);
- ``any_grounded``: fraction of ALL visual tokens that have the label of any object of their image in the top-k
  (paper: < 7 %).

Labels become ids with ``probes.label_matching.label_token_ids`` (``rule``: "whole_word" / "first" / "all"; with
"all" every sub-token must be in the same token's top-k).
"""

from __future__ import annotations

import torch

from ..errors import InputError
from ..loop import DEFAULT_BATCH_SIZE, batches, forward, keywords
from ..results import Result
from ..site_names import site_layer


def _label(obj):
    for key in ("label", "category", "name"):
        if key in obj:
            return str(obj[key])
    raise InputError(f"annotation {obj!r} has no 'label' (or 'category' / 'name')")


def _inside(boxes, bbox):
    x, y, w, h = [float(v) for v in bbox]
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    return (cx >= x) & (cx < x + w) & (cy >= y) & (cy < y + h)


def _hits(ids, variants):
    """(n,) bool: the token's top-k ids (n, k) contain one of the label's id lists completely."""
    out = torch.zeros(len(ids), dtype=torch.bool)
    for v in variants:
        ok = torch.ones(len(ids), dtype=torch.bool)
        for i in v:
            ok &= (ids == i).any(-1)
        out |= ok
    return out


def _old_order(args, kwargs):
    if len(args) >= 3 and not isinstance(args[2], str) and any(isinstance(p, (list, tuple)) for p in args[2]):
        return ("semantic_sparsity(vlm, images, annotations, prompts) is the old order: call "
                "semantic_sparsity(vlm, images, prompts, annotations=annotations)")
    return None


@keywords(old=_old_order)
def semantic_sparsity(vlm, images, prompts=None, *, annotations, k: int = 5, rule: str = "whole_word",
                      batch_size: int = DEFAULT_BATCH_SIZE, sites=None, remote=False,
                      progress: bool = False) -> "SparsityResult":
    from mech_vtokens.probes import EmbedLens
    from mech_vtokens.probes.label_matching import label_token_ids

    images = list(images)
    if len(annotations) != len(images):
        raise InputError(f"{len(annotations)} annotation lists for {len(images)} images: give one list of "
                         f"{{'bbox': [x, y, w, h], 'label': ...}} per image")
    table = []
    for objs in annotations:
        row = []
        for o in objs:
            if "bbox" not in o or len(o["bbox"]) != 4:
                raise InputError(f"annotation {o!r}: give 'bbox' as [x, y, width, height] (COCO format)")
            ids = label_token_ids(vlm.tokenizer, _label(o), rule)
            if not ids:
                raise InputError(f"label {_label(o)!r} has no token form under rule={rule!r}")
            row.append((o["bbox"], ids))
        table.append(row)
    lens = EmbedLens(k=k, sites=sites)
    counts, start = {}, 0
    for _, batch in batches(vlm, images, prompts, batch_size, progress, desc="semantic sparsity"):
        res = forward(vlm, batch, [lens], remote=remote)[lens]
        img = batch.tokens["image"]
        for site, ids in res.ids.items():
            c = counts.setdefault(site, [0, 0, 0, 0])  # object hits, object pairs, grounded tokens, tokens
            for i in torch.unique(img).tolist():
                m = (img == i).nonzero()[:, 0]
                boxes = batch.tokens["box"][m]
                tid = ids[m]
                grounded = torch.zeros(len(m), dtype=torch.bool)
                for bbox, variants in table[start + i]:
                    hit = _hits(tid, variants)
                    inside = _inside(boxes, bbox)
                    c[0] += int((hit & inside).sum())
                    c[1] += int(inside.sum())
                    grounded |= hit
                c[2] += int(grounded.sum())
                c[3] += len(m)
        start += len(torch.unique(img))
    return SparsityResult(counts, vlm.n_layers, k, order=vlm.adapter.forward_order)


class SparsityResult(Result):
    """``to_pandas()``: site, layer, object_hit, any_grounded, object_tokens, visual_tokens."""

    name = "semantic_sparsity"

    def __init__(self, counts, n_layers, k, order=None):
        self.counts, self.n_layers, self.k = counts, n_layers, k
        self._order = order  # every site name in forward order: orders the table's ``site`` column

    def to_pandas(self):
        import pandas as pd

        rows = []
        for s, (h, n, g, t) in self.counts.items():
            layer = site_layer(s, self.n_layers)
            rows.append({"site": s, "layer": layer, "object_hit": h / n if n else float("nan"),
                         "any_grounded": g / t if t else float("nan"), "object_tokens": n, "visual_tokens": t})
        df = pd.DataFrame(rows)
        if self._order is not None and len(df):
            from ..site_names import site_column

            df["site"] = site_column(df["site"], self._order)
        return df

    def plot(self, ax=None):
        """Fig. 7: both fractions per layer."""
        from ..views.figure import figure_of, integer_layers, subplots

        df = self.to_pandas()
        if ax is None:
            _, ax = subplots(figsize=(5, 3.5))
        ax.plot(df.layer, df.object_hit, marker="o", label="object tokens with their label in top-%d" % self.k)
        ax.plot(df.layer, df.any_grounded, marker="o", label="visual tokens with any grounded label")
        ax.set_xlabel("layer (-1 = LM input)")
        ax.set_ylabel("fraction of visual tokens")
        integer_layers(ax)
        ax.legend(fontsize=7)
        return figure_of(ax)
