"""Norm tracker (paper Secs. 5.2 and 6.2, Figs. 5, 6 and 8): L1 / L2 norms per token at every vision-encoder layer
and every LM layer, and the layer-to-layer cosine similarity (how much each layer changes a token).

Sites: ``vision.blocks.{i}.hook_resid_post`` for every vision layer (``vision=True``) and ``hook_embed`` +
``blocks.{i}.hook_resid_post`` for every LM layer (``lm=True``), plus the vectors a family adds between layers
(Qwen3-VL DeepStack, ``blocks.{i}.hook_deepstack``: their own norms; ``cos_prev`` NaN, and the chain of
``cos_prev`` skips them). ``cos_prev`` is the cosine between a token's state
at a site and at the previous site of the same tower (NaN at the first site of each tower). LM rows: every attended
position; vision rows: every row of the block output flattened to (-1, d) (LLaVA keeps its CLS row, Qwen packs all
images in one sequence; ``vision_row`` says which).

Groups: LM tokens are ``"visual"`` or ``"text"``; a vision row takes the group of the visual token it is merged into
(``batch.tokens["vision_rows"]``; rows no visual token uses, e.g. CLS, are ``"unused"``). Pass ``groups`` (to the
probe or later to ``by_group``/``plot``) to split visual tokens further: a sequence with one label per visual token
(``batch.visual_positions`` order) or a dict ``{label: [visual indices]}`` (e.g. sink / dead / alive).

Kinds: every row has a ``kind`` (``batch.kinds`` of its visual token: "patch", "thumbnail", "newline", "cls";
"text" at a text position, "unused" for a vision row no visual token uses). The means of ``by_group`` / ``plot``
take the visual tokens of ``kinds`` only, by default ``results.REGION_KINDS`` ("patch", "thumbnail": the tokens
that show a region of the image; LLaVA-NeXT / OneVision's learned newline tokens are left out, they have no image
region and skew the means); text rows and unused vision rows are always kept. The choice is in the table's
``attrs["kinds"]``; ``to_pandas()`` keeps every row.
"""

from __future__ import annotations

import torch

from mech_vtokens.component import Probe, select_rows
from mech_vtokens.errors import InputError
from mech_vtokens.results import REGION_KINDS, Result, check_kinds, token_frame
from mech_vtokens.site_names import parse_site, site_column


def _injected(vlm, i):
    """The site of the vector the model adds to the residual stream after LM layer ``i`` (Qwen3-VL DeepStack:
    ``blocks.{i}.hook_deepstack``), as the adapter declares it; none for most families."""
    a = vlm.adapter
    return [f"blocks.{i}.{a.injection[0]}"] if a.injection and i in a.injection_layers() else []


