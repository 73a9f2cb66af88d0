"""Core: loading, visual positions, geometry, sites equal plain HF, one forward for any component list, remote."""

import pytest
import torch

import mech_vtokens as mv
from mech_vtokens import testing as T
from mech_vtokens.component import Probe
from mech_vtokens.probes.activations import Activations

import families as F

FAMILIES = T.FAMILIES

# Non-square images so rows/cols and crop/resize offsets cannot be confused.
SIZES = [(150, 110), (224, 224)]


def _batch(vlm, family, markers=None):
    imgs = [T.image(112, seed=i).resize(s) for i, s in enumerate(SIZES)]
    if markers:
        import numpy as np
        from PIL import Image

        out = []
        for im, box in zip(imgs, markers):
            if box is not None:
                a = np.array(im)
                x0, y0, x1, y1 = (int(round(v)) for v in box)
                a[y0:y1, x0:x1] = [255, 0, 255]
                im = Image.fromarray(a)
            out.append(im)
        imgs = out
    prompts = [F.prompt(vlm, family), F.prompt(vlm, family, "how many objects are there ?")]
    return imgs, prompts


def _hf_reference(vlm, inputs):
    """Every LM site by plain torch forward hooks + output_hidden_states, no nnsight."""
    hf, ad = vlm.hf, vlm.adapter
    from mech_vtokens.adapters.base import _resolve

    got, hooks = {}, []

    def hook(name, index=None, use_input=False):
        def fn(mod, args, kwargs, out):
            if use_input:
                got[name] = (args[0] if args else next(iter(kwargs.values()))).detach().clone()
            else:
                got[name] = (out[index] if index is not None else out).detach().clone()
        return fn

    def pre(name):  # a decoder layer's hidden-state input (resid_pre: after any injection between layers)
        def fn(mod, args, kwargs):
            got[name] = (args[0] if args else kwargs["hidden_states"]).detach().clone()
        return fn

    def injected(mod, args, kwargs):  # what the LM call adds between layers (Qwen3-VL DeepStack), scattered
        rows, mask = kwargs.get("deepstack_visual_embeds"), kwargs.get("visual_pos_masks")
        for i, r in enumerate(rows or []):
            full = torch.zeros_like(kwargs["inputs_embeds"])
            full[mask] = r.to(full.dtype)
            got[f"blocks.{i}.hook_deepstack"] = full

    layers = _resolve(hf, ad.decoder_layers)
    hooks.append(_resolve(hf, ad.language_model).register_forward_pre_hook(injected, with_kwargs=True))
    for i, layer in enumerate(layers):
        hooks.append(layer.register_forward_pre_hook(pre(f"blocks.{i}.hook_resid_pre"), with_kwargs=True))
        if hasattr(layer, "pre_feedforward_layernorm"):  # sandwich norms (Gemma 3): what is added to the residual
            hooks.append(layer.post_attention_layernorm.register_forward_hook(hook(f"blocks.{i}.hook_attn_out"),
                                                                              with_kwargs=True))
            hooks.append(layer.post_feedforward_layernorm.register_forward_hook(hook(f"blocks.{i}.hook_mlp_out"),
                                                                                with_kwargs=True))
            hooks.append(layer.pre_feedforward_layernorm.register_forward_hook(
                hook(f"blocks.{i}.hook_resid_mid", use_input=True), with_kwargs=True))
            continue
        if hasattr(layer, "post_self_attn_layernorm"):  # GLM-4 sandwich norms: post_attention_layernorm is pre-MLP
            hooks.append(layer.post_self_attn_layernorm.register_forward_hook(hook(f"blocks.{i}.hook_attn_out"),
                                                                              with_kwargs=True))
            hooks.append(layer.post_mlp_layernorm.register_forward_hook(hook(f"blocks.{i}.hook_mlp_out"),
                                                                        with_kwargs=True))
            hooks.append(layer.post_attention_layernorm.register_forward_hook(
                hook(f"blocks.{i}.hook_resid_mid", use_input=True), with_kwargs=True))
            continue
        hooks.append(layer.self_attn.register_forward_hook(hook(f"blocks.{i}.hook_attn_out", 0), with_kwargs=True))
        hooks.append(layer.mlp.register_forward_hook(hook(f"blocks.{i}.hook_mlp_out"), with_kwargs=True))
        hooks.append(layer.post_attention_layernorm.register_forward_hook(
            hook(f"blocks.{i}.hook_resid_mid", use_input=True), with_kwargs=True))
    for i, block in enumerate(_resolve(hf, ad.vision_layers)):
        hooks.append(block.register_forward_hook(hook(f"vision.blocks.{i}.hook_resid_post"), with_kwargs=True))
    hooks.append(_resolve(hf, ad.projector).register_forward_hook(hook("vision_projector.hook_out"), with_kwargs=True))
    hooks.append(_resolve(hf, ad.final_norm).register_forward_hook(hook("ln_final.hook_normalized"),
                                                                 with_kwargs=True))
    try:
        with torch.no_grad():
            out = hf(**inputs, output_hidden_states=True)
    finally:
        for h in hooks:
            h.remove()
    hs = out.hidden_states
    got["hook_embed"] = hs[0]
    assert torch.equal(got["blocks.0.hook_resid_pre"], hs[0])
    for i in range(ad.n_layers):
        if i + 1 < ad.n_layers:  # output_hidden_states: each layer's OUTPUT (before an injection after it)
            got[f"blocks.{i}.hook_resid_post"] = hs[i + 1]
    got["unembed.hook_out"] = out.logits
    return got


