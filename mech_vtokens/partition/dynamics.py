"""Group dynamics of the partition (paper Sec. 5.2, Figs. 5 and 6 bottom; Sec. 6.2 norms):

- consistency (Fig. 5 left): per visual token and layer, the cosine of its residual state
  (``blocks.{i}.hook_resid_post``) with its LM input (``hook_embed``) and with the previous layer; averaged per group.
  Dead tokens stay ~1 (they do not drift), alive tokens move.
- attention (Fig. 5 right): per layer, text→visual attention. Queries: the attended TEXT positions after the first
  visual token of their row (they can see the image); the weights are read from each attention module's output
  (needs ``attn_implementation="eager"``: other kernels return no weights). ``share`` = per query, the attention
  mass (averaged over heads) on the group's tokens, averaged over queries; ``per_token`` = share / tokens in the
  group (the inset's token-averaged attention).
- entropy (Fig. 6 bottom): entropy (nats) of the logit-lens distribution softmax(lm_head(final_norm(h))) of each
  visual token at the last layer, averaged per group.
- norms per group: the L2 norm at every layer (the ``NormTracker`` with groups gives the same per token:
  ``NormTracker(groups=result.labels)``).

``GroupDynamics(partition)`` classifies the batch in the same forward (its ``at`` delegates to the partition's).
"""

from __future__ import annotations

import torch

from ..component import Probe
from ..errors import InputError
from ..results import Result
from .partition import GROUPS


class GroupDynamics(Probe):
    """Per-group consistency, text→visual attention, last-layer lens entropy and norms (Secs. 5.2, 6.2)."""

    def __init__(self, partition, attention: bool = True, entropy: bool = True):
        self.partition, self.attention, self.entropy = partition, bool(attention), bool(entropy)

    def sites(self, vlm):
        out = ["hook_embed"] + [f"blocks.{i}.hook_resid_post" for i in range(vlm.n_layers)]
        if self.attention:
            out += [f"blocks.{i}.hook_attn_out" for i in range(vlm.n_layers)]
        if self.entropy:
            out.append("ln_final.hook_normalized")
        return list(dict.fromkeys(out + self.partition.sites(vlm)))

    def check(self, vlm, batch):
        self.partition.check(vlm, batch)
        if self.attention:
            impl = getattr(vlm.hf.config.get_text_config(), "_attn_implementation", None)
            if impl != "eager":
                raise InputError(f"GroupDynamics(attention=True) reads attention weights, but the model runs "
                                 f"{impl!r} attention (no weights returned); load it with "
                                 f"mech_vtokens.load(..., attn_implementation='eager') or pass attention=False")

    def extras(self, vlm, batch):
        vm = batch.visual_mask
        att = batch.inputs.get("attention_mask")
        att = torch.ones_like(vm) if att is None else att.bool()
        first = torch.where(vm.any(1), vm.int().argmax(1), torch.full((vm.shape[0],), vm.shape[1]))
        after = torch.arange(vm.shape[1])[None, :] > first[:, None]
        mine = {"visual": vm, "queries": att & ~vm & after, "part": self.partition.extras(vlm, batch),
                "part_sites": self.partition.sites(vlm), "last": f"blocks.{vlm.n_layers - 1}.hook_resid_post"}
        if self.attention:
            mine["attn_paths"] = {f"blocks.{i}.hook_attn_out": vlm.adapter.site(f"blocks.{i}.hook_attn_out")[1]
                                  for i in range(vlm.n_layers)}
        if self.entropy:
            mine["lm_head"] = vlm.adapter.lm_head
        return mine

    def at(self, site, value, ctx, out):
        mine = ctx["mine"]
        if site in mine["part_sites"]:
            self.partition.at(site, value, dict(ctx, mine=mine["part"]), out.setdefault("part", {}))
        with torch.no_grad():
            if site == "hook_embed" or (site.startswith("blocks.") and site.endswith("hook_resid_post")):
                h = value.detach()[mine["visual"]].float()
                rec = {"l2": h.norm(dim=-1)}
                if site != "hook_embed":
                    rec["cos_input"] = torch.nn.functional.cosine_similarity(h, out["_embed"], dim=-1)
                    rec["cos_prev"] = torch.nn.functional.cosine_similarity(h, out["_prev"], dim=-1)
                else:
                    out["_embed"] = h
                out["_prev"] = h
                out[site] = rec
                if site == mine["last"]:
                    out.pop("_prev", None)
                    out.pop("_embed", None)
            elif site.endswith("hook_attn_out") and "attn_paths" in mine:
                from mech_vtokens.adapters.base import _resolve

                w = _resolve(ctx["model"], mine["attn_paths"][site]).output[1]
                if w is None:
                    raise ValueError("no attention weights at the attention module: load the model with "
                                     "attn_implementation='eager'")
                a = w.detach().float().mean(1)  # (b, q, k) averaged over heads
                q = mine["queries"].to(a.device)
                n_q = q.sum(1).clamp_min(1)
                recv = (a * q[:, :, None]).sum(1) / n_q[:, None]  # (b, k): mean attention each key gets
                out[site] = {"received": recv[mine["visual"]], "rows_with_queries": (q.sum(1) > 0)}
            elif site == "ln_final.hook_normalized":
                from mech_vtokens.adapters.base import _resolve

                head = _resolve(ctx["model"], mine["lm_head"])
                logits = head(value.detach()[mine["visual"]]).float()
                logp = torch.log_softmax(logits, dim=-1)
                out["entropy"] = -(logp.exp() * logp).sum(-1)

    def collect(self, raw, batch, vlm):
        part = self.partition.collect(raw.get("part", {}), batch, vlm)
        return GroupDynamicsResult(raw, part, batch, vlm.n_layers, self.attention)


