"""Activation patching (interventions/patch.py, patch_region.py, mech_vtokens/patching.py): a patched forward equals
a plain-torch forward with the same rows copied by a hand-written hook, on the tiny fixture of every family; the
organism's red -> blue patch flips the colour answer where the object is and not on background."""

from __future__ import annotations

import pytest
import torch

import families as FM
from intervention_refs import eager_weights, lm_of
import mech_vtokens as mv
from mech_vtokens import InputError
from mech_vtokens import testing as T
from mech_vtokens.interventions import PatchActivations, Positions, Region

TOL = 1e-5
BOX = (0.0, 0.0, 40.0, 30.0)  # a corner of the 112-px test image


def _batch(vlm, name):
    p = FM.prompt(vlm, name)
    return vlm.prepare([T.image(seed=1), T.image(seed=2), T.image(seed=3)], [p, p, p])


def _by_hand(batch, row_src, row_dst, box):
    """(dst (row, pos), src (row, pos)) of the tokens whose box overlaps ``box``: the j-th visual token of the
    target row takes the j-th of the source row; computed here from the positions and boxes alone."""
    vpos, boxes = batch.visual_positions, batch.tokens["box"]
    dst_i = (vpos[:, 0] == row_dst).nonzero().flatten()
    src_i = (vpos[:, 0] == row_src).nonzero().flatten()
    def hits(b):
        return min(b[2], box[2]) > max(b[0], box[0]) and min(b[3], box[3]) > max(b[1], box[1])

    keep = [j for j, i in enumerate(dst_i.tolist()) if hits(boxes[i].tolist())]
    return vpos[dst_i[keep]], vpos[src_i[keep]]


def _hooked_logits(vlm, batch, layer, pre, dst, src):
    layers = lm_of(vlm).layers

    def patch(h):
        h = h.clone()
        h[dst[:, 0], dst[:, 1]] = h[src[:, 0], src[:, 1]]
        return h

    def pre_hook(mod, args, kwargs):
        if args:
            return (patch(args[0]),) + tuple(args[1:]), kwargs
        return args, dict(kwargs, hidden_states=patch(kwargs["hidden_states"]))

    def out_hook(mod, args, out):
        return (patch(out[0]),) + tuple(out[1:]) if isinstance(out, tuple) else patch(out)

    h = (layers[layer].register_forward_pre_hook(pre_hook, with_kwargs=True) if pre
         else layers[layer].register_forward_hook(out_hook))
    try:
        with torch.no_grad():
            return vlm.hf(**batch.inputs).logits.float()
    finally:
        h.remove()


@pytest.mark.parametrize("family", FM.FAMILIES)
@pytest.mark.parametrize("site,layer,pre", [("blocks.1.hook_resid_pre", 1, True),
                                            ("blocks.0.hook_resid_post", 0, False)])
def test_patch_equals_hooked_forward(tiny_vlm, family, site, layer, pre):
    vlm = tiny_vlm(family)
    batch = _batch(vlm, family)
    dst, src = _by_hand(batch, 0, 2, BOX)
    assert 0 < len(dst) < int((batch.visual_positions[:, 0] == 2).sum())  # a real region: some tokens, not all
    want = _hooked_logits(vlm, batch, layer, pre, dst, src)
    iv = PatchActivations(site, Region(BOX), {2: 0}).report()
    res = mv.loop.forward(vlm, batch, interventions=[iv], remote="local")
    rows = torch.arange(3)
    am = batch.inputs["attention_mask"]
    last = torch.tensor([int(am[r].nonzero().max()) for r in range(3)])
    got = res[iv].logits
    assert (got - want[rows, last]).abs().max() < TOL
    # the patch did something, and only to row 2 (row 1 shares the target's image but is not patched)
    with torch.no_grad():
        clean = vlm.hf(**batch.inputs).logits.float()[rows, last]
    assert (got[2] - clean[2]).abs().max() > 1e-4
    assert (got[:2] - clean[:2]).abs().max() < TOL


