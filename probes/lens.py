"""What EmbedLens and LogitLens share: site and position selection, the rows searched, the in-trace row plumbing,
and ``LensResult`` (the table both lenses return). The exact top-k kernel itself is ``mech_vtokens.ops.topk_rerank``.

``sites``: default ``hook_embed`` and ``blocks.{i}.hook_resid_post`` of every layer; any LM site
(``vision_projector.hook_out``, ``hook_embed``, any ``blocks.{i}.*``, ``ln_final.hook_normalized``) may be given.
``layer`` in the table comes from the one site parser (``mech_vtokens.site_names``): -1 for ``hook_embed`` /
``vision_projector.hook_out`` (the LM input), ``i`` for ``blocks.{i}.*``, ``n_layers`` for ``ln_final``; ``site``
is an ordered Categorical in forward order. ``positions``: ``"visual"`` (default), ``"text"``, ``"all"``
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

from mech_vtokens.component import Probe, select_rows
from mech_vtokens.errors import InputError
from mech_vtokens.results import Result, token_frame
from mech_vtokens.site_names import site_column, site_layer

_LM_SITES_MSG = ("the lenses read LM sites only: 'vision_projector.hook_out', 'hook_embed', 'blocks.{i}.<hook>', "
                 "'ln_final.hook_normalized'")


# ------------------------------------------------------------------------------------------------------------------
# In-trace math (torch only: shipped by value for remote runs).
# ------------------------------------------------------------------------------------------------------------------

def _select(site, value, mine, ctx):
    """The (n, d) rows a lens reads at ``site`` (projector rows, or the selected (row, position) pairs) and which of
    them exist (after a Prune the removed tokens' rows do not)."""
    if site == "vision_projector.hook_out":  # a token's mix of projector rows (one row, or none: a newline)
        from mech_vtokens.adapters.geometry import mix_rows

        return mix_rows(value.reshape(-1, value.shape[-1]), mine["projector_mix"], mine["projector_mix_weights"])
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



LAYERS = ("blocks", "hidden_states")


def _default_sites(vlm, layers="blocks", allow_final=True):
    """``"blocks"``: hook_embed + every block's output. ``"hidden_states"``: HF's ``output_hidden_states`` entries
    (the LM input, blocks 0..n-2, and the last entry AFTER the final norm: ``ln_final`` for EmbedLens; LogitLens
    applies the final norm itself, so its last entry reads block n-1, normed once, i.e. the model's logits)."""
    n = vlm.n_layers
    if layers == "hidden_states" and allow_final:
        return ["hook_embed"] + [f"blocks.{i}.hook_resid_post" for i in range(n - 1)] + ["ln_final.hook_normalized"]
    return ["hook_embed"] + [f"blocks.{i}.hook_resid_post" for i in range(n)]


def hidden_state_index(site: str, n_layers: int, allow_final: bool = True):
    """The index into HF's ``output_hidden_states`` (0 = the LM input, ``n_layers`` = the last, after the final
    norm) that a lens at canonical ``site`` reads, or None when the site is no entry of it."""
    import re

    if site == "hook_embed":
        return 0
    if site == "ln_final.hook_normalized":
        return n_layers if allow_final else None
    m = re.fullmatch(r"blocks\.(\d+)\.hook_resid_(pre|post)", site)
    if m is None:
        return None
    i = int(m.group(1))
    if m.group(2) == "pre":
        return i
    return None if (allow_final and i == n_layers - 1) else i + 1  # EmbedLens: block n-1 is before the norm


def check_layers(layers, who: str) -> str:
    if layers not in LAYERS:
        raise InputError(f"{who}: layers={layers!r}; choose 'blocks' (the library's: layer i = the output of block "
                         f"i, -1 = the LM input, the last block read before the final norm) or 'hidden_states' (the "
                         f"paper authors': the index into HF output_hidden_states, 0 = the LM input, the last entry "
                         f"after the final norm)")
    return layers


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
                 candidates: int | None = None, unused_rows: bool = False, layers: str = "blocks"):
        self.layers = check_layers(layers, type(self).__name__)
        if not isinstance(unused_rows, bool):
            raise InputError(f"{type(self).__name__}: unused_rows={unused_rows!r}; "
                             f"pass True (search the matrix rows no "
                             f"token maps to as well) or False (the default: rows below len(tokenizer) only)")
        if not isinstance(k, int) or isinstance(k, bool) or k <= 0:
            raise InputError(f"{type(self).__name__}: k={k!r}; give a positive integer number of tokens (e.g. k=5)")
        if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk <= 0:
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
        names = (self.site_names if self.site_names is not None
                 else _default_sites(vlm, self.layers, self._allow_final))
        sites = _check_sites(vlm, names, type(self).__name__, self._allow_final)
        if self.layers == "hidden_states":
            bad = [s for s in sites if hidden_state_index(s, vlm.n_layers, self._allow_final) is None]
            if bad:
                last = "ln_final.hook_normalized" if self._allow_final else f"blocks.{vlm.n_layers - 1}.hook_resid_post"
                raise InputError(f"{type(self).__name__}(layers='hidden_states'): {bad} is no output_hidden_states "
                                 f"entry; give hook_embed, blocks.{{i}}.hook_resid_pre / hook_resid_post or {last} "
                                 f"(the last entry, after the final norm), or use layers='blocks'")
        return sites

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
            mine["projector_mix"] = batch.tokens["projector_mix"]
            mine["projector_mix_weights"] = batch.tokens["projector_mix_weights"]
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
                          vlm.n_layers, batch, vlm.adapter.forward_order, self.layers, self._allow_final)


