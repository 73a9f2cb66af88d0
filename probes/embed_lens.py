"""EmbedLens (paper Sec. 3.1, eq. 1): which INPUT-embedding rows a hidden state is closest to, by cosine.

    EmbedLens(h) = TopK_i  h·e_i / (||h|| ||e_i||)      (W_E = the LM's input embedding matrix, no norm applied to h)

At each read site the selected rows of the hidden state are compared with every row of the input embedding matrix,
chunk by chunk over the vocabulary with a running top-k, so memory stays O(tokens x chunk). Only ids + scores leave
the trace.

Exactness (the contract the tests and the bench check): the chunked pass runs in the model's dtype (bf16 on big
models) and keeps ``candidates`` (default ``max(2k, k + 3)``) per token; those are re-scored exactly in fp32 (a gather of
their embedding rows, never an fp32 copy of the matrix) and re-ranked. A token whose fp32 k-th score is not safely
above the best score the cheap pass could have missed (the last candidate's score plus a 2^-7 relative rounding
bound) gets a second look (``fallbacks[site]`` in the result counts them): one cheap pass over the whole
vocabulary, then exact fp32 scores for every id within the rounding bound of its k-th score. So the top-k ids equal
an fp32 computation. Scores are fp32 cosines. The pass multiplies by the raw matrix and scales by precomputed
inverse row norms (computed once per model outside the trace, shipped in as a (V,) fp32 extra). For fp32 models the
cheap pass is already fp32 and is the answer. Ordering within the top-k always comes from fp32 scores: the k ids
are rescored in fp32 when the bf16 gap between ranks k and k+1 exceeds the rounding bound, all candidates otherwise.

``sites``: default ``hook_embed`` and ``blocks.{i}.hook_resid_post`` of every layer; any LM site
(``vision_projector.hook_out``, ``hook_embed``, any ``blocks.{i}.*``, ``ln_final.hook_normalized``) may be given.
``layer`` in the table: -1 for ``hook_embed`` / ``vision_projector.hook_out`` (the LM input), ``i`` for
``blocks.{i}.*``, ``n_layers`` for ``ln_final``. ``positions``: ``"visual"`` (default), ``"text"``, ``"all"``
(every attended position) or a list of sequence positions (applied to every prompt row). The projector site reads
visual tokens only (its rows are mapped through ``batch.tokens["projector_rows"]``). ``skip_special=True`` leaves
special tokens, byte-fallback tokens (``<0x..>``) and embedding rows beyond the tokenizer out of the search (so k
real tokens still come back).

Rows no token maps to: checkpoints pad their embedding matrix beyond the tokenizer (llava-hf: 32064 rows for 32002
tokens, near the mean embedding; Qwen: hundreds of unused rows), and such a row can be a top-1 that decodes to ''.
By default both lenses search rows ``0 .. len(tokenizer) - 1`` only (rows at or beyond ``len(tokenizer)`` are left
out; LogitLens' log-probabilities are then normalised over those rows too); ``unused_rows=True`` searches every row.
"""

from __future__ import annotations

import torch

from mech_vtokens.component import Probe, select_rows, weight_of
from mech_vtokens.errors import InputError
from mech_vtokens.results import Result, token_frame

_LM_SITES_MSG = ("the lenses read LM sites only: 'vision_projector.hook_out', 'hook_embed', 'blocks.{i}.<hook>', "
                 "'ln_final.hook_normalized'")


# ------------------------------------------------------------------------------------------------------------------
# In-trace math (torch only: shipped by value for remote runs).
# ------------------------------------------------------------------------------------------------------------------

def _select(site, value, mine, ctx):
    """The (n, d) rows a lens reads at ``site`` (projector rows, or the selected (row, position) pairs) and which of
    them exist (after a Prune the removed tokens' rows do not)."""
    if site == "vision_projector.hook_out":
        rows = value.reshape(-1, value.shape[-1])[mine["projector_rows"]]
        return rows, torch.ones(rows.shape[0], dtype=torch.bool, device=rows.device)
    return select_rows(value, mine["select"], ctx)


def _lens_rows(site, value, mine, ctx, fn):
    """Run the lens ``fn(h) -> (scores, ids, n_fallback)`` on the rows that exist; removed rows get id -1, NaN."""
    h, present = _select(site, value, mine, ctx)
    if bool(present.all()):
        return fn(h)
    v, i, nf = fn(h[present])
    k = v.shape[1]
    vv = torch.full((h.shape[0], k), float("nan"), dtype=v.dtype, device=v.device)
    ii = torch.full((h.shape[0], k), -1, dtype=i.dtype, device=i.device)
    present = present.to(v.device)
    vv[present], ii[present] = v, i
    return vv, ii, nf


