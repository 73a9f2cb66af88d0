"""LogitLens (the comparison lens of paper Sec. 3.2 / Fig. 3): final norm, then the unembedding, top-k.

    LogitLens(h) = TopK_i  (lm_head(final_norm(h)))_i

Same signature, sites, positions and table as :class:`~probes.embed_lens.EmbedLens`, so both lenses sit side by
side in one table (column ``lens``). Scores are fp32 logits (``logprobs=True``: log-probabilities, the log-sum-exp
taken over the cheap pass's logits, so exact for fp32 models and bf16-accurate for bf16 ones).

How the norm is applied inside the trace: the final-norm module is CALLED through its nnsight envoy
(``envoy(h)``). nnsight 0.8 runs such an ad-hoc call with the trace stood down (no hooks served, no occurrence
spent), so it does not collide with the module's real place in the forward: reading ``ln_final.hook_normalized``
in the same forward still gets the real value (tested). The module's own forward is the math, so any norm type
(RMSNorm, Gemma's 1+w, LayerNorm) is right without re-implementing it. The unembedding is NOT called as a module:
its weight (and bias, if any) are read and the same chunked top-k + exact fp32 re-ranking as EmbedLens runs, so
top-k ids equal an fp32 computation ``normed.float() @ W.float().T``. A model that caps its logits after
``lm_head`` (Gemma 4's ``final_logit_softcapping``: ``c * tanh(logits / c)``, ``Adapter.logit_softcap``) gets the
same cap here, so the lens at the last layer equals the model's own logits.
"""

from __future__ import annotations

import torch

from mech_vtokens.component import weight_of
from mech_vtokens.errors import InputError
from mech_vtokens.ops import topk_rerank

from .lens import LensResult, _Lens, _lens_rows, _store


class LogitLens(_Lens):
    """LogitLens: top-k of ``lm_head(final_norm(h))`` at each site (paper Sec. 3.2, Fig. 3 comparison).

    ``LogitLens(k=5, sites=None, positions="visual", chunk=8192, skip_special=False, candidates=None,
    logprobs=False, unused_rows=False, layers="blocks")``. Default sites as EmbedLens (``hook_embed`` + every
    ``blocks.{i}.hook_resid_post``); ``ln_final.hook_normalized`` is not accepted (the norm would be applied twice).
    ``layers="hidden_states"`` (the authors' numbering, see ``probes/lens.py``): the last block's entry is numbered
    ``n_layers`` (normed once: the model's own logits).
    Rows of the unembedding at or beyond ``len(tokenizer)`` (no token maps to them) are left out unless
    ``unused_rows=True`` (log-probabilities are normalised over the rows searched).
    """

    _allow_final = False

    def __init__(self, k: int = 5, sites=None, positions="visual", chunk: int = 8192, skip_special: bool = False,
                 candidates: int | None = None, logprobs: bool = False, unused_rows: bool = False,
                 layers: str = "blocks"):
        super().__init__(k, sites, positions, chunk, skip_special, candidates, unused_rows, layers)
        if not isinstance(logprobs, bool):
            raise InputError(f"logprobs={logprobs!r}: pass True (log-probabilities) or False (logits)")
        self.logprobs = logprobs

    def _matrix_rows(self, vlm):
        return int(vlm.unembed.weight.shape[0])

    def extras(self, vlm, batch):
        mine = self._base_extras(vlm, batch)
        mine["final_norm"] = vlm.adapter.final_norm
        mine["lm_head"] = vlm.adapter.lm_head
        mine["logprobs"] = self.logprobs
        mine["softcap"] = vlm.adapter.logit_softcap_value()  # the model's logit cap after lm_head (Gemma 4)
        return mine

    def at(self, site, value, ctx, out):
        from mech_vtokens.adapters.base import _resolve

        mine = ctx["mine"]
        with torch.no_grad():
            head = _resolve(ctx["model"], mine["lm_head"])
            weight = weight_of(head).detach()[:mine["rows"]]  # real values, also if offloaded
            bias = weight_of(head, "bias") if getattr(head, "bias", None) is not None else None
            bias = None if bias is None else bias.detach()[:mine["rows"]]
            penalty = self._penalty(ctx, mine, weight.shape[0])
            norm = _resolve(ctx["model"], mine["final_norm"])

            def lens(h):
                res = topk_rerank(norm(h), weight, mine["k"], mine["n_cand"], mine["chunk"], bias=bias,
                                  penalty=penalty, want_lse=mine["logprobs"], softcap=mine["softcap"])
                if mine["logprobs"]:
                    return res[0] - res[3][:, None], res[1], res[2]
                return res[:3]

            v, i, nf = _lens_rows(site, value.detach(), mine, ctx, lens)
        _store(out, site, v, i, mine["small_ids"], nf)


__all__ = ["LogitLens", "LensResult"]