def _token_frame(batch, positions, sites):
    """Identity columns of the rows a lens read, per site kind (LM sites vs projector)."""
    import pandas as pd

    frame = token_frame(batch, _selection(positions, batch))
    frames = {"lm": frame}
    if "vision_projector.hook_out" in sites:
        vp = batch.visual_positions
        frames["projector"] = pd.DataFrame({"row": vp[:, 0].numpy(), "image": batch.tokens["image"].numpy(),
                                            "position": vp[:, 1].numpy(), "visual_index": range(len(vp)),
                                            "kind": batch.kinds})
    return frames


class LensResult(Result):
    """Top-k tokens per read token per site. ``ids[site]`` / ``scores[site]``: (n_tokens, k) tensors;
    ``to_pandas()``: columns row, image, site, layer, position, visual_index, kind (``batch.kinds``; "text" at a
    text position), rank, token_id, token, score.

    The layer column says its convention by its name (and ``df.attrs["layers"]``): ``layer`` (``layers="blocks"``,
    the library's: the output of block i, -1 = the LM input) or ``hidden_state`` (``layers="hidden_states"``, the
    paper authors': the index into HF ``output_hidden_states``, the last entry after the final norm)."""

    name = "lens"

    def __init__(self, lens, data, frames, tokenizer, n_layers, batch, order, layers="blocks", allow_final=True):
        self.lens, self.layers, self._allow_final = lens, layers, allow_final
        self.ids = {s: v[0] for s, v in data.items()}
        self.scores = {s: v[1] for s, v in data.items()}
        self.fallbacks = {s: v[2] for s, v in data.items()}  # tokens redone over the full vocabulary in fp32
        self._frames, self._tok, self._n_layers, self._batch = frames, tokenizer, n_layers, batch
        self._order = order  # every site name in forward order: orders the table's ``site`` column

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
            df.insert(3, self.layer_column, self.layer_of(site))
            df["rank"] = np.tile(np.arange(k), n)
            df["token_id"] = ids.reshape(-1).numpy()
            parts.append(df.assign(score=self.scores[site].reshape(-1).numpy()))
        df = pd.concat(parts, ignore_index=True)
        df["site"] = site_column(df["site"], self._order)
        df.insert(df.columns.get_loc("score"), "token", self._decode(df["token_id"].to_numpy()))
        df["lens"] = self.lens
        df.attrs["layers"] = self.layers
        return df

    @property
    def layer_column(self) -> str:
        """``"layer"`` (layers="blocks") or ``"hidden_state"`` (layers="hidden_states")."""
        return "hidden_state" if self.layers == "hidden_states" else "layer"

    def layer_of(self, site: str) -> int:
        """The number of ``site`` in this result's convention."""
        if self.layers == "hidden_states":
            return hidden_state_index(site, self._n_layers, self._allow_final)
        return site_layer(site, self._n_layers)

    def top1(self, site):
        """(n_tokens,) top-1 ids at ``site``."""
        return self.ids[site][:, 0]

    def plot(self, site=None, image=0, ax=None):
        """The top-1 token of every visual token of ``image`` on its token grid, coloured by score."""
        from mech_vtokens.views.figure import figure_of, subplots

        site = site or next(iter(self.ids))
        frame = self._frames["projector" if site == "vision_projector.hook_out" else "lm"]
        t = self._batch.tokens
        keep = (frame["visual_index"] >= 0).to_numpy(copy=True)  # writable: torch indexes with it
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
        from mech_vtokens.views.figure import VALUE_CMAP

        im = ax.imshow(grid, cmap=VALUE_CMAP)
        ax.figure.colorbar(im, ax=ax, label=f"{self.lens} top-1 score")
        toks = self._decode(ids)
        if grid.size <= 1024:
            for r, c, tk in zip(rows, cols, toks):
                ax.text(c, r, tk.strip()[:6], ha="center", va="center", fontsize=6, color="w")
        ax.set_title(f"{self.lens} top-1 at {site} (image {image})", fontsize=9)
        ax.set_xlabel("grid column")
        ax.set_ylabel("grid row")
        return figure_of(ax)