class GroupDynamicsResult(Result):
    """``to_pandas()``: per (layer, group): tokens, cos_input, cos_prev, l2, attention share and per-token attention;
    ``entropy()``: mean last-layer lens entropy per group. ``partition``: the PartitionResult of the batch."""

    name = "group_dynamics"

    def __init__(self, raw, partition, batch, n_layers, attention):
        self.raw, self.partition, self._batch = raw, partition, batch
        self.n_layers, self.attention = n_layers, attention

    def to_pandas(self):
        import pandas as pd

        codes = self.partition.codes
        row_of = self._batch.visual_positions[:, 0]
        rows = []
        for layer in range(-1, self.n_layers):
            site = "hook_embed" if layer < 0 else f"blocks.{layer}.hook_resid_post"
            rec = self.raw[site]
            att = self.raw.get(f"blocks.{layer}.hook_attn_out") if layer >= 0 else None
            for gi, g in enumerate(GROUPS):
                m = codes == gi
                if not bool(m.any()):
                    continue
                r = {"layer": layer, "group": g, "tokens": int(m.sum()), "l2": float(rec["l2"][m].mean())}
                r["cos_input"] = float(rec["cos_input"][m].mean()) if "cos_input" in rec else 1.0
                r["cos_prev"] = float(rec["cos_prev"][m].mean()) if "cos_prev" in rec else float("nan")
                if att is not None:
                    valid = att["rows_with_queries"]
                    shares, per = [], []
                    for b in valid.nonzero()[:, 0].tolist():
                        mb = m & (row_of == b)
                        s = float(att["received"][mb].sum())
                        shares.append(s)
                        per.append(s / max(1, int(mb.sum())) if bool(mb.any()) else float("nan"))
                    r["attention_share"] = sum(shares) / max(1, len(shares))
                    per = [p for p in per if p == p]
                    r["attention_per_token"] = sum(per) / len(per) if per else float("nan")
                rows.append(r)
        return pd.DataFrame(rows)

    def entropy(self) -> dict:
        e = self.raw.get("entropy")
        if e is None:
            return {}
        return {g: float(e[self.partition.codes == i].mean()) for i, g in enumerate(GROUPS)
                if bool((self.partition.codes == i).any())}

    def plot(self, axes=None):
        """Fig. 5: consistency (cos to the LM input) and text→visual attention share per group and layer."""
        from ..views.figure import color_of, figure_of, integer_layers, subplots

        df = self.to_pandas()
        if axes is None:
            _, axes = subplots(1, 2, figsize=(10, 4))
        names = list(dict.fromkeys(df.group))
        for g, d in df.groupby("group", sort=False):
            axes[0].plot(d.layer, d.cos_input, marker="o", color=color_of(g, names), label=g)
            if "attention_share" in d:
                axes[1].plot(d.layer, d.attention_share, marker="o", color=color_of(g, names), label=g)
        axes[0].set_title("cosine to the LM input, per group", fontsize=10)
        axes[1].set_title("text→visual attention share, per group", fontsize=10)
        axes[0].set_ylabel("cos(token, its LM input)")
        axes[1].set_ylabel("share of text→visual attention")
        for ax in axes:
            ax.set_xlabel("layer")
            integer_layers(ax)
            ax.legend(fontsize=7)
        return figure_of(axes)
