"""AttentionKnockout: zero visual->visual ("vv") or text->visual ("vt") attention weights at chosen decoder layers
(paper Sec. 7.2 / the notes' "attention knockout" of the authors' code).

Semantics of the authors' code, matched: the weights are zeroed AFTER the softmax and NOT renormalised — a query's
weights then sum to less than 1 and the attention output is ``sum over the other keys of w_qk v_k``. (A -inf attention
mask before the softmax would renormalise over the remaining keys: a different intervention, not offered here.)

- ``kind="vv"``: queries at visual positions, keys in the token set (default: all visual tokens; a visual token's
  weight on itself included).
- ``kind="vt"``: queries at text (non-visual) positions, keys in the token set.
- Every head of the chosen ``layers``; prefill only (in ``generate`` the decode steps attend normally; with a KV cache a
  decode step's query is one new text token).

It edits the post-softmax weights inside eager attention (site ``blocks.{i}.attn.hook_pattern``, nnsight ``.source``
into ``eager_attention_forward``), so the model must be loaded with ``mech_vtokens.load(..., attn_implementation=
"eager")`` and it runs in an nnsight trace (``mv.run`` / an ``Experiment``), not through the plain-hook ``applied``
harness (plain torch hooks cannot reach a tensor inside a function).
"""

from __future__ import annotations

from mech_vtokens.component import Intervention, rows_for
from mech_vtokens.errors import InputError

from ._util import layer_list
from mech_vtokens.token_sets import as_token_set, fit, resolve


class AttentionKnockout(Intervention):

    def __init__(self, kind: str = "vv", layers=0, tokens="all"):
        if kind not in ("vv", "vt"):
            raise InputError(f"AttentionKnockout: kind must be 'vv' (visual->visual) or 'vt' (text->visual), not "
                             f"{kind!r}")
        self.kind = kind
        self.layers = layers
        self.tokens = as_token_set(tokens)

    def sites(self, vlm):
        return [f"blocks.{i}.attn.hook_pattern" for i in layer_list(vlm, self.layers, "AttentionKnockout")]

    def check(self, vlm, batch):
        layer_list(vlm, self.layers, "AttentionKnockout")
        impl = getattr(vlm.hf.config.get_text_config(), "_attn_implementation", None)
        if impl != "eager":
            raise InputError(f"AttentionKnockout zeroes the attention weights after the softmax, which only eager "
                             f"attention computes; this model runs {impl!r} attention. Load it with "
                             f"mv.load(..., attn_implementation=\"eager\")")
        resolve(self.tokens, batch, "AttentionKnockout")

    def extras(self, vlm, batch):
        return {"keys": resolve(self.tokens, batch, "AttentionKnockout")}

    def at(self, site, value, ctx, out):
        if ctx.get("decode"):
            return None
        keys = fit(ctx["mine"]["keys"], value[:, 0, 0, :, None], ctx)  # (batch, key); value is (batch, head, q, k)
        vis = ctx["visual_mask"]
        if vis.shape[1] != value.shape[2]:  # a decode step: the query is a new text token
            return None
        vis = rows_for(vis, value.shape[0]).to(value.device)
        queries = vis if self.kind == "vv" else ~vis
        cut = queries[:, None, :, None] & keys[:, None, None, :]
        return value.masked_fill(cut, 0.0)