class NormTracker(Probe):
    """L1 / L2 norm and layer-to-layer cosine per token at every vision and LM layer (paper Secs. 5.2, 6.2)."""

    def __init__(self, vision: bool = True, lm: bool = True, groups=None, kinds=REGION_KINDS):
        from mech_vtokens.errors import check_flag

        vision, lm = check_flag(vision, "NormTracker: vision"), check_flag(lm, "NormTracker: lm")
        if not (vision or lm):
            raise InputError("NormTracker(vision=False, lm=False) reads nothing; enable at least one tower")
        self.vision, self.lm, self.groups, self.kinds = vision, lm, groups, check_kinds(kinds, "NormTracker")

    def sites(self, vlm):
        out = []
        if self.vision:
            out += [f"vision.blocks.{i}.hook_resid_post" for i in range(vlm.n_vision_layers)]
        if self.lm:
            out += ["hook_embed"]
            for i in range(vlm.n_layers):
                out.append(f"blocks.{i}.hook_resid_post")
                out += _injected(vlm, i)
        return out

    def check(self, vlm, batch):
        if self.vision and batch.n_visual == 0:
            raise InputError("NormTracker(vision=True) needs an image in the batch; pass one or use vision=False")
        if self.groups is not None:
            _labels(self.groups, batch.n_visual)

    def extras(self, vlm, batch):
        att = batch.inputs.get("attention_mask")
        att = torch.ones_like(batch.visual_mask) if att is None else att.bool()
        sites = self.sites(vlm)
        towers = {s: vlm.adapter.parse_site(s).tower for s in sites}
        firsts = [s for j, s in enumerate(sites) if j == 0 or towers[sites[j - 1]] != towers[s]]
        return {"select": att, "first": firsts, "last": sites[-1],
                "vision": [s for s in sites if towers[s] == "vision"],
                "side": [s for i in range(vlm.n_layers) for s in _injected(vlm, i)] if self.lm else []}

    def at(self, site, value, ctx, out):
        mine = ctx["mine"]
        with torch.no_grad():
            x = value.detach()
            x = x.reshape(-1, x.shape[-1]) if site in mine["vision"] else select_rows(x, mine["select"], ctx)[0]
            x = x.float()
            rec = {"l1": x.abs().sum(-1), "l2": x.norm(dim=-1)}
            prev = out.get("_prev")
            side = site in mine["side"]  # a vector added between layers: its own norm, outside the cos chain
            if side or site in mine["first"] or prev is None or prev.shape != x.shape:
                rec["cos_prev"] = torch.full_like(rec["l2"], float("nan"))
            else:
                rec["cos_prev"] = torch.nn.functional.cosine_similarity(x, prev, dim=-1)
            out[site] = rec
            if site == mine["last"]:
                out.pop("_prev", None)
            elif not side:
                out["_prev"] = x

    def collect(self, raw, batch, vlm):
        ex = self.extras(vlm, batch)
        return NormResult({s: raw[s] for s in self.sites(vlm)}, batch, ex["select"], self.groups, vlm.n_layers,
                          vlm.adapter.forward_order, injected=ex["side"], kinds=self.kinds)



def _labels(groups, n_visual):
    """One label per visual token from a sequence or a {label: indices} dict."""
    if isinstance(groups, dict):
        lab = ["visual"] * n_visual
        for name, idx in groups.items():
            for i in idx:
                if not 0 <= int(i) < n_visual:
                    raise InputError(f"group {name!r} names visual index {i}, but the batch has {n_visual} visual "
                                     f"tokens (0..{n_visual - 1})")
                lab[int(i)] = str(name)
        return lab
    lab = [str(g) for g in groups]
    if len(lab) != n_visual:
        raise InputError(f"groups has {len(lab)} labels but the batch has {n_visual} visual tokens; give one label "
                         f"per visual token (batch.visual_positions order) or a dict {{label: [visual indices]}}")
    return lab