def test_patch_vision_and_projector_sites_llava(tiny_vlm):
    """Vision-block rows and projector rows (through batch.tokens) on LLaVA, against hooks on the CLIP layer and
    the projector written here."""
    vlm = tiny_vlm("llava")
    batch = _batch(vlm, "llava")
    tok = (batch.visual_positions[:, 0] == 2).nonzero().flatten()[[0, 3, 5]]
    j = tok - int((batch.visual_positions[:, 0] < 2).sum())  # their index within the image
    per_img = int((batch.visual_positions[:, 0] == 0).sum())
    cases = [("vision.blocks.0.hook_resid_post", vlm.hf.model.vision_tower.vision_model.encoder.layers[0]
              if hasattr(vlm.hf.model.vision_tower, "vision_model") else vlm.hf.model.vision_tower.encoder.layers[0],
              1), ("vision_projector.hook_out", vlm.hf.model.multi_modal_projector, 0)]
    for site, mod, offset in cases:  # CLIP keeps its CLS row first (offset 1); the projector rows are the tokens'
        def hook(m, a, out, offset=offset):
            t = out[0] if isinstance(out, tuple) else out
            t = t.clone()
            t[2, j + offset] = t[0, j + offset]
            return (t,) + tuple(out[1:]) if isinstance(out, tuple) else t

        h = mod.register_forward_hook(hook, prepend=True)  # before transformers records the hidden state
        try:
            with torch.no_grad():
                want = vlm.hf(**batch.inputs).logits.float()[:, -1]
        finally:
            h.remove()
        iv = PatchActivations(site, Positions(tok.tolist()), {2: 0}).report()
        got = mv.loop.forward(vlm, batch, interventions=[iv])[iv].logits
        assert per_img == 16 or per_img > 0
        assert (got - want).abs().max() < TOL, site


def test_patch_refuses_bad_pairs_before_forward(no_forward):
    vlm = no_forward
    p = T.prompt("llava")
    ims = [T.image(seed=1), T.image(seed=2)]
    with pytest.raises(InputError, match="outside this batch"):
        mv.run(vlm, ims, [p, p], interventions=[PatchActivations("blocks.0.hook_resid_pre", "all", {1: 5})])
    with pytest.raises(InputError, match="from itself"):
        mv.run(vlm, ims, [p, p], interventions=[PatchActivations("blocks.0.hook_resid_pre", "all", {1: 1})])
    with pytest.raises(InputError, match="no per-token"):
        mv.run(vlm, ims, [p, p], interventions=[PatchActivations("unembed.hook_out", "all", {1: 0})])
    with pytest.raises(InputError, match="size"):
        mv.run(vlm, [T.image(seed=1), T.image(size=160, seed=2)], [p, p],
               interventions=[PatchActivations("blocks.0.hook_resid_pre", "all", {1: 0})])
    with pytest.raises(InputError, match="selects no"):
        far = Region((500, 500, 600, 600))
        mv.run(vlm, ims, [p, p], interventions=[PatchActivations("blocks.0.hook_resid_pre", far, {1: 0})])
    with pytest.raises(InputError, match="x1 > x0"):
        Region((10, 10, 5, 20))


def test_organism_red_into_blue_flips_where_the_object_is():
    """The issue's test on 6 seeded pairs of the shipped organism: patching the object's tokens of the RED image into
    the BLUE scene before layer 1 recovers most of the logit difference and flips the answer; a background box of
    the same size does not; after layer 1 patching visual tokens no longer matters."""
    from mech_vtokens.organism import checkpoint_path
    from mech_vtokens.patching import Variant, organism_colour_pairs, patch_sweep

    vlm = mv.load(str(checkpoint_path()))
    pairs = organism_colour_pairs(6, seed=1)
    sites = ["blocks.0.hook_resid_post", "blocks.2.hook_resid_post"]
    res = patch_sweep(vlm, pairs, lambda p: [Variant(s, Region(p.regions[r]), r) for s in sites
                                             for r in ("object", "background")], batch_size=36)
    s = res.summary().set_index(["site", "region"])
    early = s.loc[("blocks.0.hook_resid_post", "object")]
    assert early["recovered"] > 0.8 and early["flipped"] >= 0.5
    assert abs(s.loc[("blocks.0.hook_resid_post", "background")]["recovered"]) < 0.1
    assert abs(s.loc[("blocks.2.hook_resid_post", "object")]["recovered"]) < 0.2
    assert len(res.to_pandas()) == 6 * 4


# ---- per head: HeadKnockout and direct logit attribution -------------------------------------------------------

def _eager_pair(tiny_dir, family):
    """(the package's eager VLM, a fresh plain HF eager model for the monkey-patched reference: nnsight's .source
    instruments an attention module for good, so the reference must not share it)."""
    vlm = mv.load(tiny_dir(family), attn_implementation="eager")
    hf = type(vlm.hf).from_pretrained(tiny_dir(family), attn_implementation="eager").eval()
    return vlm, hf