def _topk_rerank(h, weight, k, n_cand, chunk, row_scale=None, penalty=None, bias=None, normalize=False,
                 want_lse=False):
    """Top-k over ``(h @ weight.T + bias) * row_scale + penalty`` with ids equal to an fp32 computation.

    h: (n, d); weight: (V, d) in the model dtype; row_scale: (V,) fp32 or None; penalty: (V,) fp32 with 0 / -inf or
    None. Returns fp32 scores (n, k) (divided by ||h|| when ``normalize``) and int64 ids (n, k); with ``want_lse``
    also the (n,) fp32 log-sum-exp of the cheap pass's scores (exact for fp32 models).
    """
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
            v, j = v.topk(n_cand, dim=1)
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


def _store(out, site, v, i, small_ids, n_fallback=0):
    out[site] = {"ids": i.to(torch.int16 if small_ids else torch.int32), "scores": v,
                 "fallbacks": torch.tensor(n_fallback, device=v.device)}


# ------------------------------------------------------------------------------------------------------------------
# Shared lens machinery (EmbedLens here, LogitLens in logit_lens.py).
# ------------------------------------------------------------------------------------------------------------------

def _special_ids(tokenizer, vocab: int) -> list[int]:
    """Special tokens, byte-fallback tokens (<0x..>) and embedding rows the tokenizer does not name."""
    import re

    n = len(tokenizer)
    ids = set(int(i) for i in tokenizer.all_special_ids)
    for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(t, "special", False):
            ids.add(int(i))
    toks = tokenizer.convert_ids_to_tokens(list(range(min(n, vocab))))
    pat = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")
    ids.update(i for i, t in enumerate(toks) if t is None or pat.match(t))
    ids.update(range(n, vocab))
    return sorted(i for i in ids if 0 <= i < vocab)


_INV_NORMS: dict = {}


def _inverse_row_norms(weight: torch.Tensor) -> torch.Tensor:
    """(V,) fp32 1/||e_i|| (0 for all-zero rows, e.g. a padding embedding), computed in fp32 chunk by chunk (no fp32
    copy of the matrix) OUTSIDE the trace and cached per weight tensor; shipped in as a small extra."""
    key = (weight.data_ptr(), tuple(weight.shape), weight.dtype, weight._version)
    if key not in _INV_NORMS:
        with torch.no_grad():
            norms = torch.cat([torch.linalg.vector_norm(weight[s:s + 2048].float(), dim=1)
                               for s in range(0, weight.shape[0], 2048)])
        _INV_NORMS.clear()
        _INV_NORMS[key] = torch.where(norms > 0, 1.0 / norms.clamp_min(1e-30), torch.zeros_like(norms))
    return _INV_NORMS[key]


def _module_path(root: torch.nn.Module, module: torch.nn.Module) -> str:
    for name, m in root.named_modules():
        if m is module:
            return name
    raise InputError("the input embedding module is not part of the model tree; cannot read its weights")


def _layer_of(site: str, n_layers: int) -> int:
    if site in ("hook_embed", "vision_projector.hook_out"):
        return -1
    if site.startswith("blocks."):
        return int(site.split(".")[1])
    if site.startswith("ln_final"):
        return n_layers
    return -1


def _default_sites(vlm):
    return ["hook_embed"] + [f"blocks.{i}.hook_resid_post" for i in range(vlm.n_layers)]


def _check_sites(vlm, names, lens, allow_final=True):
    out = []
    for s in names:
        canon = vlm.adapter.canonical(s)  # raises InputError for unknown sites / layers out of range
        ok = canon in ("vision_projector.hook_out", "hook_embed") or canon.startswith("blocks.") or (
            allow_final and canon == "ln_final.hook_normalized")
        if not ok:
            raise InputError(f"{lens} cannot read site {s!r}: {_LM_SITES_MSG}"
                             + ("" if allow_final else " (not ln_final: LogitLens applies the final norm itself)"))
        out.append(canon)
    if len(set(out)) != len(out):
        raise InputError(f"{lens}: site list {names!r} names a site twice; give each site once")
    return out


def _selection(positions, batch):
    """(batch, seq) bool mask of the positions a lens reads (projector site aside)."""
    vm = batch.visual_mask
    att = batch.inputs.get("attention_mask")
    att = torch.ones_like(vm) if att is None else att.bool()
    if isinstance(positions, str):
        if positions == "visual":
            return vm.clone()
        if positions == "text":
            return att & ~vm
        if positions == "all":
            return att.clone()
        raise InputError(f"positions={positions!r}: use 'visual', 'text', 'all' or a list of sequence positions")
    pos = [int(p) for p in positions]
    seq = vm.shape[1]
    bad = [p for p in pos if not -seq <= p < seq]
    if bad or not pos:
        raise InputError(f"positions {bad or pos!r} are outside the sequence (length {seq}); give positions in "
                         f"0..{seq - 1} (negative counts from the end)")
    mask = torch.zeros_like(vm)
    mask[:, [p % seq for p in pos]] = True
    return mask & att