class NormResult(Result):
    """``to_pandas()``: per token and site: tower, site, layer, row, image, position, visual_index, kind, vision_row,
    group, l1, l2, cos_prev. ``by_group(kinds=)``: means per (tower, site, layer, group) over the visual tokens of
    ``kinds`` (default: the probe's, ``REGION_KINDS``; text rows always), ``attrs["kinds"]`` says which."""

    name = "norms"

    def __init__(self, data, batch, select, groups, n_layers, order, injected=(), kinds=REGION_KINDS):
        self.data, self._batch, self._select, self.groups, self.kinds = data, batch, select, groups, tuple(kinds)
        self._n_layers, self._order = n_layers, order  # for ``tower`` / ``layer`` and the forward order of ``site``
        self._injected = list(injected)  # sites of vectors added between layers: plotted apart from the stream

    def to_pandas(self, groups=None):
        import numpy as np
        import pandas as pd

        b = self._batch
        groups = groups if groups is not None else self.groups
        vlab = _labels(groups, b.n_visual) if groups is not None else ["visual"] * b.n_visual
        lm = token_frame(b, self._select)
        lm["vision_row"] = -1
        lm["group"] = [vlab[v] if v >= 0 else "text" for v in lm["visual_index"]]
        parts = []
        for s, rec in self.data.items():
            info = parse_site(s, self._n_layers)
            if info.tower == "vision":
                n = len(rec["l2"])
                owner = np.full(n, -1)
                if b.n_visual:
                    from mech_vtokens.adapters.geometry import row_owner

                    owner = row_owner(n, b.tokens["vision_rows"], b.tokens["vision_weights"]).numpy()
                kinds = b.kinds
                df = pd.DataFrame({"row": -1, "image": -1, "position": -1, "visual_index": owner,
                                   "kind": [kinds[o] if o >= 0 else "unused" for o in owner],
                                   "vision_row": np.arange(n),
                                   "group": [vlab[o] if o >= 0 else "unused" for o in owner]})
                if b.n_visual:
                    df.loc[owner >= 0, "image"] = b.tokens["image"].numpy()[owner[owner >= 0]]
            else:
                df = lm.copy()
            tower, layer = info.tower, info.layer
            df.insert(0, "tower", tower)
            df.insert(1, "site", s)
            df.insert(2, "layer", layer)
            for key in ("l1", "l2", "cos_prev"):
                df[key] = rec[key].numpy()
            parts.append(df)
        df = pd.concat(parts, ignore_index=True)
        df["site"] = site_column(df["site"], self._order)
        return df

    def by_group(self, groups=None, kinds=None):
        """Means per (tower, site, layer, group) over the visual tokens of ``kinds`` (None: the probe's) and every
        text / unused vision row."""
        kinds = self.kinds if kinds is None else check_kinds(kinds, "NormResult.by_group")
        df = self.to_pandas(groups)
        df = df[(df.visual_index < 0) | df.kind.isin(kinds)]
        g = (df.groupby(["tower", "site", "layer", "group"], sort=False)[["l1", "l2", "cos_prev"]].mean()
             .reset_index())
        g.attrs["kinds"] = kinds
        return g

    def plot(self, groups=None, axes=None, kinds=None):
        """Figs. 6 / 8: mean L2 (and L1 for the vision tower) and layer-to-layer cosine per group, per tower (visual
        tokens of ``kinds``, default the probe's)."""
        from mech_vtokens.views.figure import GROUP_NAMES, color_of, figure_of, integer_layers, subplots

        g = self.by_group(groups, kinds)
        # vision rows no visual token keeps (LLaVA's CLS) are "unused" in the table: named for what they are here
        g["group"] = g["group"].replace({"unused": "vision_only"})
        names = list(dict.fromkeys(g.group))
        towers = list(dict.fromkeys(g.tower))
        if axes is None:
            _, axes = subplots(2, len(towers), figsize=(5 * len(towers), 7), squeeze=False)
        side = g.site.isin(self._injected)
        for c, t in enumerate(towers):
            sub = g[(g.tower == t) & ~side]
            for name, d in sub.groupby("group", sort=False):
                kw = dict(marker="o", color=color_of(name, names), label=GROUP_NAMES.get(name, name))
                axes[0][c].plot(d.layer, d.l2, **kw)
                axes[1][c].plot(d.layer, d.cos_prev, **kw)
            for name, d in g[(g.tower == t) & side].groupby("group", sort=False):  # e.g. DeepStack, after layer i
                axes[0][c].scatter(d.layer + 0.5, d.l2, marker="x", color=color_of(name, names),
                                   label=f"{GROUP_NAMES.get(name, name)} (injected after layer)")
            axes[0][c].set_title(f"{'LM' if t == 'lm' else 'vision tower'}: mean L2 norm", fontsize=10)
            axes[1][c].set_title(f"{'LM' if t == 'lm' else 'vision tower'}: cosine to the previous layer",
                                 fontsize=10)
            for r in (0, 1):
                axes[r][c].set_xlabel("layer (-1 = LM input)" if t == "lm" else "vision layer")
                integer_layers(axes[r][c])
                axes[r][c].legend(fontsize=7)
            axes[0][c].set_ylabel("mean L2 norm")
            axes[1][c].set_ylabel("cos(layer, previous layer)")
        return figure_of(axes)