def _patched_eager(hf, monkeypatch, layer, edit):
    """Replace the family's eager attention function by plain torch; at ``layer`` call ``edit(w, v)`` on the
    post-softmax weights (batch, head, q, k) and the repeated values, which returns the weights to use."""
    import sys

    lm = lm_of(hf)
    mod = sys.modules[type(lm.layers[0]).__module__]  # (a hybrid LM's layer 0 may have no self_attn)
    orig = mod.eager_attention_forward
    target = lm.layers[layer].self_attn

    def eager(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        if module is not target:
            return orig(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        w, v = eager_weights(query, key, value, attention_mask, scaling)
        w = edit(w, v)
        return (w @ v).transpose(1, 2).contiguous(), w

    monkeypatch.setattr(mod, "eager_attention_forward", eager)


@pytest.mark.parametrize("family", FM.FAMILIES)
def test_head_knockout_equals_patched_eager(tiny_dir, monkeypatch, family):
    from mech_vtokens.interventions import HeadKnockout

    vlm, hf = _eager_pair(tiny_dir, family)
    batch = _batch(vlm, family)
    heads, layer, row = [0, 1], 1, 2
    vm = batch.visual_mask
    cut = (~vm)[:, :, None] & vm[:, None, :]
    cut[:row] = False  # rows= [2] only
    iv = HeadKnockout({layer: heads}, kind="vt", rows=[row]).report()
    got = mv.loop.forward(vlm, batch, interventions=[iv])[iv].logits

    def edit(w, v):
        hm = torch.zeros(w.shape[1], dtype=torch.bool)
        hm[heads] = True
        return w.masked_fill(cut[:, None] & hm[None, :, None, None], 0.0)

    with monkeypatch.context() as m:
        _patched_eager(hf, m, layer, edit)
        with torch.no_grad():
            ref = hf(**batch.inputs).logits.float()
    am = batch.inputs["attention_mask"]
    last = torch.tensor([int(am[r].nonzero().max()) for r in range(3)])
    ref = ref[torch.arange(3), last]
    assert (got - ref).abs().max() < TOL
    with torch.no_grad():
        clean = hf(**batch.inputs).logits.float()[torch.arange(3), last]
    assert (got[row] - clean[row]).abs().max() > 1e-4 and (got[:row] - clean[:row]).abs().max() < TOL


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "internvl"])
def test_direct_logit_attribution_equals_weights_times_values(tiny_dir, monkeypatch, family):
    """The head's visual-key part of the attention output, by hand: w[last, visual] @ v[visual] for that head,
    through o_proj's weight, removed from the final residual under the model's own norm and lm_head."""
    from mech_vtokens.attribution import direct_logit_attribution

    vlm, hf = _eager_pair(tiny_dir, family)
    tok = vlm.processor.tokenizer
    a, b = tok.convert_tokens_to_ids("red"), tok.convert_tokens_to_ids("blue")
    img, prompt = T.image(seed=4), FM.prompt(vlm, family)
    layer = 1
    df = direct_logit_attribution(vlm, img, prompt, a=a, b=b, layers=[layer]).set_index("head")
    enc = vlm.prepare([img], [prompt])
    vis = enc.visual_mask[0]
    lm = lm_of(hf)
    got = {}

    def edit(w, v):
        got["w"], got["v"] = w.detach().clone(), v.detach().clone()
        return w

    final = {}
    h = lm.layers[-1].register_forward_hook(lambda m, a_, o: final.__setitem__("x", (o[0] if isinstance(o, tuple)
                                                                                     else o)[0, -1].detach()))
    try:
        with monkeypatch.context() as m:
            _patched_eager(hf, m, layer, edit)
            with torch.no_grad():
                hf(**enc.inputs)
    finally:
        h.remove()
    w, v, x = got["w"][0], got["v"][0], final["x"]
    o_w = lm.layers[layer].self_attn.o_proj.weight
    n_heads, dh = w.shape[0], v.shape[-1]

    def ld(resid):
        with torch.no_grad():
            logits = hf.lm_head(lm.norm(resid[None]))[0].float()
        return float(logits[a] - logits[b])

    for head in range(n_heads):
        part = torch.zeros(n_heads * dh)
        part[head * dh:(head + 1) * dh] = w[head, -1, vis] @ v[head, vis]
        delta = part @ o_w.T
        want = ld(x) - ld(x - delta)
        assert abs(df.loc[head, "dla"] - want) < TOL, (head, df.loc[head, "dla"], want)
    assert df["delta_norm"].max() > 1e-3