@pytest.mark.parametrize("family", F.ALL)
def test_visual_positions_equal_processor(tiny_vlm, family):
    vlm = tiny_vlm(family)
    imgs, prompts = _batch(vlm, family)
    batch = vlm.prepare(imgs, prompts)
    ids = batch.inputs["input_ids"]
    # independent: the processor's own expansion of the placeholder, row by row, unbatched
    for row, (im, p) in enumerate(zip(imgs, prompts)):
        single = vlm.processor(text=[p], images=[im], return_tensors="pt")
        n_single = int((single["input_ids"] == vlm.hf.config.image_token_id).sum())
        assert int(batch.visual_mask[row].sum()) == n_single
    assert torch.equal(batch.visual_mask, ids == vlm.hf.config.image_token_id)
    # padding-aware: rows are left-padded, visual positions never fall on padding
    assert bool((batch.inputs["attention_mask"][batch.visual_mask] == 1).all())
    # anyres grids (base + canvas + newlines) state their token count; the others are rows x cols x tiles
    expected = sum(g["tokens"] if "tokens" in g else g["rows"] * g["cols"] * g["tiles"] for g in batch.grids)
    assert batch.n_visual == expected == len(batch.tokens["image"])


@pytest.mark.parametrize("family", F.FAMILIES_AND_ONE_REAL)
def test_geometry_marker_lands_in_the_declared_token(tiny_vlm, family):
    """A marker drawn inside one token's box changes that token's projector output / LM input the most."""
    vlm = tiny_vlm(family)
    imgs, prompts = _batch(vlm, family)
    clean = vlm.prepare(imgs, prompts)
    tok = clean.tokens
    # per image, an off-diagonal token of its first tile (chosen so raster and Qwen2.5 window order differ)
    targets, markers = [], []
    for i, (want_r, want_c) in enumerate([(1, 0), (2, 3)]):
        idx = [j for j in range(len(tok["image"])) if tok["image"][j] == i and tok["tile"][j] in (-1, 0)
               and tok["row"][j] == want_r and tok["col"][j] == want_c][0]
        x0, y0, x1, y1 = tok["box"][idx].tolist()
        cx, cy, hw, hh = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 4, (y1 - y0) / 4
        markers.append((cx - hw, cy - hh, cx + hw, cy + hh))
        targets.append(idx)
    imgs_m, _ = _batch(vlm, family, markers)
    marked = vlm.prepare(imgs_m, prompts)
    sites = ["vision.blocks.0.hook_resid_post", "vision_projector.hook_out", "hook_embed"]
    a = mv.run(vlm, imgs, prompts, probes=[Activations(sites)])["activations"]
    b = mv.run(vlm, imgs_m, prompts, probes=[Activations(sites)])["activations"]
    d = vlm.hf.config.get_text_config().hidden_size
    lm_change = (a["hook_embed"][clean.visual_mask] - b["hook_embed"][marked.visual_mask]).norm(dim=-1)
    proj_change = (a["vision_projector.hook_out"].reshape(-1, d)
                   - b["vision_projector.hook_out"].reshape(-1, d)).norm(dim=-1)
    vis = a["vision.blocks.0.hook_resid_post"]
    vis_change = (vis.reshape(-1, vis.shape[-1]) - b["vision.blocks.0.hook_resid_post"].reshape(-1, vis.shape[-1]))
    vis_change = vis_change.norm(dim=-1)
    for i, t in enumerate(targets):
        in_image = (tok["image"] == i).nonzero().flatten()
        tiles = tok["tile"][in_image]
        same_tile = in_image[tiles == tok["tile"][t]]
        assert int(same_tile[lm_change[same_tile].argmax()]) == t, f"image {i}: LM-input change peaks elsewhere"
        prow = tok["projector_rows"][same_tile]
        assert int(prow[proj_change[prow].argmax()]) == int(tok["projector_rows"][t])
        vrows = tok["vision_rows"][same_tile].flatten()
        assert int(vrows[vis_change[vrows].argmax()]) in tok["vision_rows"][t].tolist()


