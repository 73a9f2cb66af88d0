"""BOS sink-channel ratio φ(x) and BOS alignment (paper Sec. 4.2 and Fig. 4, "Layer 2 as sinks aligner").

    φ(x) = max_{d ∈ D_sink} |x[d]| / RMS(x),   RMS(x) = sqrt(mean_d x[d]^2);   a token is an LLM sink if φ(x) > τ (20)

per token (every attended position by default) at every read site. Sites: ``hook_embed`` and, per decoder layer,
``hook_resid_mid`` (after attention, "MHA-ℓ") and ``hook_resid_post`` (after the MLP, "MLP-ℓ"): the sublayers of
Fig. 4. ``layer`` in the table: -1 for ``hook_embed``, ``i`` for ``blocks.{i}.*``.

Sink dims ``dims``: a list of channel indices, a preset or ``"auto"`` (default). Presets are declared per family on
the adapter (``Adapter.sink_dims``, keyed by checkpoint; LLaVA: ``"llava-hf/llava-1.5-7b-hf"`` = ``"llama2-7b"`` =
{1415, 2533}, ``"llava-hf/llava-1.5-13b-hf"`` = ``"llama2-13b"`` = {2100, 4743}); a preset the model's family does
not declare is refused before the forward. ``"auto"``: discovered from the BOS token's massive activations.
Rule: D_sink = every
channel d with |x_bos[d]| / RMS(x_bos) >= ``discover_ratio`` (default: ``threshold``) at ANY read site, where x_bos is
the state at the first attended TEXT position of each prompt row (the BOS token when the tokenizer adds one; otherwise
the first text token, which plays the sink role; never a visual token, also when the prompt starts with the image).

Reachable thresholds: φ(x) <= sqrt(d_model) (64 for LLaMA-7B; 13.9 for the 192-wide default organism), so the
paper's τ = 20 can never be met on a model narrower than d = 400: ``check`` then warns before the forward
(:class:`~mech_vtokens.errors.ThresholdWarning`, naming sqrt(d)) and points to the data-calibrated threshold
``mech_vtokens.partition.sink_thresholds(vlm, images)["phi"]``; ``result.reachable`` says it in the result.

Exactness with ``"auto"`` (the dims are only known after the forward): each token keeps its top-m channels by
|x|/RMS with m = floor(d_model / τ^2) + 1. Since Σ_d (x[d]/RMS)^2 = d_model, fewer than m channels can reach τ, so
every channel at or above τ is among the kept ones: the ``sink`` flag is exact, and φ is exact whenever a sink
channel is among the token's top-m (always for flagged tokens); otherwise φ < τ and the table shows NaN.
With given dims φ is computed exactly in the trace.

Also (Fig. 4): ``bos_cos``, the cosine of every token with its row's BOS state at each site, and
``rank_tracking()``: the ``top`` (5) visual tokens most similar to BOS at ``reference_site`` (default
``blocks.1.hook_resid_post``, i.e. after MLP-2) and their rank (1 = most BOS-similar visual token of the row) at
every site.

Kinds: the table has a ``kind`` column (``batch.kinds``; "text" at text positions). ``rank_tracking`` ranks, and
``plot`` averages, the visual tokens of ``kinds`` only, by default ``results.REGION_KINDS`` ("patch",
"thumbnail": LLaVA-NeXT / OneVision's learned newline tokens, which show no image region, are left out).
"""

from __future__ import annotations

import math

import torch

from mech_vtokens.component import Probe, select_rows
from mech_vtokens.errors import InputError
from mech_vtokens.results import REGION_KINDS, Result, check_kinds, token_frame
from mech_vtokens.site_names import site_column, site_layer



def _presets():
    """Every sink-dims preset name any family declares (``Adapter.sink_dims``)."""
    from mech_vtokens.adapters import ADAPTERS

    return list(dict.fromkeys(name for a in ADAPTERS for name in a.sink_dims))


def _sublayer_sites(n_layers):
    out = ["hook_embed"]
    for i in range(n_layers):
        out += [f"blocks.{i}.hook_resid_mid", f"blocks.{i}.hook_resid_post"]
    return out


def _text_mask(batch):
    att = batch.inputs.get("attention_mask")
    att = torch.ones_like(batch.visual_mask) if att is None else att.bool()
    return att & ~batch.visual_mask


def _bos_positions(batch):
    """(rows,) the BOS-role position of each row: its first attended TEXT token (the BOS token when the tokenizer
    adds one; never a visual token, also when a prompt starts with the image and the tokenizer adds no BOS)."""
    return _text_mask(batch).int().argmax(dim=1)