class _Lens(Probe):
    _name = "lens"
    _allow_final = True

    def __init__(self, k: int = 5, sites=None, positions="visual", chunk: int = 8192, skip_special: bool = False,
                 candidates: int | None = None, unused_rows: bool = False):
        if not isinstance(unused_rows, bool):
            raise InputError(f"{type(self).__name__}: unused_rows={unused_rows!r}; pass True (search the matrix rows no "
                             f"token maps to as well) or False (the default: rows below len(tokenizer) only)")
        if not isinstance(k, int) or k <= 0:
            raise InputError(f"{type(self).__name__}: k={k!r}; give a positive integer number of tokens (e.g. k=5)")
        if not isinstance(chunk, int) or chunk <= 0:
            raise InputError(f"{type(self).__name__}: chunk={chunk!r}; give a positive vocabulary chunk (e.g. 8192)")
        if isinstance(sites, str):
            sites = [sites]
        if sites is not None and not sites:
            raise InputError(f"{type(self).__name__}: empty site list; leave sites=None for the defaults")
        if not isinstance(positions, str):
            positions = list(positions)
        elif positions not in ("visual", "text", "all"):
            raise InputError(f"positions={positions!r}: use 'visual', 'text', 'all' or a list of sequence positions")
        if candidates is not None and candidates < k:
            raise InputError(f"candidates={candidates} < k={k}: candidates must be at least k (or None)")
        self.k, self.site_names, self.positions = k, sites, positions
        self.chunk, self.skip_special, self.candidates = chunk, skip_special, candidates
        self.unused_rows = unused_rows

    # -- outside the trace -------------------------------------------------------------------------------------
    def _matrix_rows(self, vlm) -> int:
        raise NotImplementedError

    def _vocab(self, vlm) -> int:
        """How many rows of the matrix the lens searches (the first ones: rows no token maps to come last)."""
        rows = self._matrix_rows(vlm)
        return rows if self.unused_rows else min(rows, len(vlm.tokenizer))

    def sites(self, vlm):
        names = self.site_names if self.site_names is not None else _default_sites(vlm)
        return _check_sites(vlm, names, type(self).__name__, self._allow_final)

    def check(self, vlm, batch):
        sites = self.sites(vlm)
        vocab = self._vocab(vlm)
        if self.k > vocab:
            raise InputError(f"{type(self).__name__}: k={self.k} exceeds the vocabulary ({vocab} tokens); use k <= "
                             f"{vocab}")
        if self.positions == "visual" or "vision_projector.hook_out" in sites:
            if batch.n_visual == 0:
                raise InputError(f"{type(self).__name__} reads visual tokens but the batch has none: pass an image "
                                 f"(and its placeholder in the prompt) or use positions='text'/'all'")
        if "vision_projector.hook_out" in sites and self.positions != "visual":
            raise InputError(f"{type(self).__name__}: the projector site holds visual tokens only; use "
                             f"positions='visual' or read 'hook_embed' (the LM input) instead")
        sel = _selection(self.positions, batch)
        if not bool(sel.any()):
            raise InputError(f"{type(self).__name__}: positions={self.positions!r} select no attended token in "
                             f"this batch")

    def _base_extras(self, vlm, batch) -> dict:
        vocab = self._vocab(vlm)
        mine = {"select": _selection(self.positions, batch), "k": self.k, "chunk": self.chunk,
                "n_cand": self.candidates or max(2 * self.k, self.k + 3), "small_ids": vocab <= 32767,
                "skip": None, "rows": vocab}
        if "vision_projector.hook_out" in self.sites(vlm):
            mine["projector_rows"] = batch.tokens["projector_rows"]
        if self.skip_special:
            mine["skip"] = torch.tensor(_special_ids(vlm.tokenizer, vocab), dtype=torch.long)
        return mine

    @staticmethod
    def _penalty(ctx, mine, vocab):
        if mine["skip"] is None:
            return None
        key = ("_lens_penalty", vocab, int(mine["skip"].sum()), len(mine["skip"]))
        if key not in ctx:
            p = torch.zeros(vocab, dtype=torch.float32, device=mine["skip"].device)
            p[mine["skip"]] = float("-inf")
            ctx[key] = p
        return ctx[key]

    def collect(self, raw, batch, vlm):
        sites = self.sites(vlm)
        data = {}
        for s in sites:
            d = raw[s]
            data[s] = (d["ids"].long(), d["scores"].float(), int(d["fallbacks"]))
        return LensResult(type(self).__name__, data, _token_frame(batch, self.positions, sites), vlm.tokenizer,
                          vlm.n_layers, batch)


