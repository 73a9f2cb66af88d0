"""Attribution of the answer to visual tokens (issue 17, items 3 and 4), on the same engine as everything else.

- :func:`direct_logit_attribution`: per decoder layer and head, the DIRECT effect on the logit difference
  ``logit[a] - logit[b]`` of what that head reads from the visual tokens at the last position. The head's
  visual-key part of the attention output is measured exactly, not approximated: one forward holds the clean row and
  one copy per (layer, head) in which :class:`~mech_vtokens.interventions.HeadKnockout` zeroes that head's attention
  from the text positions to the visual keys at that layer only, so ``delta = attn_out(clean) - attn_out(copy)`` at
  that layer (same inputs up to there; attention is linear in its post-softmax weights and ``o_proj`` is linear).
  The direct effect is then ``LD(unembed(norm(x))) - LD(unembed(norm(x - delta)))`` with ``x`` the clean final
  residual at the last position and the model's own final norm (recomputed, not frozen) and unembedding. ``head``
  -1 is the whole layer (every head knocked out at once).
- :func:`attribution_patching`: the gradient x activation-difference estimate of a patching sweep (see its doc).
"""

from __future__ import annotations

import torch

from .component import Probe
from .errors import InputError
from .loop import batches, forward


class _LastPosition(Probe):
    """Each row's value at its last attended position at ``sites`` ((batch, d) per site, detached)."""

    name = "last_position"

    def __init__(self, sites):
        self.site_names = list(sites)

    def sites(self, vlm):
        return self.site_names

    def at(self, site, value, ctx, out):
        from .probes.metrics import last_positions

        rows = torch.arange(value.shape[0], device=value.device)
        out[site] = value[rows, last_positions(value, ctx)].detach().float().clone()


def _answer_id(vlm, answer, who):
    if isinstance(answer, int) and not isinstance(answer, bool):
        return answer
    ids = vlm.processor.tokenizer(answer, add_special_tokens=False)["input_ids"] if isinstance(answer, str) else []
    if len(ids) != 1:
        raise InputError(f"{who}: the answer {answer!r} must be one token (an id or a one-token string)")
    return int(ids[0])


def logit_diff_of(vlm, resid, a: int, b: int):
    """``logit[a] - logit[b]`` of final residuals ``resid`` (n, d) through the model's final norm and unembedding."""
    norm, unembed = vlm.final_norm, vlm.unembed
    w = unembed.weight
    with torch.no_grad():
        h = norm(resid.to(device=w.device, dtype=w.dtype))
        logits = unembed(h).float()
        cap = vlm.adapter.logit_softcap_value()  # the model's logit cap after lm_head (Gemma 4), else None
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
    return (logits[:, a] - logits[:, b]).cpu()


