"""Math any probe may use, written to run INSIDE an nnsight trace: torch only, every tensor on the device of the
value it works on, no state kept (shipped by value for remote runs via ``nnsight.register("mech_vtokens")``).

``topk_rerank``: the chunked exact top-k over a vocabulary-sized matrix (EmbedLens, LogitLens, Partition, clustering).

Exactness (the contract the tests and the bench check): the chunked pass runs in the model's dtype (bf16 on big
models) with a running top-k over vocabulary chunks (memory O(tokens x chunk)) and keeps ``n_cand`` candidates per
token (the lenses use ``max(2k, k + 3)``); those are re-scored exactly in fp32 (a gather of their rows, never an fp32
copy of the matrix) and re-ranked. A token whose fp32 k-th score is not safely above the best score the cheap pass
could have missed (the last candidate's score plus a 2^-7 relative rounding bound) gets a second look (the returned
``n_fallback`` counts them): one cheap pass over the whole vocabulary, then exact fp32 scores for every id within the
rounding bound of its k-th score. So the top-k ids equal an fp32 computation. The pass multiplies by the raw matrix
and scales by ``row_scale`` (e.g. precomputed inverse row norms for cosines). For fp32 inputs the cheap pass is
already fp32 and is the answer. Ordering within the top-k always comes from fp32 scores: the k ids are rescored in
fp32 when the bf16 gap between ranks k and k+1 exceeds the rounding bound, all candidates otherwise.
"""

from __future__ import annotations

import torch