@pytest.mark.parametrize("family", F.FAMILIES_AND_ONE_REAL)
def test_every_site_equals_plain_hf(tiny_vlm, family):
    vlm = tiny_vlm(family)
    imgs, prompts = _batch(vlm, family)
    batch = vlm.prepare(imgs, prompts)
    ref = _hf_reference(vlm, batch.inputs)
    res = mv.run(vlm, imgs, prompts, probes=[Activations(list(ref))])["activations"]
    assert torch.equal(res["unembed.hook_out"], ref["unembed.hook_out"]), "logits must be bit-identical"
    for name, want in ref.items():
        got = res[name]
        assert got.shape == want.shape, name
        assert torch.allclose(got.float(), want.float(), atol=1e-6, rtol=0), name
    assert set(ref) >= {f"blocks.{i}.{h}" for i in range(vlm.n_layers - 1) for h in
                        ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post")}
    # vectors injected between layers (Qwen3-VL DeepStack): a site per injected layer, and the decomposition
    # resid_pre[i + 1] = resid_post[i] + injection[i] holds bit for bit (the model's own elementwise add)
    injected = [f"blocks.{i}.{vlm.adapter.injection[0]}" for i in vlm.adapter.injection_layers()]
    assert set(ref) >= set(injected) and set(injected) <= set(vlm.sites)
    for i in vlm.adapter.injection_layers():
        add = ref[f"blocks.{i}.{vlm.adapter.injection[0]}"]
        assert bool((add[batch.visual_mask] != 0).any()) and bool((add[~batch.visual_mask] == 0).all())
        if i + 1 < vlm.n_layers:
            assert torch.equal(ref[f"blocks.{i + 1}.hook_resid_pre"], ref[f"blocks.{i}.hook_resid_post"] + add)
            assert not torch.equal(ref[f"blocks.{i + 1}.hook_resid_pre"], ref[f"blocks.{i}.hook_resid_post"])


class _EveryLayer(Probe):
    """A dummy probe that reads every LM layer output (resid_post) and records the mean."""

    def __init__(self, hook):
        self.hook = hook

    def sites(self, vlm):
        return [f"blocks.{i}.{self.hook}" for i in range(vlm.n_layers)]

    def at(self, site, value, ctx, out):
        out[site] = value.float().mean()

    def collect(self, raw, batch, vlm):
        return {k: float(v) for k, v in raw.items()}


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_two_full_depth_probes_any_order_one_forward(tiny_vlm, family):
    vlm = tiny_vlm(family)
    imgs, prompts = _batch(vlm, family)
    p1, p2 = _EveryLayer("hook_resid_post"), _EveryLayer("hook_attn_out")
    calls = []
    hook = vlm.hf.get_input_embeddings().register_forward_hook(lambda *a: calls.append(1))
    try:
        r12 = mv.run(vlm, imgs, prompts, probes=[p1, p2])
        r21 = mv.run(vlm, imgs, prompts, probes=[p2, p1])
    finally:
        hook.remove()
    assert len(calls) == 2, "each run must be exactly one forward"
    assert r12[p1] == r21[p1] and r12[p2] == r21[p2]
    assert list(r12) == ["every_layer", "every_layer_1"]  # keys in list order
    assert len(r12[p1]) == vlm.n_layers


@pytest.mark.parametrize("family", F.FAMILIES_AND_ONE_REAL)
def test_remote_local_identical(tiny_vlm, family):
    vlm = tiny_vlm(family)
    imgs, prompts = _batch(vlm, family)
    sites = ["hook_embed", "blocks.-1.hook_resid_post", "unembed.hook_out"]
    a = mv.run(vlm, imgs, prompts, probes=[Activations(sites)])["activations"]
    b = mv.run(vlm, imgs, prompts, probes=[Activations(sites)], remote="local")["activations"]
    for s in a.values:
        assert torch.equal(a[s], b[s]), s


def test_user_trace_composition(tiny_vlm):
    """Components also run inside a user's own trace, next to the user's own reads."""
    import nnsight

    vlm = tiny_vlm("llava")
    imgs, prompts = _batch(vlm, "llava")
    batch = vlm.prepare(imgs, prompts)
    exp = vlm.experiment(batch, probes=[Activations(["blocks.0.hook_resid_post"])])
    with vlm.trace(**batch.inputs):
        raw = nnsight.save(exp.execute(vlm.model))
        mine = nnsight.save(vlm.model.model.language_model.layers[1].output)
    acts = exp.results(raw)["activations"]
    ref = _hf_reference(vlm, batch.inputs)
    assert torch.equal(acts["blocks.0.hook_resid_post"], ref["blocks.0.hook_resid_post"])
    assert torch.equal(mine, ref["blocks.1.hook_resid_post"])


def test_load_in_memory_and_repr(tiny_dir):
    model, proc = T.build("qwen2_vl")
    vlm = mv.load(model, proc)
    assert vlm.family == "qwen2_vl" and vlm.n_layers == 3 and vlm.hf is model
    assert vlm.sites[0] == "vision.blocks.0.hook_resid_post" and vlm.sites[-1] == "unembed.hook_out"
    assert vlm.embedding_matrix.shape == (len(proc.tokenizer), 64)
    # nnsight's own API stays reachable
    assert hasattr(vlm, "trace") and hasattr(vlm.model, "generate")


def test_nnsight_generate_passthrough(tiny_vlm):
    """``with vlm.generate(...)`` is nnsight's own generate and equals HF greedy generate."""
    import nnsight

    vlm = tiny_vlm("llava")
    imgs, prompts = _batch(vlm, "llava")
    batch = vlm.prepare(imgs, prompts)
    with vlm.generate(**batch.inputs, max_new_tokens=3, do_sample=False) as tracer:
        out = nnsight.save(tracer.result)
    with torch.no_grad():
        ref = vlm.hf.generate(**batch.inputs, max_new_tokens=3, do_sample=False)
    assert torch.equal(out, ref)
