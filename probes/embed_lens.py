"""EmbedLens (paper Sec. 3.1, eq. 1): which INPUT-embedding rows a hidden state is closest to, by cosine.

    EmbedLens(h) = TopK_i  h·e_i / (||h|| ||e_i||)      (W_E = the LM's input embedding matrix, no norm applied to h)

At each read site the selected rows of the hidden state are compared with every row of the input embedding matrix
by ``mech_vtokens.ops.topk_rerank`` (chunked over the vocabulary, top-k ids equal to an fp32 computation: see its
module docstring). Only ids + scores leave the trace. Scores are fp32 cosines: the raw matrix times precomputed
inverse row norms (computed once per model outside the trace, shipped in as a (V,) fp32 extra), divided by ||h||.

Sites, positions, the rows searched and the table: ``probes/lens.py`` (shared with LogitLens).
"""

from __future__ import annotations

import torch

from mech_vtokens.component import weight_of
from mech_vtokens.ops import topk_rerank

from .lens import LensResult, _inverse_row_norms, _Lens, _lens_rows, _module_path, _store

class EmbedLens(_Lens):
    """EmbedLens (paper Sec. 3.1, eq. 1): top-k cosine neighbours of hidden states among the INPUT embeddings.

    ``EmbedLens(k=5, sites=None, positions="visual", chunk=8192, skip_special=False, candidates=None,
    unused_rows=False)``; see ``probes/lens.py`` for sites, positions, the rows searched (``unused_rows``: also the
    rows at or beyond ``len(tokenizer)``) and the table's columns, ``mech_vtokens.ops`` for exactness (ids equal an
    fp32 computation).
    """

    def _matrix_rows(self, vlm):
        return int(vlm.embedding_matrix.shape[0])

    def extras(self, vlm, batch):
        mine = self._base_extras(vlm, batch)
        mine["embed"] = _module_path(vlm.hf, vlm.hf.get_input_embeddings())
        mine["inv_norm"] = _inverse_row_norms(vlm.embedding_matrix)[:mine["rows"]]
        return mine

    def at(self, site, value, ctx, out):
        from mech_vtokens.adapters.base import _resolve

        mine = ctx["mine"]
        with torch.no_grad():
            # real values, also if offloaded; rows no token maps to left out unless unused_rows=True
            weight = weight_of(_resolve(ctx["model"], mine["embed"])).detach()[:mine["rows"]]
            penalty = self._penalty(ctx, mine, weight.shape[0])
            v, i, nf = _lens_rows(site, value.detach(), mine, ctx, lambda h: topk_rerank(
                h, weight, mine["k"], mine["n_cand"], mine["chunk"], row_scale=mine["inv_norm"], penalty=penalty,
                normalize=True))
        _store(out, site, v, i, mine["small_ids"], nf)


__all__ = ["EmbedLens", "LensResult"]
