"""Interventions (interventions/): each does exactly what it says, agrees with an independent hand-patched HF forward
on all four tiny families, leaves no residue, composes with the others and with probes, and works in generate."""

from __future__ import annotations

import math

import nnsight
import pytest
import torch

from mech_vtokens.interventions import (AllVisual, Complement, Group, MatchedRandom, Positions, Prune, Rescale,
                                        ZeroSublayer, applied, resolve)
from mech_vtokens import InputError
from mech_vtokens import testing as T
from intervention_refs import batch_of, clean_lm_kwargs, lm_hidden, lm_of, nn_run
import families as FM
from mech_vtokens.probes.activations import Activations

FAMILIES = T.FAMILIES
TOL = 1e-5
# + a real-file fixture (real config / processor / tokenizer / vocab; 16 visual tokens per test image), loaded in fp32
# because these references hold to fp32 tolerances (TOL)
WITH_REAL = FAMILIES + ("Qwen/Qwen2-VL-2B-Instruct@float32",)


# ---- independent references: plain HF modules and torch hooks, written here ----------------------------------

def lm_logits(vlm, embeds, am, pos, **injected):
    """The LM on given inputs; ``injected``: Qwen3-VL's DeepStack kwargs (visual_pos_masks, deepstack_visual_embeds)
    for these positions; Gemma 3's token_type_ids (through the HF wrapper, which builds its masks from them)."""
    with torch.no_grad():
        logits = vlm.hf.lm_head(lm_hidden(vlm, embeds, am, pos, **injected))
    cap = vlm.hf.config.get_text_config().final_logit_softcapping if vlm.family == "gemma4" else None
    return logits if cap is None else torch.tanh(logits / cap) * cap  # Gemma 4 caps its logits after lm_head


def kept_injections(clean, r, keep):
    """Row ``r``'s DeepStack kwargs for its kept columns ``keep`` (a list), by hand: the mask at those columns and the
    packed rows of the visual tokens among them, in order; {} for a model without DeepStack."""
    rows, mask = clean.get("deepstack_visual_embeds"), clean.get("visual_pos_masks")
    if rows is None:
        return {}
    off = int(mask[:r].sum())
    vis = mask[r].nonzero().flatten().tolist()  # the row's visual columns, in packed-row order
    mine = [off + vis.index(j) for j in keep if mask[r, j]]
    return {"visual_pos_masks": mask[r:r + 1, keep], "deepstack_visual_embeds": [p[mine] for p in rows]}


def with_hooks(vlm, batch, hooks):
    """Logits of a plain HF forward with (module, kind, fn) torch hooks installed, then removed."""
    handles = []
    try:
        for mod, kind, fn in hooks:
            handles.append(mod.register_forward_hook(fn) if kind == "out" else
                           mod.register_forward_pre_hook(fn, with_kwargs=True))
        with torch.no_grad():
            return vlm.hf(**batch.inputs).logits
    finally:
        for h in handles:
            h.remove()





def layer(vlm, i):
    return vlm.hf.get_decoder().layers[i]


def hook_snapshot(module):
    """Every torch hook on the model (transformers / nnsight install some of their own)."""
    return [(name, tuple(m._forward_hooks), tuple(m._forward_pre_hooks)) for name, m in module.named_modules()]


# ---- token sets ------------------------------------------------------------------------------------------------

def test_token_sets(tiny_vlm):
    vlm = tiny_vlm("llava")
    b = batch_of(vlm, "llava")
    n = b.n_visual
    assert resolve(AllVisual(), b).equal(b.visual_mask)
    m = resolve(Positions([0, 5]), b)
    assert m.sum() == 2 and m[tuple(b.visual_positions[5])]
    r, p = b.visual_positions[7].tolist()
    assert resolve(Positions([(r, p)]), b).equal(resolve(Positions([7]), b))
    g = torch.zeros(n, dtype=torch.bool)
    g[::4] = True
    assert resolve(Group(g), b).sum() == g.sum()
    assert resolve(Group([1, 2]), b).equal(resolve(Positions([1, 2]), b))
    c = resolve(Complement(Group(g)), b)
    assert not (c & resolve(Group(g), b)).any() and (c | resolve(Group(g), b)).equal(b.visual_mask)
    ctrl = MatchedRandom(Group(g), seed=3)
    mr = resolve(ctrl, b)
    assert not (mr & resolve(Group(g), b)).any()
    for img in range(2):  # same count per image
        sel = b.tokens["image"] == img
        assert int(ctrl.visual(b)[sel].sum()) == int(g[sel].sum())
    assert mr.equal(resolve(MatchedRandom(Group(g), seed=3), b))
    assert not mr.equal(resolve(MatchedRandom(Group(g), seed=4), b))
    with pytest.raises(InputError, match="selects no token"):
        resolve(Group(torch.zeros(n, dtype=torch.bool)), b)
    with pytest.raises(InputError, match="outside the visual span"):
        resolve(Positions([n]), b)
    with pytest.raises(InputError, match="not a visual"):
        resolve(Positions([(0, 0)]), b)