class SinkChannels(Probe):
    """φ(x) sink-channel ratio per token per site, sink-dim discovery from BOS, BOS cosine and rank tracking
    (paper Sec. 4.2, Fig. 4). See the module docstring for the rules."""

    def __init__(self, dims="auto", threshold: float = 20.0, sites=None, discover_ratio: float | None = None,
                 reference_site: str | None = None, top: int = 5):
        if isinstance(dims, str):
            if dims != "auto" and dims not in _presets():
                raise InputError(f"dims={dims!r}: give 'auto', a preset ({', '.join(_presets())}) or a list of "
                                 f"channels")
        else:
            dims = [int(d) for d in dims]
            if not dims:
                raise InputError("dims=[] : give at least one sink channel, a preset, or 'auto'")
        from mech_vtokens.errors import check_number

        for name, x in (("threshold", threshold), ("discover_ratio", discover_ratio)):
            if x is None and name == "discover_ratio":
                continue
            try:
                check_number(x, name, positive=True)
            except InputError:
                raise InputError(f"{name}={x!r}: give a positive ratio (the paper uses 20)"
                                 + (" or None (= threshold)" if name == "discover_ratio" else "")) from None
        if discover_ratio is not None and not discover_ratio > 0:
            raise InputError(f"discover_ratio={discover_ratio!r}: give a positive ratio or None (= threshold)")
        if not isinstance(top, int) or isinstance(top, bool) or top <= 0:
            raise InputError(f"top={top!r}: give a positive number of BOS-similar tokens to track (paper: 5)")
        if isinstance(sites, str):
            sites = [sites]
        self.dims, self.threshold, self.site_names = dims, float(threshold), sites
        self.discover_ratio, self.reference_site, self.top = discover_ratio, reference_site, top

    def _dims(self, vlm):
        if self.dims == "auto" or not isinstance(self.dims, str):
            return self.dims
        table = vlm.adapter.sink_dims
        if self.dims not in table:
            raise InputError(f"sink-dims preset {self.dims!r} is not declared for this {vlm.family} model "
                             f"(its presets: "
                             f"{', '.join(table) or 'none'}); pass this model's channels as a list or dims='auto'")
        return list(table[self.dims])

    def sites(self, vlm):
        names = self.site_names or _sublayer_sites(vlm.n_layers)
        out = []
        for s in names:
            c = vlm.adapter.canonical(s)
            if not (c == "hook_embed" or c.startswith("blocks.")):
                raise InputError(f"SinkChannels reads the residual stream: 'hook_embed' or 'blocks.{{i}}.<hook>', "
                                 f"not {s!r}")
            out.append(c)
        return out

    def _reference(self, vlm):
        ref = self.reference_site or ("blocks.1.hook_resid_post" if vlm.n_layers > 1 else self.sites(vlm)[-1])
        return vlm.adapter.canonical(ref)

    def check(self, vlm, batch):
        sites = self.sites(vlm)
        no_text = (~_text_mask(batch).any(dim=1)).nonzero()[:, 0].tolist()
        if no_text:
            raise InputError(f"SinkChannels compares every token with its row's BOS-role token (the first text token), "
                             f"but prompt(s) {no_text} hold no text token: add the question text (vlm.prompt(...))")
        d = vlm.adapter.d_model
        dims = self._dims(vlm)
        if dims != "auto":
            bad = [x for x in dims if not 0 <= x < d]
            if bad:
                raise InputError(f"sink dims {bad} are outside the hidden size {d} of this model "
                                 f"(channels 0..{d - 1});"
                                 f" a preset holds its checkpoint's channels: "
                                 f"pass this model's channels or dims='auto'")
        from mech_vtokens.partition.calibrate import warn_unreachable_phi

        warn_unreachable_phi(vlm, self.threshold, "SinkChannels")
        if self.discover_ratio is not None and self.dims == "auto":
            warn_unreachable_phi(vlm, self.discover_ratio, "SinkChannels(discover_ratio=...)")
        ref = self._reference(vlm)
        if ref not in sites:
            raise InputError(f"reference_site {ref!r} is not among the read sites; add it to sites or choose one of "
                             f"them")

    def extras(self, vlm, batch):
        att = batch.inputs.get("attention_mask")
        att = torch.ones_like(batch.visual_mask) if att is None else att.bool()
        dims = self._dims(vlm)
        thr = min(self.threshold, self.discover_ratio or self.threshold)
        d = vlm.adapter.d_model
        return {"select": att, "bos": _bos_positions(batch),
                "dims": None if dims == "auto" else torch.tensor(dims, dtype=torch.long),
                "m": min(d, int(math.floor(d / thr ** 2)) + 1)}

    def at(self, site, value, ctx, out):
        mine = ctx["mine"]
        with torch.no_grad():
            x = value.detach().float()
            sel = mine["select"]
            bos_mask = torch.zeros_like(sel)
            bos_mask[torch.arange(sel.shape[0], device=sel.device), mine["bos"]] = True
            bos = select_rows(x, bos_mask, ctx)[0]  # (rows, d): the first attended token is text, never removed
            xs = select_rows(x, sel, ctx)[0]  # (n, d); NaN rows for tokens removed before this site
            rms = xs.pow(2).mean(-1).sqrt().clamp_min(1e-30)
            row_of = sel.nonzero()[:, 0]
            cos = torch.nn.functional.cosine_similarity(xs, bos[row_of], dim=-1)
            rec = {"bos_cos": cos}
            if mine["dims"] is not None:
                rec["phi"] = xs[:, mine["dims"]].abs().amax(-1) / rms
            else:
                ratio = xs.abs() / rms[:, None]
                v, i = ratio.topk(mine["m"], dim=-1)
                rec["top_ratio"], rec["top_dim"] = v, i.to(torch.int32)
                brms = bos.pow(2).mean(-1).sqrt().clamp_min(1e-30)
                rec["bos_ratio"] = bos.abs() / brms[:, None]
            out[site] = rec

    def collect(self, raw, batch, vlm):
        sites = self.sites(vlm)
        dims = self._dims(vlm)
        disc = self.discover_ratio or self.threshold
        if dims == "auto":
            found = set()
            for s in sites:
                found |= set((raw[s]["bos_ratio"] >= disc).any(0).nonzero()[:, 0].tolist())
            dims = sorted(found)
        phi = {}
        for s in sites:
            r = raw[s]
            if "phi" in r:
                phi[s] = r["phi"]
            else:
                v, i = r["top_ratio"], r["top_dim"].long()
                if dims:
                    member = torch.isin(i, torch.tensor(dims, device=i.device))
                    has = member.any(-1)
                    first = member.float().argmax(-1)  # top-m is sorted: the first member is the max over D
                    phi[s] = torch.where(has, v.gather(1, first[:, None])[:, 0], torch.full_like(v[:, 0], float("nan")))
                else:
                    phi[s] = torch.full_like(v[:, 0], float("nan"))
        ex = self.extras(vlm, batch)
        res = SinkChannelsResult(sites, phi, {s: raw[s]["bos_cos"] for s in sites}, dims, self.threshold,
                                 token_frame(batch, ex["select"]), self._reference(vlm), self.top, vlm.n_layers,
                                 vlm.adapter.forward_order)
        res.phi_bound = math.sqrt(vlm.adapter.d_model)
        res.reachable = self.threshold < res.phi_bound  # False: no token can be a sink whatever the input
        return res


