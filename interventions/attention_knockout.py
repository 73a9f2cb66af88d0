"""AttentionKnockout: zero visual->visual ("vv") or text->visual ("vt") attention weights at chosen decoder layers
(paper Sec. 7.2 / the notes' "attention knockout" of the authors' code).

Semantics of the authors' code, matched: the weights are zeroed AFTER the softmax and NOT renormalised — a query's
weights then sum to less than 1 and the attention output is ``sum over the other keys of w_qk v_k``. (A -inf attention
mask before the softmax would renormalise over the remaining keys: a different intervention, not offered here.)

- ``kind="vv"``: queries at visual positions, keys in the token set (default: all visual tokens; a visual token's
  weight on itself included).
- ``kind="vt"``: queries at text (non-visual) positions, keys in the token set.
- Every head of the chosen ``layers``; prefill only by default (in ``generate`` the decode steps attend normally; with
  a KV cache a decode step's query is one new text token) — what the paper's code in effect does.
- ``every_step=True`` (``kind="vt"`` only): the decode steps' queries are blocked from the same keys too, so no
  generated token reads the knocked-out visual tokens (with a KV cache: the new token's query against the cached
  keys; without one: every text query of the recomputed sequence). Generated tokens are text, so for ``"vv"`` it would
  change nothing and is refused.

It edits the post-softmax weights inside eager attention (site ``blocks.{i}.attn.hook_pattern``, nnsight ``.source``
into ``eager_attention_forward``), so the model must be loaded with ``mech_vtokens.load(..., attn_implementation=
"eager")`` and it runs in an nnsight trace (``mv.run`` / an ``Experiment``), not through the plain-hook ``applied``
harness (plain torch hooks cannot reach a tensor inside a function).
"""

from __future__ import annotations

from mech_vtokens.component import Intervention, rows_for
from mech_vtokens.errors import InputError, check_flag

from ._util import layer_list
from mech_vtokens.token_sets import as_token_set, fit, resolve


class AttentionKnockout(Intervention):

    def __init__(self, kind: str = "vv", layers=0, tokens="all", every_step: bool = False):
        if kind not in ("vv", "vt"):
            raise InputError(f"AttentionKnockout: kind must be 'vv' (visual->visual) or 'vt' (text->visual), not "
                             f"{kind!r}")
        check_flag(every_step, "AttentionKnockout: every_step")
        if every_step and kind == "vv":
            raise InputError("AttentionKnockout('vv', every_step=True): generated tokens are text, so no decode step "
                             "has a visual query to block; use kind='vt' to keep generated tokens from the visual "
                             "keys, or every_step=False")
        self.kind = kind
        self.layers = layers
        self.tokens = as_token_set(tokens)
        self.every_step = every_step

    def sites(self, vlm):
        return [f"blocks.{i}.attn.hook_pattern" for i in layer_list(vlm, self.layers, "AttentionKnockout")]

    def decode_sites(self, vlm):  # every_step: the same sites on each generation step
        return self.sites(vlm) if self.every_step else []

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
        step = bool(ctx.get("decode")) or ctx["visual_mask"].shape[1] != value.shape[2]  # a generation step
        if step and not self.every_step:
            return None
        keys = fit(ctx["mine"]["keys"], value[:, 0, 0, :, None], ctx)  # (batch, key); value is (batch, head, q, k)
        if step:  # queries: the step's text tokens (visual ones only where the sequence is recomputed, no cache)
            vis = fit(ctx["visual_mask"], value[:, 0, :, 0, None], ctx)
        else:
            vis = rows_for(ctx["visual_mask"], value.shape[0]).to(value.device)
        queries = vis if self.kind == "vv" else ~vis
        cut = queries[:, None, :, None] & keys[:, None, None, :]
        return value.masked_fill(cut, 0.0)