def _token_frame(batch, positions, sites):
    """Identity columns of the rows a lens read, per site kind (LM sites vs projector)."""
    import pandas as pd

    frame = token_frame(batch, _selection(positions, batch))
    frames = {"lm": frame}
    if "vision_projector.hook_out" in sites:
        vp = batch.visual_positions
        frames["projector"] = pd.DataFrame({"row": vp[:, 0].numpy(), "image": batch.tokens["image"].numpy(),
                                            "position": vp[:, 1].numpy(), "visual_index": range(len(vp))})
    return frames


class LensResult(Result):
    """Top-k tokens per read token per site. ``ids[site]`` / ``scores[site]``: (n_tokens, k) tensors;
    ``to_pandas()``: columns row, image, site, layer, position, visual_index, rank, token_id, token, score."""

    name = "lens"

    def __init__(self, lens, data, frames, tokenizer, n_layers, batch):
        self.lens = lens
        self.ids = {s: v[0] for s, v in data.items()}
        self.scores = {s: v[1] for s, v in data.items()}
        self.fallbacks = {s: v[2] for s, v in data.items()}  # tokens redone over the full vocabulary in fp32
        self._frames, self._tok, self._n_layers, self._batch = frames, tokenizer, n_layers, batch

    def _decode(self, ids):
        uniq = sorted(set(int(i) for i in ids))
        table = {i: self._tok.decode([i]) if i >= 0 else None for i in uniq}  # -1: token removed before this site
        return [table[int(i)] for i in ids]

    def to_pandas(self):
        import numpy as np
        import pandas as pd

        parts = []
        for site, ids in self.ids.items():
            frame = self._frames["projector" if site == "vision_projector.hook_out" else "lm"]
            n, k = ids.shape
            df = frame.loc[frame.index.repeat(k)].reset_index(drop=True)
            df.insert(2, "site", site)
            df.insert(3, "layer", _layer_of(site, self._n_layers))
            df["rank"] = np.tile(np.arange(k), n)
            df["token_id"] = ids.reshape(-1).numpy()
            parts.append(df.assign(score=self.scores[site].reshape(-1).numpy()))
        df = pd.concat(parts, ignore_index=True)
        df.insert(df.columns.get_loc("score"), "token", self._decode(df["token_id"].to_numpy()))
        df["lens"] = self.lens
        return df

    def top1(self, site):
        """(n_tokens,) top-1 ids at ``site``."""
        return self.ids[site][:, 0]

    def plot(self, site=None, image=0, ax=None):
        """The top-1 token of every visual token of ``image`` on its token grid, coloured by score."""
        from mech_vtokens.views.figure import figure_of, subplots

        site = site or next(iter(self.ids))
        frame = self._frames["projector" if site == "vision_projector.hook_out" else "lm"]
        t = self._batch.tokens
        keep = (frame["visual_index"] >= 0).to_numpy()
        vi = frame["visual_index"].to_numpy()[keep]
        on = (t["image"][vi] == image).numpy()
        vi = vi[on]
        if not len(vi):
            raise InputError(f"image {image} has no visual tokens in this result")
        rows, cols = t["row"][vi].numpy(), t["col"][vi].numpy()
        ids = self.ids[site][keep][on][:, 0].numpy()
        sc = self.scores[site][keep][on][:, 0].numpy()
        import numpy as np

        grid = np.full((rows.max() + 1, cols.max() + 1), np.nan)
        grid[rows, cols] = sc
        if ax is None:
            _, ax = subplots(figsize=(max(4, grid.shape[1] * 0.5), max(4, grid.shape[0] * 0.5)))
        ax.imshow(grid, cmap="viridis")
        toks = self._decode(ids)
        if grid.size <= 1024:
            for r, c, tk in zip(rows, cols, toks):
                ax.text(c, r, tk.strip()[:6], ha="center", va="center", fontsize=6, color="w")
        ax.set_title(f"{self.lens} top-1 at {site} (image {image})")
        return figure_of(ax)


# ------------------------------------------------------------------------------------------------------------------

class EmbedLens(_Lens):
    """EmbedLens (paper Sec. 3.1, eq. 1): top-k cosine neighbours of hidden states among the INPUT embeddings.

    ``EmbedLens(k=5, sites=None, positions="visual", chunk=8192, skip_special=False, candidates=None,
    unused_rows=False)``; see the module docstring for sites, positions, exactness (ids equal an fp32 computation),
    the rows searched (``unused_rows``: also the rows at or beyond ``len(tokenizer)``) and the table's columns.
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
            v, i, nf = _lens_rows(site, value.detach(), mine, ctx, lambda h: _topk_rerank(
                h, weight, mine["k"], mine["n_cand"], mine["chunk"], row_scale=mine["inv_norm"], penalty=penalty,
                normalize=True))
        _store(out, site, v, i, mine["small_ids"], nf)


__all__ = ["EmbedLens", "LensResult"]