# ---- attribution patching --------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "qwen3_vl"])
def test_attribution_patching_equals_autograd_on_hf(tiny_vlm, family):
    """grad(LD_target) . (act_source - act_target) summed over the region's tokens, by hand: plain HF forward with
    grad, hooks keeping the layer output, torch.autograd.grad of the target row's logit difference."""
    from mech_vtokens.attribution import attribution_patching
    from mech_vtokens.patching import PatchPair, Variant

    vlm = tiny_vlm(family)
    tok = vlm.processor.tokenizer
    a, b = tok.convert_tokens_to_ids("red"), tok.convert_tokens_to_ids("blue")
    q = "what color is the object ?"
    pair = PatchPair(T.image(seed=1), T.image(seed=2), q, a, b, {"box": BOX})
    layer = 1
    site = f"blocks.{layer}.hook_resid_post"
    est = attribution_patching(vlm, [pair], [Variant(site, Region(BOX), "box")], remote="local")
    batch = vlm.prepare([pair.source, pair.target], [vlm.prompt(q)] * 2)
    dst, src = _by_hand(batch, 0, 1, BOX)
    kept = {}

    def grab(mod, args, out):
        kept["h"] = out[0] if isinstance(out, tuple) else out

    h = lm_of(vlm).layers[layer].register_forward_hook(grab)
    try:
        logits = vlm.hf(**batch.inputs).logits.float()
    finally:
        h.remove()
    last = int(batch.inputs["attention_mask"][1].nonzero().max())
    ld = logits[1, last, a] - logits[1, last, b]
    (g,) = torch.autograd.grad(ld, [kept["h"]])
    act = kept["h"].detach()
    want = float((g[dst[:, 0], dst[:, 1]] * (act[src[:, 0], src[:, 1]] - act[dst[:, 0], dst[:, 1]])).sum())
    assert abs(float(est["estimate"][0]) - want) < 1e-4 * max(1.0, abs(want)) and abs(want) > 1e-6
    assert abs(float(est["ld_target"][0]) - float(ld)) < TOL


# ---- devices -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fam", ["llava", "qwen2_5_vl"])
def test_causal_trace_code_creates_every_tensor_on_the_value_device(tiny_dir, fam):
    """Metrics, PatchActivations (LM, vision, projector sites), HeadKnockout and the attribution probe under the
    device trap of tests/test_devices.py (bf16, eager): no factory call in their trace code lacks device=; results on
    the CPU."""
    from test_devices import DeviceTrap, _tensors

    from mech_vtokens.attribution import attribution_patching, direct_logit_attribution
    from mech_vtokens.interventions import HeadKnockout
    from mech_vtokens.patching import PatchPair, Variant
    from mech_vtokens.probes import AnswerLogProb, ChoiceProb, KLToClean, LogitDiff

    vlm = mv.load(tiny_dir(fam), dtype="bfloat16", attn_implementation="eager")
    ims = [T.image(seed=1), T.image(seed=2), T.image(seed=3)]
    prs = [FM.prompt(vlm, fam)] * 3
    ivs = [PatchActivations(["vision.blocks.0.hook_resid_post", "vision_projector.hook_out",
                             "blocks.1.hook_resid_pre"], Region(BOX), {2: 0}).report(),
           HeadKnockout([0], layers=[1], rows=[1])]
    probes = [AnswerLogProb("red"), LogitDiff("red", "blue"), ChoiceProb(["red", "blue"]), KLToClean(0)]
    pair = PatchPair(ims[0], ims[1], "what color is the object ?", "red", "blue", {"box": BOX})
    trap = DeviceTrap()
    with trap:
        results = list(mv.run(vlm, ims, prs, probes=probes, interventions=ivs).values())
        attribution_patching(vlm, [pair], [Variant("blocks.1.hook_resid_post", Region(BOX), "box")])
        direct_logit_attribution(vlm, ims[0], prs[0], a="red", b="blue", layers=[0])
    assert trap.seen > 0
    assert not trap.hits, "\n".join(sorted(set(trap.hits)))
    for r in results:
        for name, t in _tensors(vars(r)):
            assert t.device.type == "cpu", f"{type(r).__name__}.{name} is on {t.device}"