def direct_logit_attribution(vlm, image, prompt, *, a, b, layers=None, batch_size: int = 64, remote=False):
    """Direct effect of each head's reading of the visual tokens on ``logit[a] - logit[b]`` (module doc); a pandas
    table with ``layer``, ``head`` (-1: the whole layer), ``dla``, ``delta_norm`` (|delta|), ``ld_clean``. Needs
    eager attention (``mv.load(..., attn_implementation="eager")``)."""
    import pandas as pd

    from .interventions import HeadKnockout

    a, b = _answer_id(vlm, a, "direct_logit_attribution"), _answer_id(vlm, b, "direct_logit_attribution")
    n_heads = vlm.hf.config.get_text_config().num_attention_heads
    layers = list(range(vlm.n_layers)) if layers is None else [int(i) % vlm.n_layers for i in layers]
    per_layer = n_heads + 1  # each head alone, then the whole layer
    k = max(1, (batch_size - 1) // per_layer)  # layers per forward
    last = f"blocks.{vlm.n_layers - 1}.hook_resid_post"
    records = []
    for c in range(0, len(layers), k):
        chunk = layers[c:c + k]
        n_rows = 1 + per_layer * len(chunk)
        _, batch = next(batches(vlm, [image] * n_rows, [prompt] * n_rows, batch_size=n_rows))
        ivs, where = [], []
        for j, layer in enumerate(chunk):
            for h in range(per_layer):
                r = 1 + j * per_layer + h
                heads = [h] if h < n_heads else list(range(n_heads))
                ivs.append(HeadKnockout({layer: heads}, kind="vt", rows=[r]))
                where.append((layer, h if h < n_heads else -1, r))
        sites = sorted({f"blocks.{layer}.hook_attn_out" for layer in chunk} | {last},
                       key=lambda s: vlm.adapter.site(s)[0])
        probe = _LastPosition(sites)
        raw = forward(vlm, batch, probes=[probe], interventions=ivs, remote=remote)[probe]
        x = raw[last][0:1]
        ld_clean = float(logit_diff_of(vlm, x, a, b)[0])
        for layer, h, r in where:
            attn = raw[f"blocks.{layer}.hook_attn_out"]
            delta = attn[0:1] - attn[r:r + 1]
            dla = ld_clean - float(logit_diff_of(vlm, x - delta, a, b)[0])
            records.append({"layer": layer, "head": h, "dla": dla, "delta_norm": float(delta.norm()),
                            "ld_clean": ld_clean})
    return pd.DataFrame(records)


# ---- attribution patching: gradient x activation difference ------------------------------------------------------

class _GradientTimesDelta(Probe):
    """At each LM site: keeps the live value; at ``unembed.hook_out``: each row's ``logit[a] - logit[b]`` at its last
    position and, with ONE backward (``torch.autograd.grad``, inside the trace), per site and per patched token
    ``grad(LD_target) . (act_source - act_target)`` (the first-order change of the target's LD if that token's
    value were patched from the source). Reduced in the trace; live tensors never leave it."""

    name = "gradient_times_delta"

    def __init__(self, sites, dst, src, a, b):
        self.site_names = list(sites)
        self._ex = {"dst": dst, "src": src, "a": a, "b": b}

    def sites(self, vlm):
        return self.site_names + ["unembed.hook_out"]

    def extras(self, vlm, batch):
        return self._ex

    def at(self, site, value, ctx, out):
        from .probes.metrics import last_logits

        if site != "unembed.hook_out":
            out.setdefault("live", {})[site] = value
            return
        mine = ctx["mine"]
        logits = last_logits(value, ctx)
        a, b = mine["a"].to(value.device), mine["b"].to(value.device)
        ld = (logits.gather(1, a[:, None]) - logits.gather(1, b[:, None]))[:, 0]
        live = out.pop("live")
        names = list(live)
        grads = torch.autograd.grad(ld.sum(), [live[n] for n in names])  # rows are independent: d LD_r / d act_r
        d, s = mine["dst"].to(value.device), mine["src"].to(value.device)
        for n, g in zip(names, grads):
            act = live[n].detach()
            delta = (act[s[:, 0], s[:, 1]] - act[d[:, 0], d[:, 1]]).float()
            out[n] = (g[d[:, 0], d[:, 1]].float() * delta).sum(-1).detach().clone()
        out["ld"] = ld.detach().clone()


def attribution_patching(vlm, pairs, variants, *, batch_size: int = 64, remote=False, progress: bool = False):
    """The first-order estimate of :func:`mech_vtokens.patching.patch_sweep` (same ``pairs`` and ``variants``) from
    ONE forward and ONE backward per batch of pairs (rows: source, target): per variant, ``estimate`` = the sum over
    its tokens of ``grad(LD_target) . (act_source - act_target)`` ~ ``LD_patched - LD_target``, and
    ``recovered`` = estimate / (LD_source - LD_target). LM sites only (residual / sublayer sites, ``hook_embed``).

    Where it fails: it is linear in the activation difference, so it is right for small differences and for sites
    whose downstream map is close to linear; a patch that flips the answer (large difference, saturating softmax
    or attention) can be under- or over-estimated, and an effect that only appears when several tokens change
    together (the tokens' gradients are each taken at the clean target) is missed. Gradients run inside the trace
    (``remote="local"`` works); NDIF's sandboxed runner may refuse autograd, so remote use is not promised."""
    import pandas as pd

    from .token_sets import as_token_set

    pairs = list(pairs)
    if not pairs:
        raise InputError("attribution_patching: give at least one PatchPair")
    per_pair = [list(variants(p)) if callable(variants) else list(variants) for p in pairs]
    sites = sorted({v.site for vs in per_pair for v in vs}, key=lambda s: vlm.adapter.site(s)[0])
    for s in sites:
        info = vlm.adapter.parse_site(s)
        per_token = info.kind == "embed" or (info.kind == "block" and info.hook not in ("hook_inputs",
                                                                                          "attn.hook_pattern"))
        if not per_token:
            raise InputError(f"attribution_patching: {s!r} is not a residual-stream / sublayer site of the LM; use "
                             f"hook_embed or blocks.{{i}}.hook_resid_pre / hook_attn_out / hook_resid_mid / "
                             f"hook_mlp_out / hook_resid_post")
    k = max(1, batch_size // 2)
    images, prompts = [], []
    for p in pairs:
        images += [p.source, p.target]
        prompts += [vlm.prompt(p.question)] * 2
    records = []
    for start, batch in batches(vlm, images, prompts, batch_size=2 * k, progress=progress, desc="attribution"):
        first = start // 2
        chunk = pairs[first:first + k]
        vpos, row_of = batch.visual_positions, batch.visual_positions[:, 0]
        dst, src, a, b = [], [], [], []
        for j, p in enumerate(chunk):
            dst.append(vpos[row_of == 2 * j + 1])
            src.append(vpos[row_of == 2 * j])
            a += [_answer_id(vlm, p.source_answer, "attribution_patching")] * 2
            b += [_answer_id(vlm, p.target_answer, "attribution_patching")] * 2
        dst, src = torch.cat(dst), torch.cat(src)
        if len(dst) != len(src):
            raise InputError("attribution_patching: source and target images must have the same token grid")
        probe = _GradientTimesDelta(sites, dst, src, torch.tensor(a), torch.tensor(b))
        raw = forward(vlm, batch, probes=[probe], remote=remote)[probe]
        tgt_index = torch.cat([(row_of == 2 * j + 1).nonzero().flatten() for j in range(len(chunk))])
        for j, p in enumerate(chunk):
            ld_s, ld_t = float(raw["ld"][2 * j]), float(raw["ld"][2 * j + 1])
            for var in per_pair[first + j]:
                sel = as_token_set(var.tokens).visual(batch)[tgt_index] & (row_of[tgt_index] == 2 * j + 1)
                est = float(raw[var.site][sel].sum())
                records.append({"pair": first + j, "site": var.site, "layer": vlm.adapter.parse_site(var.site).layer,
                                "region": var.label, "ld_source": ld_s, "ld_target": ld_t, "estimate": est,
                                "recovered": est / (ld_s - ld_t) if ld_s != ld_t else float("nan")})
    from .site_names import site_column

    df = pd.DataFrame(records)
    df["site"] = site_column(df["site"].astype(str), vlm.adapter.forward_order)
    return df