# ---- ZeroSublayer ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", WITH_REAL)
def test_zero_sublayer_exact_and_matches_hooks(tiny_vlm, family):
    vlm = tiny_vlm(family)
    b = batch_of(vlm, family)
    sel = resolve(Positions(list(range(0, b.n_visual, 2))), b)
    z = ZeroSublayer(Positions(list(range(0, b.n_visual, 2))), layers=[1], sublayer="both")
    sites = ["blocks.1.hook_attn_out", "blocks.1.hook_mlp_out", "blocks.0.hook_attn_out"]
    logits, res = nn_run(vlm, b, [z], [Activations(sites)])
    acts = res["activations"]

    seen = {}

    def zero_attn(mod, args, out):
        o = out[0].clone()
        o[sel] = 0
        return (o,) + tuple(out[1:])

    def zero_mlp(mod, args, out):
        o = out.clone()
        o[sel] = 0
        seen["mlp"] = o
        return o

    def rec_attn(mod, args, out):
        seen["attn"] = out[0]

    L1 = layer(vlm, 1)
    attn, mlp = L1.self_attn, L1.mlp
    if hasattr(L1, "pre_feedforward_layernorm"):  # sandwich norms (Gemma 3): the sublayer outputs after their norms
        attn, mlp = L1.post_attention_layernorm, L1.post_feedforward_layernorm
    if hasattr(L1, "post_self_attn_layernorm"):  # GLM-4 sandwich norms
        attn, mlp = L1.post_self_attn_layernorm, L1.post_mlp_layernorm
    if attn is not L1.self_attn:
        zero_attn_t, rec_attn_t = zero_attn, rec_attn
        zero_attn = lambda mod, args, out: zero_attn_t(mod, args, (out,))[0]  # noqa: E731
        rec_attn = lambda mod, args, out: rec_attn_t(mod, args, (out,))  # noqa: E731
    ref = with_hooks(vlm, b, [(attn, "out", zero_attn), (attn, "out", rec_attn), (mlp, "out", zero_mlp)])
    assert (logits - ref).abs().max() < TOL
    a, m = acts["blocks.1.hook_attn_out"], acts["blocks.1.hook_mlp_out"]
    assert (a[sel] == 0).all() and (m[sel] == 0).all()
    assert (a[~sel] - seen["attn"][~sel]).abs().max() < TOL and (a[~sel] != 0).any()
    assert (m[~sel] - seen["mlp"][~sel]).abs().max() < TOL
    clean_l0 = nn_run(vlm, b, [], [Activations(["blocks.0.hook_attn_out"])])[1]["activations"]["blocks.0.hook_attn_out"]
    assert torch.equal(acts["blocks.0.hook_attn_out"], clean_l0)  # untouched elsewhere


# ---- Rescale ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", WITH_REAL)
def test_rescale_norm_ratio_and_matches_edited_embeds(tiny_vlm, family):
    vlm = tiny_vlm(family)
    b = batch_of(vlm, family)
    logits, res = nn_run(vlm, b, [Rescale("all", 0.01)], [Activations(["hook_embed"])])
    acts = res["activations"]
    clean = clean_lm_kwargs(vlm, b)
    e, e0 = acts["hook_embed"], clean["inputs_embeds"]
    vm = b.visual_mask
    ratio = e[vm].norm(dim=-1) / e0[vm].norm(dim=-1)
    assert torch.allclose(ratio, torch.full_like(ratio, 0.01), rtol=1e-5)
    assert torch.equal(e[~vm], e0[~vm])

    def edit(mod, args, kwargs):
        x = kwargs["inputs_embeds"].clone()
        x[vm] = x[vm] * 0.01
        return args, {**kwargs, "inputs_embeds": x}

    ref = with_hooks(vlm, b, [(lm_of(vlm), "pre", edit)])
    assert (logits - ref).abs().max() < TOL


# ---- Prune -----------------------------------------------------------------------------------------------------

