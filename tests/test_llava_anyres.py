"""LLaVA-NeXT / LLaVA-OneVision: the anyres geometry (base image, unpadded canvas row by row, newline tokens,
OneVision's bilinear resize and untiled multi-image prompts), token kinds, and the OneVision processor round trip.

Every check is against something the geometry does not compute: HF's own LM input (the features the wrapper
scattered), HF's ``image_newline`` parameter, the processor's own token count, the anyres rules written out here from
the processor's documentation, or a marker painted into the image."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

import mech_vtokens as mv
from mech_vtokens import testing as T
from mech_vtokens.interventions import Complement, Kinds, Prune, resolve
from mech_vtokens.probes.activations import Activations
from mech_vtokens.probes.vit_sinks import ViTSinks
from intervention_refs import clean_lm_kwargs, nn_run

import families as F

ANYRES = ("llava_next", "llava_onevision")
REAL_ANYRES = ("llava-hf/llava-v1.6-mistral-7b-hf", "llava-hf/llava-onevision-qwen2-0.5b-ov-hf")
SIZES = [(150, 110), (224, 224)]  # tiny OneVision: the 224-px image's canvas is resized (anyres_max_3), 150x110 not


def _images(sizes=SIZES, seed=0):
    return [T.image(112, seed=seed + i).resize(s) for i, s in enumerate(sizes)]


def _prompts(vlm, name, n):
    return [F.prompt(vlm, name, q) for q in ("what color is the object ?", "how many objects are there ?")][:n]


def _lm_input(vlm, batch):
    """What HF's LM receives at the visual positions: a plain forward pre-hook on the language model."""
    got = {}
    h = vlm.hf.model.language_model.register_forward_pre_hook(
        lambda m, a, k: got.update(e=k["inputs_embeds"].detach().clone()), with_kwargs=True)
    try:
        with torch.no_grad():
            vlm.hf(**batch.inputs)
    finally:
        h.remove()
    return got["e"][batch.visual_mask]


# ---- the anyres rules, written out from the processor / model documentation (not the geometry code) ------------

def _best_resolution(w, h, pinpoints):
    """select_best_resolution: the (height, width) pinpoint that keeps the most of the image's pixels when the image
    is fitted in, ties broken by the least wasted area."""
    best = None
    for H, W in pinpoints:
        s = min(W / w, H / h)
        eff = min(int(w * s) * int(h * s), w * h)
        waste = H * W - eff
        if best is None or eff > best[0] or (eff == best[0] and waste < best[1]):
            best = (eff, waste, H, W)
    return best[2], best[3]


