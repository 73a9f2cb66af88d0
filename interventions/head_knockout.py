"""HeadKnockout: zero chosen HEADS' attention weights from text ("vt") or visual ("vv") queries to visual keys, per
layer (issue 17, item 4; the per-head form of the paper's attention knockout, Sec. 7.2).

The same semantics as :class:`~mech_vtokens.interventions.AttentionKnockout` (post-softmax weights zeroed, NOT
renormalised, eager attention, prefill only, site ``blocks.{i}.attn.hook_pattern``), restricted to a head set:
``heads=[0, 3]`` at every layer of ``layers``, or ``heads={layer: [heads], ...}`` (its keys are the layers). ``rows``
(optional) limits it to some batch rows: a per-row knockout lets one forward hold the clean row and knocked-out
copies (``attribution.direct_logit_attribution`` does that, one copy per layer x head).
"""

from __future__ import annotations

import torch

from mech_vtokens.component import Intervention, rows_for
from mech_vtokens.errors import InputError
from mech_vtokens.token_sets import as_token_set, fit, resolve

from ._util import layer_list


class HeadKnockout(Intervention):
    """Zero the attention of the given heads from ``kind`` queries to the visual keys of ``tokens``."""

    def __init__(self, heads, layers=None, kind: str = "vt", tokens="all", rows=None):
        if kind not in ("vv", "vt"):
            raise InputError(f"HeadKnockout: kind must be 'vv' (visual->visual) or 'vt' (text->visual), not {kind!r}")
        if isinstance(heads, dict):
            if layers is not None:
                raise InputError("HeadKnockout: heads={layer: [heads]} names the layers; leave layers= out")
            self.by_layer = {int(k): sorted({int(h) for h in v}) for k, v in heads.items()}
        else:
            if layers is None:
                raise InputError("HeadKnockout: give layers=... with a head list (or heads={layer: [heads]})")
            hs = [heads] if isinstance(heads, int) else list(heads)
            self.by_layer = {"*": sorted({int(h) for h in hs})}
            self.layers = layers
        if any(not hs for hs in self.by_layer.values()):
            raise InputError("HeadKnockout: an empty head list would do nothing; name at least one head")
        self.kind = kind
        self.tokens = as_token_set(tokens)
        self.rows = None if rows is None else sorted({int(r) for r in ([rows] if isinstance(rows, int) else rows)})

    def _plan(self, vlm) -> dict:
        """{layer: [heads]} with layers resolved (negative from the end) and heads checked."""
        if "*" in self.by_layer:
            plan = {i: self.by_layer["*"] for i in layer_list(vlm, self.layers, "HeadKnockout")}
        else:
            plan = {layer_list(vlm, [k], "HeadKnockout")[0]: v for k, v in self.by_layer.items()}
        n = vlm.hf.config.get_text_config().num_attention_heads
        for layer, hs in plan.items():
            bad = [h for h in hs if not 0 <= h < n]
            if bad:
                raise InputError(f"HeadKnockout: head {bad[0]} at layer {layer} is out of range; this model has {n} "
                                 f"attention heads per layer (0..{n - 1})")
        return plan

    def sites(self, vlm):
        return [f"blocks.{i}.attn.hook_pattern" for i in self._plan(vlm)]

    def check(self, vlm, batch):
        self._plan(vlm)
        impl = getattr(vlm.hf.config.get_text_config(), "_attn_implementation", None)
        if impl != "eager":
            raise InputError(f"HeadKnockout zeroes attention weights after the softmax, which only eager attention "
                             f"computes; this model runs {impl!r} attention. Load it with "
                             f"mv.load(..., attn_implementation=\"eager\")")
        if self.rows is not None and not all(0 <= r < len(batch) for r in self.rows):
            raise InputError(f"HeadKnockout: rows={self.rows} name rows outside this batch (0..{len(batch) - 1})")
        resolve(self.tokens, batch, "HeadKnockout")

    def extras(self, vlm, batch):
        n = vlm.hf.config.get_text_config().num_attention_heads
        heads = {}
        for layer, hs in self._plan(vlm).items():
            m = torch.zeros(n, dtype=torch.bool)
            m[hs] = True
            heads[f"blocks.{layer}.attn.hook_pattern"] = m
        rows = torch.ones(len(batch), dtype=torch.bool)
        if self.rows is not None:
            rows[:] = False
            rows[self.rows] = True
        return {"keys": resolve(self.tokens, batch, "HeadKnockout"), "heads": heads, "rows": rows}

    def at(self, site, value, ctx, out):
        if ctx.get("decode"):
            return None
        mine = ctx["mine"]
        vis = ctx["visual_mask"]
        if vis.shape[1] != value.shape[2]:  # a decode step: the query is a new text token
            return None
        keys = fit(mine["keys"], value[:, 0, 0, :, None], ctx)  # (batch, key); value is (batch, head, q, k)
        vis = rows_for(vis, value.shape[0]).to(value.device)
        rows = rows_for(mine["rows"], value.shape[0]).to(value.device)
        queries = (vis if self.kind == "vv" else ~vis) & rows[:, None]
        heads = mine["heads"][site].to(value.device)
        cut = heads[None, :, None, None] & queries[:, None, :, None] & keys[:, None, None, :]
        return value.masked_fill(cut, 0.0)