def prune_reference(vlm, b, sel, clean, positions="original"):
    """Row by row, by hand: drop the selected columns, keep the original position ids (or 0..n-1), run the LM."""
    emb, am, pos = clean["inputs_embeds"], clean["attention_mask"], clean["position_ids"]
    if pos is not None and pos.shape[-2] == 1:  # one row of ids for the whole batch (Gemma 4's wrapper)
        pos = pos.expand(*pos.shape[:-2], emb.shape[0], pos.shape[-1])
    L = emb.shape[1]
    rows = []
    for r in range(emb.shape[0]):
        keep = [j for j in range(L) if not sel[r, j]]
        a = (am[r:r + 1, keep] if am is not None else torch.ones(1, len(keep), dtype=torch.long))
        if positions == "original":
            p = torch.arange(L)[keep][None] if pos is None else pos[..., r:r + 1, keep]
        else:
            p = (a.cumsum(1) - 1).clamp(min=0)
            p = p if pos is None or pos.ndim == 2 else p[None].expand(pos.shape[0], -1, -1)
        tt = {} if clean.get("token_type_ids") is None else {"token_type_ids": clean["token_type_ids"][r:r + 1, keep]}
        if clean.get("per_layer_inputs") is not None:  # Gemma 4's per-layer token embeddings, kept columns only
            tt["per_layer_inputs"] = clean["per_layer_inputs"][r:r + 1, keep]
        rows.append((lm_logits(vlm, emb[r:r + 1, keep], a, p, **kept_injections(clean, r, keep), **tt)[0],
                     a[0].bool(), p))
    return rows


@pytest.mark.parametrize("family", WITH_REAL)
def test_prune_shorter_positions_and_matches_reference(tiny_vlm, family):
    vlm = tiny_vlm(family)
    b = batch_of(vlm, family)
    ts = Positions(list(range(0, b.n_visual, 3)))
    sel = resolve(ts, b)
    clean = clean_lm_kwargs(vlm, b)
    logits, _ = nn_run(vlm, b, [Prune(ts)])
    L = b.visual_mask.shape[1]
    assert logits.shape[1] == L - int(sel.sum(1).min())  # really shorter (rows left-padded to one width)
    for r, (ref, real, _) in enumerate(prune_reference(vlm, b, sel, clean)):
        got = logits[r, -ref.shape[0]:]
        assert (got[real] - ref[real]).abs().max() < TOL

    # the position ids the LM receives (plain-hook harness path, one row: shorter by exactly the set size)
    b1 = vlm.prepare([T.image(seed=1)], [FM.prompt(vlm, family)])
    ts = Positions(list(range(0, b1.n_visual, 3)))
    sel1 = resolve(ts, b1)
    c1 = clean_lm_kwargs(vlm, b1)
    for mode in ("original", "repacked"):
        got = {}

        def grab(mod, args, kwargs):
            got.update(e=kwargs["inputs_embeds"], p=kwargs["position_ids"])

        with applied(vlm, b1, interventions=[Prune(ts, positions=mode)]):
            h = lm_of(vlm).register_forward_pre_hook(grab, with_kwargs=True)  # runs after Prune's hook
            try:
                with torch.no_grad():
                    lg = vlm.hf(**b1.inputs).logits
            finally:
                h.remove()
        keep = ~sel1[0]
        n_keep = int(keep.sum())
        assert got["e"].shape[1] == b1.visual_mask.shape[1] - int(sel1.sum()) == n_keep
        p0 = torch.arange(keep.numel()) if c1["position_ids"] is None else c1["position_ids"]
        want = p0[..., keep] if mode == "original" else torch.arange(n_keep)
        assert torch.equal(got["p"], want.expand_as(got["p"]))
        ref = prune_reference(vlm, b1, sel1, c1, mode)[0][0]
        assert (lg[0] - ref).abs().max() < TOL


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_prune_in_generate_matches_manual_decoding(tiny_vlm, family):
    """HF generate (cached) under applied(Prune) == a hand-written greedy loop on the pruned sequence, no cache,
    positions continuing from the original ones; vlm.model.generate (nnsight) under applied gives the same ids."""
    vlm = tiny_vlm(family)
    b = vlm.prepare([T.image(seed=3)], [T.prompt(family)])
    ts = MatchedRandom(Positions([0, 1, 2, 3]), seed=1)
    sel = resolve(ts, b)
    clean = clean_lm_kwargs(vlm, b)
    steps = 3
    with applied(vlm, b, interventions=[Prune(ts)]):
        with torch.no_grad():
            out = vlm.hf.generate(**b.inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                                  output_logits=True, return_dict_in_generate=True)
    keep = ~sel[0]
    emb = clean["inputs_embeds"][:, keep]
    pos = torch.arange(keep.numel())[None] if clean["position_ids"] is None else clean["position_ids"]
    nxt = pos[..., -1:] + 1
    pos = pos[..., keep]
    embed = vlm.hf.get_input_embeddings()
    for s in range(steps):
        ref = lm_logits(vlm, emb, torch.ones(1, emb.shape[1], dtype=torch.long), pos)[:, -1]
        assert (out.logits[s] - ref).abs().max() < TOL
        tok = out.sequences[:, b.visual_mask.shape[1] + s]
        assert tok.item() == ref.argmax(-1).item()
        emb = torch.cat([emb, embed(tok)[:, None]], 1)
        pos = torch.cat([pos, nxt + s], -1)
    with applied(vlm, b, interventions=[Prune(ts)]):
        with vlm.model.generate(**b.inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False) as tr:
            ids = nnsight.save(tr.result)
    assert torch.equal(ids, out.sequences)