# C901: the cheap chunked pass and the exact fp32 rerank share their state; kept in one place for the numerics
def topk_rerank(h, weight, k, n_cand, chunk, row_scale=None, penalty=None, bias=None, normalize=False,  # noqa: C901
                 want_lse=False, softcap=None):
    """Top-k over ``(h @ weight.T + bias) * row_scale + penalty`` with ids equal to an fp32 computation.

    h: (n, d); weight: (V, d) in the model dtype; row_scale: (V,) fp32 or None; penalty: (V,) fp32 with 0 / -inf or
    None. Returns fp32 scores (n, k) (divided by ||h|| when ``normalize``) and int64 ids (n, k); with ``want_lse``
    also the (n,) fp32 log-sum-exp of the cheap pass's scores (exact for fp32 models). ``softcap``: a float ``c``
    (a model's logit cap, ``Adapter.logit_softcap``): the scores are ``c * tanh((h @ weight.T + bias) / c)`` before
    ``row_scale`` / ``penalty`` (monotonic: the same ids, the model's capped values and log-sum-exp).
    """

    def cap(x):
        return x if softcap is None else torch.tanh(x.float() / softcap) * softcap

    n, vocab = h.shape[0], weight.shape[0]
    n_cand = min(n_cand, vocab)
    dev = weight.device  # a split model: the matrix may sit on another device than the hidden state
    h = h.to(dev)
    row_scale, penalty, bias = (None if t is None else t.to(dev) for t in (row_scale, penalty, bias))
    hw = h.to(weight.dtype)
    best_v = best_i = lse = None
    for s in range(0, vocab, chunk):
        e = min(vocab, s + chunk)
        sc = hw @ weight[s:e].T
        if bias is not None:
            sc = sc + bias[s:e].to(sc.dtype)
        sc = cap(sc)
        if row_scale is not None:
            sc = sc * row_scale[s:e].to(sc.dtype)
        if penalty is not None:
            sc = sc.float() + penalty[s:e]
        if want_lse:
            part = torch.logsumexp(sc.float(), dim=1)
            lse = part if lse is None else torch.logaddexp(lse, part)
        v, i = sc.topk(min(n_cand, e - s), dim=1)
        i = i + s
        if best_v is not None:
            v = torch.cat([best_v, v.to(best_v.dtype)], 1)
            i = torch.cat([best_i, i], 1)
            v, j = v.topk(min(n_cand, v.shape[1]), dim=1)  # small chunks: fewer than n_cand seen so far
            i = i.gather(1, j)
        best_v, best_i = v, i
    hf = h.float()

    def exact_rows(hrows, ids):  # fp32 scores of the given (m, c) ids for the rows hrows (m, d)
        out = torch.empty(ids.shape, dtype=torch.float32, device=weight.device)
        step = max(1, 256 // max(1, ids.shape[1]))  # small blocks: a few MB of fp32 rows at a time
        for t in range(0, ids.shape[0], step):
            for c0 in range(0, ids.shape[1], 4096):
                rows = weight[ids[t:t + step, c0:c0 + 4096]].float()  # (b, c, d)
                out[t:t + step, c0:c0 + 4096] = torch.bmm(rows, hrows[t:t + step, :, None])[..., 0]
        if bias is not None:
            out += bias.float()[ids]
        out = cap(out)
        if row_scale is not None:
            out *= row_scale[ids]
        if penalty is not None:
            out += penalty[ids]
        return out

    n_fallback = 0
    if weight.dtype == torch.float32 and h.dtype == torch.float32:
        # the cheap pass WAS fp32: its sorted candidates are the answer
        top_v, top_i = best_v[:, :k].float(), best_i[:, :k]
    else:
        # bf16 gemm accumulates in fp32 and rounds once (2^-9); the bf16 scale adds two more roundings: < 2^-7.
        bv = best_v.float()
        err = bv.abs() * 2.0 ** -7 + 1e-6
        if n_cand > k:  # k-th and (k+1)-th apart by more than both errors: the top-k SET is certain
            sure = (bv[:, k - 1] - err[:, k - 1]) > (bv[:, k] + err[:, k])
        else:
            sure = torch.zeros(n, dtype=torch.bool, device=bv.device)
        # exact fp32 scores: the k ids of the sure tokens (to order them), all candidates of the others
        top_v = torch.empty(n, k, dtype=torch.float32, device=bv.device)
        top_i = torch.empty(n, k, dtype=torch.long, device=bv.device)
        rows = sure.nonzero()[:, 0]
        if len(rows):
            ids = best_i[rows, :k]
            v, j = exact_rows(hf[rows], ids).topk(k, dim=1)
            top_v[rows], top_i[rows] = v, ids.gather(1, j)
        rows = (~sure).nonzero()[:, 0]
        if len(rows):
            ids = best_i[rows]
            v, j = exact_rows(hf[rows], ids).topk(k, dim=1)
            top_v[rows], top_i[rows] = v, ids.gather(1, j)
            # Anything outside the candidates scored <= the last candidate in the cheap pass; its fp32 score is at
            # most that plus the rounding bound. Tokens without that margin get a second look.
            last = bv[rows, -1]
            bound = last + torch.maximum(last.abs(), v[:, -1].abs()) * 2.0 ** -7 + 1e-6
            unsafe = (v[:, -1] <= bound) & (n_cand < vocab)
            if bool(unsafe.any()):
                # one cheap pass over the whole vocabulary for those tokens, then exact fp32 scores for EVERY id
                # whose cheap score is within the rounding bound of the k-th score (a superset of the true top-k)
                rows = rows[unsafe]
                n_fallback = len(rows)
                full = hw[rows] @ weight.T  # (m, V) in the model dtype: a few MB
                if bias is not None:
                    full = full + bias.to(full.dtype)
                full = cap(full)
                if row_scale is not None:
                    full = full * row_scale.to(full.dtype)
                for m, r in enumerate(rows.tolist()):
                    sc = full[m].float()
                    if penalty is not None:
                        sc = sc + penalty
                    kth = float(top_v[r, -1])
                    e = max(abs(kth), float(top_v[r, 0].abs())) * 2.0 ** -6 + 1e-6
                    ids = (sc >= kth - e).nonzero()[:, 0]
                    v, j = exact_rows(hf[r:r + 1], ids[None])[0].topk(k)
                    top_v[r], top_i[r] = v, ids[j]
    if normalize:
        top_v = top_v / hf.norm(dim=1, keepdim=True).clamp_min(1e-30)
    if want_lse:
        return top_v, top_i, n_fallback, lse
    return top_v, top_i, n_fallback



__all__ = ["topk_rerank"]