def _canvas_rule(w, h, pinpoints, side, g, max_tiles=None):
    """(tile_rows, tile_cols, kept token rows (r0, r1), kept cols (c0, c1), out_h, out_w) of an image's canvas:
    tiles of ``side`` px, g x g tokens each; the padding rows / columns cropped as the model's unpad_image does
    (in token units, rounding the scaled side to 7 digits); OneVision resizes above ``max_tiles`` tiles' worth
    (by more than 10 %) to floor(side / ratio)."""
    H, W = _best_resolution(w, h, pinpoints)
    R, C = H // side * g, W // side * g
    if w / h > C / R:
        pad = (R - int(round(h * C / w, 7))) // 2
        rows, cols = (pad, R - pad), (0, C)
    else:
        pad = (C - int(round(w * R / h, 7))) // 2
        rows, cols = (0, R), (pad, C - pad)
    nh, nw = rows[1] - rows[0], cols[1] - cols[0]
    oh, ow = nh, nw
    if max_tiles is not None:
        ratio = math.sqrt(nh * nw / (max_tiles * g * g))
        if ratio > 1.1:
            oh, ow = int(nh // ratio), int(nw // ratio)
    return H // side, W // side, rows, cols, oh, ow


def _rule_for(vlm):
    cfg = vlm.hf.config
    side, g = cfg.vision_config.image_size, cfg.vision_config.image_size // cfg.vision_config.patch_size
    ar = getattr(cfg, "vision_aspect_ratio", None) if vlm.family == "llava_onevision" else None
    max_tiles = int(ar.replace("anyres_max_", "")) if ar else None
    return lambda w, h: _canvas_rule(w, h, cfg.image_grid_pinpoints, side, g, max_tiles), g


# ---- tests ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ANYRES + REAL_ANYRES)
def test_token_order_counts_and_kinds_follow_the_anyres_rules(tiny_vlm, name):
    """Per image: g*g base tokens, then the cropped (resized) canvas row by row, each row closed by a newline; the
    counts equal the processor's own expansion and the rules written out above."""
    vlm = tiny_vlm(name)
    imgs = _images()
    batch = vlm.prepare(imgs, _prompts(vlm, name, 2))
    rule, g = _rule_for(vlm)
    kinds = np.array(batch.kinds)
    tok = batch.tokens
    for i, (w, h) in enumerate(SIZES):
        tr, tc, _, _, oh, ow = rule(w, h)
        want = ["thumbnail"] * (g * g) + (["patch"] * ow + ["newline"]) * oh
        sel = (tok["image"] == i).numpy()
        assert list(kinds[sel]) == want, (name, i)
        assert int(batch.visual_mask[i].sum()) == len(want)
        assert batch.grids[i]["tiles"] == tr * tc + 1 and (batch.grids[i]["rows"], batch.grids[i]["cols"]) == (oh, ow)
        canvas = sel & (kinds == "patch")
        rc = torch.stack([tok["row"][canvas], tok["col"][canvas]], 1).tolist()
        assert rc == [[r, c] for r in range(oh) for c in range(ow)]  # row by row over the WHOLE canvas
        nl = sel & (kinds == "newline")
        assert tok["row"][nl].tolist() == list(range(oh)) and bool(torch.isnan(tok["box"][nl]).all())


@pytest.mark.parametrize("name", ANYRES + REAL_ANYRES)
def test_lm_input_is_the_weighted_projector_rows_and_the_learned_newline(tiny_vlm, name):
    """What HF's LM receives at each visual position = sum_j w_j * projector[rows_j] (one row, weight 1, unless
    OneVision resized the canvas), and HF's ``image_newline`` vector at the newline tokens."""
    from mech_vtokens.adapters.geometry import mix_rows

    vlm = tiny_vlm(name)
    imgs = _images()
    prompts = _prompts(vlm, name, 2)
    batch = vlm.prepare(imgs, prompts)
    act = mv.run(vlm, imgs, prompts, probes=[Activations(["vision_projector.hook_out"])])["activations"]
    proj = act["vision_projector.hook_out"]
    h, present = mix_rows(proj.reshape(-1, proj.shape[-1]), batch.tokens["projector_mix"],
                          batch.tokens["projector_mix_weights"])
    lm_in = _lm_input(vlm, batch)
    newline = np.array(batch.kinds) == "newline"
    assert torch.equal(~present, torch.from_numpy(newline))
    one_row = batch.tokens["projector_mix_weights"].max(-1).values == 1
    assert torch.equal(h[one_row & present], lm_in[one_row & present])  # bit for bit
    mixed = ~one_row & present
    if name == "llava_onevision":
        assert int(mixed.sum()) > 0  # the 224-px image's canvas was resized: tokens mix up to 4 rows
        assert int((batch.tokens["projector_mix_weights"] > 0).sum(-1).max()) <= 4
    dev = float((h[mixed].float() - lm_in[mixed].float()).abs().max()) if bool(mixed.any()) else 0.0
    assert dev <= 1e-6, dev
    nl = vlm.hf.model.image_newline
    assert torch.equal(lm_in[torch.from_numpy(newline)], nl.detach().to(lm_in.dtype).expand(int(newline.sum()), -1))
    w = batch.tokens["vision_weights"]
    assert torch.allclose(w.sum(-1)[present], torch.ones(int(present.sum())), atol=1e-6)


@pytest.mark.parametrize("name", ANYRES)
def test_exactly_the_tokens_with_a_region_depend_on_the_image(tiny_vlm, name):
    """Change every pixel of the images (same sizes: same geometry): the visual tokens whose LM input changes are
    exactly those the geometry gives a box, a vision row and a projector row; the newline tokens keep HF's learned
    vector. (Giving the newline tokens a box or a vision row fails this.)"""
    vlm = tiny_vlm(name)
    prompts = _prompts(vlm, name, 2)
    a = vlm.prepare(_images(seed=0), prompts)
    b_imgs = [Image.fromarray(255 - np.array(im)) for im in _images(seed=0)]
    b = vlm.prepare(b_imgs, prompts)
    changed = (_lm_input(vlm, a) - _lm_input(vlm, b)).abs().amax(-1) > 0
    has_box = ~torch.isnan(a.tokens["box"]).any(-1)
    has_vision_row = (a.tokens["vision_weights"] > 0).any(-1)
    has_projector_row = (a.tokens["projector_mix_weights"] > 0).any(-1) & (a.tokens["projector_rows"] >= 0)
    assert torch.equal(changed, has_box) and torch.equal(changed, has_vision_row)
    assert torch.equal(changed, has_projector_row)
    assert int((~changed).sum()) == a.kinds.count("newline") > 0


@pytest.mark.parametrize("name", ANYRES)
def test_marker_in_a_canvas_token_box_lights_that_token(tiny_vlm, name):
    """A marker painted at the centre of one canvas token's box (the 150x110 image: not resized; OneVision's
    224-px image: resized) changes that token's LM input the most among the canvas tokens of its image."""
    vlm = tiny_vlm(name)
    prompts = _prompts(vlm, name, 2)
    imgs = _images()
    clean = vlm.prepare(imgs, prompts)
    tok, kinds = clean.tokens, np.array(clean.kinds)
    marked, targets = [], []
    for i, im in enumerate(imgs):
        canvas = ((tok["image"] == i).numpy() & (kinds == "patch")).nonzero()[0]
        t = int(canvas[len(canvas) // 3 + 1])  # an inner token, off the first row and column
        x0, y0, x1, y1 = tok["box"][t].tolist()
        cx, cy, hw, hh = (x0 + x1) / 2, (y0 + y1) / 2, max(1.0, (x1 - x0) / 4), max(1.0, (y1 - y0) / 4)
        arr = np.array(im)
        arr[int(round(cy - hh)):int(round(cy + hh)), int(round(cx - hw)):int(round(cx + hw))] = [255, 0, 255]
        marked.append(Image.fromarray(arr))
        targets.append((t, canvas))
    change = (_lm_input(vlm, clean) - _lm_input(vlm, vlm.prepare(marked, prompts))).norm(dim=-1)
    for t, canvas in targets:
        assert int(canvas[int(change[canvas].argmax())]) == t


def test_onevision_multi_image_prompts_are_not_tiled(tiny_vlm):
    """OneVision: an image that shares its prompt is its base tokens plus one newline (the model feeds the vision
    tower its base tile only); a single-image prompt in the same batch is still tiled."""
    vlm = tiny_vlm("llava_onevision")
    imgs = _images()
    nested = [imgs, [T.image(112, seed=5).resize((150, 110))]]
    prompts = [T.prompt("llava_onevision", n_images=2), T.prompt("llava_onevision")]
    batch = vlm.prepare(nested, prompts)
    g = 4
    rule, _ = _rule_for(vlm)
    _, _, _, _, oh, ow = rule(150, 110)
    assert batch.visual_tokens_per_image == [g * g + 1, g * g + 1, g * g + oh * (ow + 1)]
    assert batch.kinds[:g * g + 1] == ["patch"] * (g * g) + ["newline"]  # no canvas: the base IS the image
    from mech_vtokens.adapters.geometry import mix_rows

    act = mv.run(vlm, nested, prompts, probes=[Activations(["vision_projector.hook_out"])])["activations"]
    proj = act["vision_projector.hook_out"]
    assert proj.shape[0] == 1 + 1 + (1 + 4)  # base tiles of the two shared images, then base + 4 tiles
    h, present = mix_rows(proj.reshape(-1, proj.shape[-1]), batch.tokens["projector_mix"],
                          batch.tokens["projector_mix_weights"])
    lm_in = _lm_input(vlm, batch)
    one = batch.tokens["projector_mix_weights"].max(-1).values == 1
    assert torch.equal(h[present & one], lm_in[present & one])


@pytest.mark.parametrize("name", ANYRES)
def test_kinds_token_sets_and_pruning_the_newlines(tiny_vlm, name):
    """``Kinds("newline")`` selects the newline tokens; ``Complement`` the rest; pruning the newlines equals a
    hand-built LM forward without those columns."""
    from test_interventions import prune_reference

    vlm = tiny_vlm(name)
    batch = vlm.prepare(_images(), _prompts(vlm, name, 2))
    kinds = np.array(batch.kinds)
    nl = Kinds("newline").visual(batch)
    assert torch.equal(nl, torch.from_numpy(kinds == "newline"))
    assert torch.equal(Complement(Kinds("newline")).visual(batch), torch.from_numpy(kinds != "newline"))
    assert int(Kinds("patch", "thumbnail").visual(batch).sum()) == batch.n_visual - int(nl.sum())
    with pytest.raises(mv.InputError, match="token kinds"):
        Kinds("separator")
    sel = resolve(Kinds("newline"), batch)
    logits, _ = nn_run(vlm, batch, [Prune(Kinds("newline"))])
    for r, (ref, real, _) in enumerate(prune_reference(vlm, batch, sel, clean_lm_kwargs(vlm, batch))):
        assert float((logits[r, -ref.shape[0]:][real] - ref[real]).abs().max()) < 1e-5


@pytest.mark.parametrize("name", ANYRES)
def test_vit_sinks_and_norms_leave_the_newline_tokens_out(tiny_vlm, name):
    """ViTSinks: a newline token has no vision row, so no norm (NaN) and is no sink; every other token gets the max
    over the rows it is built from."""
    vlm = tiny_vlm(name)
    imgs = _images()
    prompts = _prompts(vlm, name, 2)
    batch = vlm.prepare(imgs, prompts)
    res = mv.run(vlm, imgs, prompts, probes=[ViTSinks(threshold=1.0)])["vit_sinks"]
    nl = torch.from_numpy(np.array(batch.kinds) == "newline")
    assert bool(res.l2[nl].isnan().all()) and not bool(res.sinks[nl].any())
    assert not bool(res.l2[~nl].isnan().any())


@pytest.mark.parametrize("name", ANYRES)
def test_processor_save_load_keeps_every_setting(tiny_dir, tmp_path, name):
    """The processor saved and loaded back through the adapter (the video-less class for OneVision) keeps its own
    init settings, its image processor and its chat template."""
    vlm = mv.load(tiny_dir(name))
    proc = vlm.processor
    proc.chat_template = "{% for m in messages %}{{ m['role'] }}{% endfor %}"
    proc.save_pretrained(tmp_path)
    again = vlm.adapter.load_processor(str(tmp_path))
    keys = ("num_image_tokens", "vision_aspect_ratio", "vision_feature_select_strategy", "image_token",
            "patch_size", "num_additional_image_tokens", "chat_template")
    for k in keys:
        assert getattr(again, k, None) == getattr(proc, k, None), k
    assert again.image_processor.to_dict() == proc.image_processor.to_dict()
    img = _images()[0]
    p = T.prompt(name)
    assert torch.equal(again(text=[p], images=[img], return_tensors="pt")["input_ids"],
                       proc(text=[p], images=[img], return_tensors="pt")["input_ids"])


@pytest.mark.parametrize("name", ANYRES)
def test_partition_calibrates_classifies_and_prunes(tiny_vlm, name):
    """The partition on an anyres model: every visual token (newlines included) gets one group, a newline token is
    never a ViT sink (it has no vision row), and a group's token set prunes exactly its members."""
    from mech_vtokens.partition import calibrate
    from mech_vtokens.partition.partition import GROUPS

    vlm = tiny_vlm(name)
    prompt = T.prompt(name)
    part = calibrate(vlm, [T.image(112, seed=s).resize((150, 110)) for s in range(3)], [prompt] * 3,
                     vit_threshold=1.0)
    img = T.image(112, seed=7).resize((150, 110))
    got = part.classify([img], [prompt])
    batch = vlm.prepare([img], [prompt])
    assert len(got.codes) == batch.n_visual and bool(((got.codes >= 0) & (got.codes < len(GROUPS))).all())
    nl = torch.from_numpy(np.array(batch.kinds) == "newline")
    assert not bool((got.codes[nl] == GROUPS.index("vit_sink")).any())
    group = GROUPS[int(torch.bincount(got.codes).argmax())]
    logits, _ = nn_run(vlm, batch, [Prune(part.token_set(group))])
    assert logits.shape[1] == batch.visual_mask.shape[1] - int((got.codes == GROUPS.index(group)).sum())


@pytest.mark.parametrize("name", ANYRES)
def test_processor_and_model_settings_that_disagree_are_refused_before_the_forward(tiny_dir, name):
    vlm = mv.load(tiny_dir(name))  # its own processor: the test changes it
    img, p = _images()[0], T.prompt(name)
    vlm.processor.image_processor.image_grid_pinpoints = [[56, 56], [56, 112]]
    with pytest.raises(mv.InputError, match="image_grid_pinpoints"):
        vlm.prepare([img], [p])
    with pytest.raises(mv.InputError, match="image_grid_pinpoints"):
        vlm.prepare([img], [p], image_grid_pinpoints=[[112, 112]])  # a call-time setting counts too
    vlm.processor.image_processor.image_grid_pinpoints = vlm.hf.config.image_grid_pinpoints
    vlm.prepare([img], [p])
    if name == "llava_onevision":
        vlm.processor.vision_aspect_ratio = "anyres_max_9"
        with pytest.raises(mv.InputError, match="vision_aspect_ratio"):
            vlm.prepare([img], [p])