def test_prefill_only_in_generate(tiny_vlm):
    """ZeroSublayer / Rescale act at prefill only: nnsight generate (Experiment path, prefill visited once) and
    applied(...) + HF generate give the same tokens and differ from the clean generation's logits."""
    vlm = tiny_vlm("llava")
    b = batch_of(vlm, "llava")
    ivs = [ZeroSublayer("all", 1, "mlp"), Rescale(Positions([0, 1]), 3.0)]
    g = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False)
    with applied(vlm, b, interventions=ivs):
        with torch.no_grad():
            a = vlm.hf.generate(**b.inputs, **g)
    exp = vlm.experiment(b, interventions=ivs)
    with vlm.model.generate(**b.inputs, **g) as tr:
        exp.execute(vlm.model)
        ids = nnsight.save(tr.result)
    assert torch.equal(a, ids)


# ---- no residue, composition, remote ----------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_no_residue(tiny_vlm, family):
    vlm = tiny_vlm(family)
    b = batch_of(vlm, family)
    before = clean_lm_kwargs(vlm, b)["logits"]
    hooks_before = hook_snapshot(vlm.hf)
    ts = Positions([0, 2, 4])
    for iv in (Prune(ts), ZeroSublayer(ts, [0, 1], "both"), Rescale(ts, 0.01)):
        nn_run(vlm, b, [iv])
        with applied(vlm, b, interventions=[iv]):
            with torch.no_grad():
                vlm.hf(**b.inputs)
    with pytest.raises(RuntimeError, match="boom"):
        exp = vlm.experiment(b, interventions=[Prune(ts), ZeroSublayer(Complement(ts), 1)])
        with vlm.trace(**b.inputs):
            exp.execute(vlm.model)
            raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"):
        with applied(vlm, b, interventions=[Prune(ts)]):
            raise RuntimeError("boom")
    assert hook_snapshot(vlm.hf) == hooks_before
    after = clean_lm_kwargs(vlm, b)["logits"]
    assert torch.equal(before, after)
    with vlm.trace(**b.inputs):
        traced = nnsight.save(vlm.model.output.logits)
    assert torch.equal(traced, before)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "internvl"])