class SinkChannelsResult(Result):
    """``to_pandas()``: row, image, site, layer, position, visual_index, kind, phi, sink, bos_cos. ``sink_dims``: the
    channels used (given or discovered). ``rank_tracking()``: Fig. 4 (right). ``phi_bound``: sqrt(d_model), the
    largest φ possible; ``reachable``: threshold < phi_bound (False: 0 sinks whatever the input)."""

    phi_bound, reachable = float("inf"), True

    name = "sink_channels"

    def __init__(self, sites, phi, bos_cos, dims, threshold, frame, reference, top, n_layers, order):
        self.sites, self.phi, self.bos_cos = sites, phi, bos_cos
        self.sink_dims, self.threshold, self._frame = list(dims), threshold, frame
        self.reference_site, self.top = reference, top
        self._n_layers, self._order = n_layers, order  # for ``layer`` and the forward order of ``site``

    def to_pandas(self):
        import pandas as pd

        parts = []
        for s in self.sites:
            df = self._frame.copy()
            df.insert(2, "site", s)
            df.insert(3, "layer", site_layer(s, self._n_layers))
            p = self.phi[s].numpy()
            df["phi"] = p
            df["sink"] = p > self.threshold  # NaN (auto mode, no sink channel in the top-m) -> False, exactly
            df["bos_cos"] = self.bos_cos[s].numpy()
            parts.append(df)
        df = pd.concat(parts, ignore_index=True)
        df["site"] = site_column(df["site"], self._order)
        return df

    def sinks(self, site):
        """(n_tokens,) bool: φ > threshold at ``site`` (rows in the table's token order)."""
        return torch.nan_to_num(self.phi[site], nan=0.0) > self.threshold

    def rank_tracking(self, reference_site: str | None = None, top: int | None = None, kinds=REGION_KINDS):
        """Per row: the ``top`` visual tokens (of ``kinds``) most BOS-similar at the reference site, and their rank
        among the row's visual tokens of ``kinds`` (1 = most similar) at every site. Columns: row, tracked
        (0..top-1), visual_index, site, layer, rank, bos_cos; ``attrs["kinds"]``."""
        import pandas as pd

        kinds = check_kinds(kinds, "SinkChannelsResult.rank_tracking")
        ref = reference_site or self.reference_site
        top = top or self.top
        f = self._frame
        out = []
        for row in sorted(f.row.unique()):
            keep = ((f.row == row) & (f.visual_index >= 0) & f.kind.isin(kinds)).to_numpy()
            if not keep.any():
                continue
            idx = torch.as_tensor(keep.nonzero()[0])
            vis = f.visual_index.to_numpy()[keep]
            chosen = self.bos_cos[ref][idx].argsort(descending=True)[:top]
            for s in self.sites:
                c = self.bos_cos[s][idx]
                rank = torch.empty_like(c, dtype=torch.long)
                rank[c.argsort(descending=True)] = torch.arange(1, len(c) + 1)
                for t, j in enumerate(chosen.tolist()):
                    out.append({"row": int(row), "tracked": t, "visual_index": int(vis[j]), "site": s,
                                "layer": site_layer(s, self._n_layers), "rank": int(rank[j]),
                                "bos_cos": float(c[j])})
        out = pd.DataFrame(out)
        if len(out):
            out["site"] = site_column(out["site"], self._order)
        out.attrs["kinds"] = kinds
        return out

    def plot(self, axes=None, kinds=REGION_KINDS):
        """Fig. 4: mean BOS cosine per sublayer (visual tokens of ``kinds``, flagged sinks among them, text) and the
        rank tracking."""
        from mech_vtokens.views.figure import BACKGROUND, CYCLE, GROUP_COLORS, figure_of, subplots

        kinds = check_kinds(kinds, "SinkChannelsResult.plot")
        df = self.to_pandas()
        if axes is None:
            _, axes = subplots(1, 2, figsize=(12, 4.5))
        x = range(len(self.sites))
        vis = (df.visual_index >= 0) & df.kind.isin(kinds)
        groups = {"visual tokens": (vis, GROUP_COLORS["visual"]),
                  "text tokens": (df.visual_index < 0, GROUP_COLORS["text"]),
                  "sink tokens (φ>τ at any site)": (vis & df.set_index(["row", "position"]).index.isin(
                      df[df.sink & vis].set_index(["row", "position"]).index), GROUP_COLORS["llm_sink"])}
        for name, (m, col) in groups.items():
            if m.any():
                means = df[m].groupby("site", sort=False, observed=True).bos_cos.mean().reindex(self.sites)
                axes[0].plot(x, means.to_numpy(), marker="o", color=col, label=name)
        axes[0].set_xticks(list(x), self.sites, rotation=90, fontsize=6)
        axes[0].set_ylabel("mean cos(token, BOS)")
        axes[0].set_title("cosine to the BOS state per sublayer", fontsize=10)
        axes[0].legend(fontsize=7)
        # rank tracking: the 3 tokens that stay most BOS-like (lowest mean rank) in colour, the rest grey
        rt = self.rank_tracking(kinds=kinds)
        ref = self.reference_site
        start = {key: float(g["rank"].mean()) for key, g in rt.groupby(["row", "tracked"])}
        vis = {key: int(g.visual_index.iloc[0]) for key, g in rt.groupby(["row", "tracked"])}
        order = sorted(start, key=lambda key: start[key])
        top = order[:3]
        for key, g in rt.groupby(["row", "tracked"]):
            if key not in top:
                axes[1].plot(range(len(g)), g["rank"].to_numpy(), color=BACKGROUND, lw=0.8, zorder=1)
        for n, key in enumerate(top):
            g = rt[(rt.row == key[0]) & (rt.tracked == key[1])]
            axes[1].plot(range(len(g)), g["rank"].to_numpy(), marker=".", color=CYCLE[n], lw=2, zorder=3,
                         label=f"row {key[0]}, visual token {vis[key]} (mean rank {start[key]:.1f})")
        if len(order) > len(top):
            axes[1].plot([], [], color=BACKGROUND, label=f"{len(order) - len(top)} other tracked tokens")
        axes[1].set_xticks(list(x), self.sites, rotation=90, fontsize=6)
        axes[1].set_ylabel("rank by BOS cosine (1 = most BOS-like)")
        axes[1].set_title(f"rank tracking of the {self.top} most BOS-like tokens at {ref}, per row", fontsize=10)
        axes[1].invert_yaxis()
        axes[1].legend(fontsize=7)
        return figure_of(axes)
