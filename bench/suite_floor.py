"""The bare-torch floor of the probe suite: the SAME work as the suite, in plain torch on a plain HF forward.

The suite (``suite_probes``): EmbedLens + LogitLens top-k at ``hook_embed`` and every ``blocks.{i}.hook_resid_post``
(all visual tokens, every matrix row: ``unused_rows=True``, as a real checkpoint's tokenizer names ~all rows),
NormTracker (L1 / L2 / layer-to-layer cosine at every vision layer and every LM layer), SinkChannels (φ on given
dims, BOS cosine, at ``hook_embed`` + every ``hook_resid_mid`` / ``hook_resid_post``; ranks by BOS cosine) and
ViTSinks (norms at the vision layer the LM receives).

``floor(vlm, batch, exact=...)`` computes each of these numbers with torch hooks that keep the states and bare torch
math after the forward:

- ``exact=False``: lens ids from one bf16 (model dtype) chunked pass with a running top-k, no re-rank;
- ``exact=True``: the same pass keeping ``max(2k, k + 3)`` candidates, re-scored in fp32 (a gather of their rows),
  and, for a token whose fp32 k-th score is not safely above what the cheap pass left out (2^-7 rounding bound),
  a full-vocabulary look at every id within the bound: ids equal an fp32 computation, as the suite's.

``check(vlm, results, fl)`` compares the suite's results with the exact floor: ids exact, values close. Used by
``bench/probe_suite.py`` (printed) and ``tests/test_bench_floor.py`` (tiny LLaVA).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import chunked_topk, forward_with_hooks  # noqa: E402  (one copy for every bench)


def suite_probes(k: int, dims):
    """The full probe suite the bench times (one forward)."""
    from mech_vtokens.probes import EmbedLens, LogitLens, NormTracker, SinkChannels, ViTSinks

    return [EmbedLens(k=k, unused_rows=True), LogitLens(k=k, unused_rows=True), NormTracker(),
            SinkChannels(dims=list(dims)), ViTSinks()]


def inverse_row_norms(W):
    """(V,) fp32 1 / ||e_i|| (0 for zero rows), chunked: computed once per model, outside the timed calls."""
    nrm = torch.cat([torch.linalg.vector_norm(W[s:s + 2048].float(), dim=1) for s in range(0, W.shape[0], 2048)])
    return torch.where(nrm > 0, 1.0 / nrm.clamp_min(1e-30), torch.zeros_like(nrm))


def states(vlm, batch) -> dict:
    """One plain HF forward; torch hooks keep every vision block output, the LM input and each decoder layer's
    residual stream after attention (the input of its second norm) and after the MLP."""
    from mech_vtokens.adapters.base import _resolve

    hf, a = vlm.hf, vlm.adapter
    got, hooks = {}, []

    def keep(name, index=None):
        return lambda m, i, o: got.__setitem__(name, o if index is None else o[index])

    for i, layer in enumerate(_resolve(hf, a.vision_layers)):
        hooks.append(layer.register_forward_hook(keep(f"vision.{i}", a.vision_layer_output_index)))
    hooks.append(_resolve(hf, a.language_model).register_forward_pre_hook(
        lambda m, args, kw: got.__setitem__("embed", kw["inputs_embeds"]), with_kwargs=True))
    for i, layer in enumerate(_resolve(hf, a.decoder_layers)):
        hooks.append(_resolve(layer, a.ln2).register_forward_pre_hook(
            lambda m, args, kw, i=i: got.__setitem__(f"mid.{i}", args[0] if args else next(iter(kw.values()))),
            with_kwargs=True))
        hooks.append(layer.register_forward_hook(keep(f"post.{i}")))
    forward_with_hooks(hf, batch.inputs, hooks)
    return got


def _fp32(hf, mat, ids, scale=None, block=64):
    """fp32 scores of ``ids`` (m, c) for the rows ``hf`` (m, d): their matrix rows gathered, never a copy of it."""
    out = torch.empty(ids.shape, dtype=torch.float32)
    for t in range(0, ids.shape[0], block):
        out[t:t + block] = torch.einsum("bcd,bd->bc", mat[ids[t:t + block]].float(), hf[t:t + block])
    return out * scale[ids] if scale is not None else out


def exact_topk(h, mat, k, scale=None, chunk=8192):
    """Top-k (fp32 scores, ids) of ``(h @ mat.T) * scale`` with ids equal to an fp32 computation."""
    n = min(max(2 * k, k + 3), mat.shape[0])
    bv, bi = chunked_topk(h, mat, n, scale, chunk, values=True)
    hf = h.float()
    v, j = _fp32(hf, mat, bi, scale).topk(k, dim=1)
    ids = bi.gather(1, j)
    if mat.dtype == torch.float32 and h.dtype == torch.float32:
        return v, ids
    last = bv[:, -1].float()
    unsafe = (v[:, -1] <= last + torch.maximum(last.abs(), v[:, -1].abs()) * 2.0 ** -7 + 1e-6) & (n < mat.shape[0])
    for r in unsafe.nonzero()[:, 0].tolist():
        sc = h[r:r + 1] @ mat.T
        sc = (sc * scale.to(sc.dtype) if scale is not None else sc)[0].float()
        kth = float(v[r, -1])
        cand = (sc >= kth - max(abs(kth), abs(float(v[r, 0]))) * 2.0 ** -6 - 1e-6).nonzero()[:, 0]
        vv, jj = _fp32(hf[r:r + 1], mat, cand[None], scale)[0].topk(k)
        v[r], ids[r] = vv, cand[jj]
    return v, ids


def floor(vlm, batch, k, dims, inv, exact=True, chunk=8192) -> dict:
    """Every number of the suite (see the module docstring) from one plain forward + bare torch."""
    with torch.no_grad():
        st = states(vlm, batch)
        W, U, norm = vlm.embedding_matrix.detach(), vlm.unembed.weight.detach(), vlm.final_norm
        vm = batch.visual_mask
        att = batch.inputs.get("attention_mask")
        att = torch.ones_like(vm) if att is None else att.bool()
        nl, nv = vlm.n_layers, vlm.n_vision_layers
        res = {}
        lm_post = {"hook_embed": st["embed"], **{f"blocks.{i}.hook_resid_post": st[f"post.{i}"] for i in range(nl)}}
        for p, x in lm_post.items():  # the lenses
            h = x[vm]
            for name, mat, hh, scale, cos in (("embed", W, h, inv, True), ("logit", U, norm(h), None, False)):
                if exact:
                    v, i = exact_topk(hh, mat, k, scale, chunk)
                    res[(name, p)] = (i, v / h.float().norm(dim=1, keepdim=True) if cos else v)
                else:
                    res[(name, p)] = (chunked_topk(hh, mat, k, scale, chunk), None)
        vis = {f"vision.blocks.{i}.hook_resid_post": st[f"vision.{i}"].reshape(-1, st[f"vision.{i}"].shape[-1])
               for i in range(nv)}
        for tower in (vis, {p: x[att] for p, x in lm_post.items()}):  # the norms
            prev = None
            for p, x in tower.items():
                xf = x.float()
                cos = (torch.full((len(xf),), float("nan")) if prev is None else F.cosine_similarity(xf, prev, dim=-1))
                res[("norms", p)] = (xf.abs().sum(-1), xf.norm(dim=-1), cos)
                prev = xf
        sub = {"hook_embed": st["embed"]}  # the sink channels: every sublayer
        for i in range(nl):
            sub[f"blocks.{i}.hook_resid_mid"], sub[f"blocks.{i}.hook_resid_post"] = st[f"mid.{i}"], st[f"post.{i}"]
        rows = att.nonzero()[:, 0]
        bos_pos = att.int().argmax(dim=1)
        is_vis = vm[att]
        for p, x in sub.items():
            xf = x.float()
            xs, bos = xf[att], xf[torch.arange(len(xf)), bos_pos]
            rms = xs.pow(2).mean(-1).sqrt().clamp_min(1e-30)
            bc = F.cosine_similarity(xs, bos[rows], dim=-1)
            rank = torch.zeros(len(bc), dtype=torch.long)  # rank among the row's visual tokens (1 = most BOS-like)
            for r in range(len(xf)):
                sel = ((rows == r) & is_vis).nonzero()[:, 0]
                rank[sel[bc[sel].argsort(descending=True)]] = torch.arange(1, len(sel) + 1)
            res[("sinks", p)] = (xs[:, list(dims)].abs().amax(-1) / rms, bc, rank)
        vl = vlm.adapter.lm_vision_layer()  # ViT sinks
        nr = vis[f"vision.blocks.{vl}.hook_resid_post"].float().norm(dim=-1)
        per = nr[batch.tokens["vision_rows"]]
        res[("vit", vl)] = (nr, per.amax(-1), per.mean(-1))
    return res


def check(vlm, results, fl, tol=1e-4) -> dict:
    """The suite's ``results`` (from ``suite_probes``, in that order) vs the exact floor ``fl``: {check: (ok, worst
    absolute difference or count of differing ids)}."""
    el, ll, nt, sc, vs = (results[k] for k in ("embed_lens", "logit_lens", "norm_tracker", "sink_channels",
                                               "vit_sinks"))
    out = {}

    def close(name, a, b):
        a, b = a.float(), b.float()
        ok = a.shape == b.shape and torch.allclose(a, b, rtol=tol, atol=tol, equal_nan=True)
        diff = (a - b).abs().nan_to_num(0).max().item() if a.shape == b.shape and a.numel() else float("inf")
        prev = out.get(name, (True, 0.0))
        out[name] = (prev[0] and ok, max(prev[1], diff))

    def same(name, a, b):
        bad = int((a.long() != b.long()).sum()) if a.shape == b.shape else a.numel()
        prev = out.get(name, (True, 0))
        out[name] = (prev[0] and bad == 0, prev[1] + bad)

    for lens, tag in ((el, "embed"), (ll, "logit")):
        for p in lens.ids:
            same(f"{tag} lens ids", lens.ids[p], fl[(tag, p)][0])
            close(f"{tag} lens scores", lens.scores[p], fl[(tag, p)][1])
    for p, rec in nt.data.items():
        for key, j in (("l1", 0), ("l2", 1), ("cos_prev", 2)):
            close(f"norms {key}", rec[key], fl[("norms", p)][j])
    ranks = sc.rank_tracking()
    for p in sc.sites:
        close("sinks phi", sc.phi[p], fl[("sinks", p)][0])
        close("sinks bos_cos", sc.bos_cos[p], fl[("sinks", p)][1])
    frame = sc.to_pandas()
    frame = frame[frame.site == sc.sites[0]]
    vis_pos = torch.tensor((frame.visual_index >= 0).to_numpy()).nonzero()[:, 0]
    for site, g in ranks.groupby("site", sort=False):
        mine = fl[("sinks", site)][2][vis_pos][torch.tensor(g.visual_index.to_numpy())]
        same("sinks ranks", torch.tensor(g["rank"].to_numpy()), mine)
    out["vit_sinks layer"] = (("vit", vs.layer) in fl, 0)
    fr = fl.get(("vit", vs.layer)) or next(v for key, v in fl.items() if key[0] == "vit")
    close("vit_sinks row norms", vs.row_norms, fr[0])
    close("vit_sinks l2 (max)", vs.l2, fr[1])
    close("vit_sinks l2_mean", vs.l2_mean, fr[2])
    return out