def test_compose_prune_zero_rescale_probe(tiny_vlm, family):
    """One forward with Rescale + Prune + ZeroSublayer + an Activations probe == the sequential hand-hooked
    reference (rescale the embeddings, slice by hand, zero the MLP of layer 1); also with remote='local'."""
    vlm = tiny_vlm(family)
    b = batch_of(vlm, family)
    n = b.n_visual
    pruned, zeroed, scaled = Positions(range(0, n, 4)), Positions(range(1, n, 4)), Positions(range(2, n, 4))
    ivs = [Rescale(scaled, 0.5), Prune(pruned), ZeroSublayer(zeroed, 1, "mlp")]
    probes = [Activations(["blocks.1.hook_mlp_out", "hook_embed"])]
    logits, res = nn_run(vlm, b, ivs, probes)
    acts = res[probes[0]]
    ps, zs, ss = resolve(pruned, b), resolve(zeroed, b), resolve(scaled, b)
    clean = clean_lm_kwargs(vlm, b)
    emb = clean["inputs_embeds"].clone()
    emb[ss] = emb[ss] * 0.5
    assert torch.equal(acts["hook_embed"], emb)  # the probe at hook_embed sees the rescaled, unpruned embeddings
    L = emb.shape[1]
    for r in range(emb.shape[0]):
        keep = [j for j in range(L) if not ps[r, j]]
        zr = zs[r, keep]
        am = clean["attention_mask"][r:r + 1, keep] if clean["attention_mask"] is not None else None
        pos = (torch.arange(L)[keep][None] if clean["position_ids"] is None
               else clean["position_ids"][..., r:r + 1, keep])

        def zero(mod, args, out, zr=zr):
            o = out.clone()
            o[0, zr] = 0
            return o

        h = layer(vlm, 1).mlp.register_forward_hook(zero)
        try:
            ref = lm_logits(vlm, emb[r:r + 1, keep], am, pos)[0]
        finally:
            h.remove()
        real = torch.ones(len(keep), dtype=torch.bool) if am is None else am[0].bool()
        assert (logits[r, -len(keep):][real] - ref[real]).abs().max() < TOL
        mlp = acts["blocks.1.hook_mlp_out"][r, -len(keep):]
        assert (mlp[zr] == 0).all() and (mlp[~zr & real] != 0).any()
    remote_logits, _ = nn_run(vlm, b, ivs, probes, remote="local")
    assert (remote_logits - logits).abs().max() < TOL
    with applied(vlm, b, interventions=ivs):  # the plain-hook harness runs the same plan
        with torch.no_grad():
            hooked = vlm.hf(**b.inputs).logits
    assert (hooked - logits).abs().max() < TOL


def test_applied_on_plain_hf_model(tiny_vlm):
    """applied() takes a bare HF model and the processor's output dict (no nnsight, no VLM)."""
    vlm = tiny_vlm("internvl")
    b = batch_of(vlm, "internvl")
    with applied(vlm.hf, dict(b.inputs), interventions=[Rescale("all", 0.01)]):
        with torch.no_grad():
            got = vlm.hf(**b.inputs).logits
    want, _ = nn_run(vlm, b, [Rescale("all", 0.01)])
    assert (got - want).abs().max() < TOL


def test_applied_old_order_names_the_new_call(tiny_vlm):
    """applied(vlm, batch, *, interventions=) is the package's one shape; the old applied(model, interventions,
    batch) order raises naming the new call (also with the batch left out), before any hook is installed."""
    vlm = tiny_vlm("llava")
    b = batch_of(vlm, "llava")
    for args in [(vlm, [Rescale("all", 0.01)], b), (vlm.hf, [Rescale("all", 0.01)])]:
        with pytest.raises(InputError, match=r"old order: call applied\(vlm_or_model, batch, interventions="):
            with applied(*args):
                pass
    with pytest.raises(InputError, match="did you mean interventions="):
        with applied(vlm, b, intervention=[Rescale("all", 0.01)]):
            pass
    with torch.no_grad():
        clean = vlm.hf(**b.inputs).logits
        with applied(vlm, b, interventions=[Rescale("all", 0.01)]):
            hooked = vlm.hf(**b.inputs).logits
        after = vlm.hf(**b.inputs).logits
    assert not torch.equal(hooked, clean) and torch.equal(after, clean)  # it acted, and its hooks are gone


# ---- bad input -----------------------------------------------------------------------------------------------

def test_bad_input(tiny_vlm):
    vlm = tiny_vlm("llava")
    b = batch_of(vlm, "llava")
    n = b.n_visual
    with pytest.raises(InputError, match="selects no token"):
        vlm.experiment(b, interventions=[Prune(Group(torch.zeros(n, dtype=torch.bool)))])
    with pytest.raises(InputError, match="outside the visual span"):
        vlm.experiment(b, interventions=[ZeroSublayer(Positions([n + 3]), 0)])
    with pytest.raises(InputError, match="out of range"):
        vlm.experiment(b, interventions=[ZeroSublayer("all", vlm.n_layers)])
    for bad in (math.nan, math.inf):
        with pytest.raises(InputError, match="finite"):
            Rescale("all", bad)
    with pytest.raises(InputError, match="also acts on"):
        vlm.experiment(b, interventions=[Prune(Positions([3])), ZeroSublayer(Positions([3, 4]), 0)])
    with pytest.raises(InputError, match="sublayer"):
        ZeroSublayer("all", 0, "ffn")
    with pytest.raises(InputError, match="not a hidden-state site"):
        vlm.experiment(b, interventions=[Rescale("all", 2.0, site="vision_projector.hook_out")])
