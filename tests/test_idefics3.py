"""Idefics3 / SmolVLM: the tiled + global geometry (boxes, kinds, the pixel-shuffle row map, padding frames), the
settings the processor and the model must share, and Prune of the global image against a hand-built forward.

Every check is against something the geometry does not compute: the processor's own resized canvas and its tiles
(pixel values), the text tokens the processor writes around each run of image tokens, HF's own ``pixel_shuffle``
run on patch indices, HF's connector output and LM input (plain hooks), and a plain LM forward on the shortened
sequence."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import mech_vtokens as mv
from mech_vtokens.errors import InputError
from mech_vtokens.interventions import Kinds, Prune, resolve
from mech_vtokens.probes.vit_sinks import ViTSinks
from intervention_refs import clean_lm_kwargs, nn_run

import families as F

FAMS = ("idefics3", "smolvlm")
REAL = ("HuggingFaceTB/SmolVLM-256M-Instruct", "HuggingFaceTB/SmolVLM2-500M-Video-Instruct")
# odd sizes: landscape, portrait, a thin strip (1 x 2 tiles), one that stays one frame is covered below
ODD = [(150, 97), (61, 203), (213, 45)]


def _noise(w, h, seed=0):
    """Per-pixel noise: a crop off by one pixel differs everywhere."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _processor_canvas(vlm, img):
    """The processor's own resized canvas (its ``resize`` by the longest edge, then ``resize_for_vision_encoder``),
    uint8 CHW: what it cuts the tiles from."""
    from transformers.image_utils import SizeDict

    ip = vlm.processor.image_processor
    arr = np.asarray(img).transpose(2, 0, 1)
    arr = ip.resize(arr, SizeDict(longest_edge=dict(ip.size)["longest_edge"]), resample=ip.resample)
    return ip.resize_for_vision_encoder(arr, ip.max_image_size["longest_edge"], resample=ip.resample)


def _normalised(crop):
    return (torch.tensor(crop).float() / 255 - 0.5) / 0.5  # rescale 1/255, mean = std = 0.5 (hub and fixtures)


def _connector_and_lm_input(vlm, batch) -> dict:
    """A plain HF forward of ``batch`` with hooks: the connector's output (``proj``, real frames only) and the LM's
    ``inputs_embeds`` (``emb``)."""
    got = {}
    hs = [vlm.hf.model.connector.register_forward_hook(lambda m, i, o: got.update(proj=o)),
          vlm.hf.get_decoder().register_forward_pre_hook(lambda m, a, k: got.update(emb=k["inputs_embeds"]),
                                                         with_kwargs=True)]
    try:
        with torch.no_grad():
            vlm.hf(**batch.inputs)
    finally:
        for h in hs:
            h.remove()
    return got


@pytest.mark.parametrize("name", FAMS + REAL[:1])
def test_tile_boxes_are_the_processors_crops_to_the_pixel(tiny_vlm, name):
    """Each tile's token boxes, mapped into the processor's canvas, are integer windows whose crop IS the frame the
    processor hands the model; the global image's tokens cover the whole image."""
    vlm = tiny_vlm(name)
    M = vlm.processor.image_processor.max_image_size["longest_edge"]
    for w, h in ODD if name in FAMS else [(301, 170)]:
        img = _noise(w, h, seed=w)
        batch = vlm.prepare([img], [F.prompt(vlm, name)])
        canvas = _processor_canvas(vlm, img)
        ch, cw = canvas.shape[1:]
        frames = batch.inputs["pixel_values"][0].float()
        t = batch.tokens
        n_tiles = int(t["tile"].max())  # tiles 0..n-1, the global image n
        assert n_tiles == (ch // M) * (cw // M) and frames.shape[0] == n_tiles + 1
        for tile in range(n_tiles):
            box = t["box"][t["tile"] == tile]
            x0, y0 = float(box[:, 0].min()) * cw / w, float(box[:, 1].min()) * ch / h
            x1, y1 = float(box[:, 2].max()) * cw / w, float(box[:, 3].max()) * ch / h
            X0, Y0, X1, Y1 = (round(v) for v in (x0, y0, x1, y1))
            assert max(abs(x0 - X0), abs(y0 - Y0), abs(x1 - X1), abs(y1 - Y1)) < 1e-9  # 0 px error
            assert (X1 - X0, Y1 - Y0) == (M, M)
            crop = _normalised(canvas[:, Y0:Y1, X0:X1]).to(batch.inputs["pixel_values"].dtype).float()  # bf16 ckpt
            assert torch.equal(crop, frames[tile]), (name, (w, h), tile)
        glob = t["box"][t["tile"] == n_tiles]
        assert (float(glob[:, 0].min()), float(glob[:, 1].min())) == (0.0, 0.0)
        assert abs(float(glob[:, 2].max()) - w) < 1e-9 and abs(float(glob[:, 3].max()) - h) < 1e-9


@pytest.mark.parametrize("name", FAMS + REAL[1:])
def test_kinds_follow_the_text_tokens_around_each_run(tiny_vlm, name):
    """The processor writes ``<row_i_col_j>`` before a tile's image tokens and ``<global-img>`` before the global
    image's: those tokens are tile (i-1) * cols + (j-1), kind "patch", and the global image's kind "thumbnail";
    the fake / row / global tokens themselves are text (not in the visual mask). An image that is not split is one
    frame after ``<global-img>`` whose tokens are "patch" (the only view of the image)."""
    vlm = tiny_vlm(name)
    tok = vlm.processor.tokenizer
    split = vlm.prepare([_noise(150, 97)], [F.prompt(vlm, name)])
    one = vlm.prepare([_noise(150, 97)], [F.prompt(vlm, name)], do_image_splitting=False)
    for batch, n_frames in ((split, 5), (one, 1)):
        ids, mask = batch.inputs["input_ids"][0], batch.visual_mask[0]
        named = {tok.convert_tokens_to_ids(s): s for s in
                 ["<fake_token_around_image>", "<global-img>"] + [f"<row_{i}_col_{j}>" for i in range(1, 7)
                                                                  for j in range(1, 7)]}
        assert not any(bool(mask[p]) for p in range(len(ids)) if int(ids[p]) in named)
        runs, p = [], 0
        while p < len(ids):  # each run of image tokens and the text token just before it
            if mask[p]:
                q = p
                while q < len(ids) and mask[q]:
                    q += 1
                runs.append((named[int(ids[p - 1])], q - p))
                p = q
            p += 1
        assert len(runs) == n_frames and runs[-1][0] == "<global-img>"
        kinds, tiles = batch.kinds, batch.tokens["tile"].tolist()  # kinds: one name per visual token
        cols = batch.grids[0]["tile_cols"]
        start = 0
        for tag, length in runs:
            if tag == "<global-img>":
                want_kind, want_tile = ("thumbnail" if n_frames > 1 else "patch"), n_frames - 1
            else:
                i, j = (int(v) for v in tag.strip("<>").replace("row_", "").split("_col_"))
                want_kind, want_tile = "patch", (i - 1) * cols + (j - 1)
            assert set(kinds[start:start + length]) == {want_kind}, (tag, n_frames)
            assert set(tiles[start:start + length]) == {want_tile}, tag
            start += length


@pytest.mark.parametrize("name", FAMS)
def test_vision_rows_are_the_pixel_shuffle_blocks(tiny_vlm, name):
    """ViTSinks' per-token mean norm over its vision rows equals a plain-torch mean over the patches HF's own
    ``pixel_shuffle`` concatenates into that token (run on patch indices), on the vision output a hook saw."""
    vlm = tiny_vlm(name)
    batch = vlm.prepare([_noise(150, 97), _noise(61, 203, 1)], [F.prompt(vlm, name)] * 2)
    got = {}
    h = vlm.hf.model.vision_model.encoder.layers[-1].register_forward_hook(lambda m, i, o: got.update(x=o))
    with torch.no_grad():
        vlm.hf(**batch.inputs)
    h.remove()
    x = got["x"]  # (real frames, P, d)
    frames, P = x.shape[:2]
    s = vlm.hf.config.scale_factor
    idx = vlm.hf.model.connector.pixel_shuffle(torch.arange(P, dtype=torch.float32).view(1, P, 1), s)[0].long()
    norms = x.float().norm(dim=-1)  # (frames, P)
    want = norms[:, idx].mean(-1).reshape(-1)  # (frames * P / s^2,) per token, frames in order
    res = mv.run(vlm, batch.images, batch.prompts, probes=[ViTSinks(threshold=1e9)])["vit_sinks"]
    assert len(want) == batch.n_visual
    torch.testing.assert_close(res.l2_mean, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", FAMS)
def test_padding_frames_are_dropped_and_rows_point_at_the_real_frames(tiny_vlm, name):
    """Two prompts with 3 and 5 frames: the shorter one is padded with all-zero frames the model drops; each
    visual token's LM input (a hook on the LM) is the connector output row (a hook on the connector) the table
    names, so the second prompt's rows skip the first prompt's padding."""
    vlm = tiny_vlm(name)
    batch = vlm.prepare([_noise(200, 80), _noise(150, 110, 1)], [F.prompt(vlm, name)] * 2)
    pv = batch.inputs["pixel_values"]
    real = (pv != 0).flatten(2).any(-1)
    assert real.sum(1).tolist() == [3, 5] and pv.shape[1] == 5  # two padding frames in row 0
    got = _connector_and_lm_input(vlm, batch)
    assert got["proj"].shape[0] == 8  # real frames only
    proj = got["proj"].reshape(-1, got["proj"].shape[-1])
    rows = batch.tokens["projector_rows"]
    assert torch.equal(got["emb"][batch.visual_mask], proj[rows])
    assert int(rows[batch.tokens["image"] == 1].min()) == 3 * 16  # the second image starts at real frame 3


def test_settings_the_model_cannot_take_are_refused_before_the_forward(tiny_vlm):
    vlm = tiny_vlm("idefics3")
    with pytest.raises(InputError, match="image_seq_len"):
        vlm.prepare([_noise(150, 97)], [F.prompt(vlm, "idefics3")], max_image_size={"longest_edge": 112})
    with pytest.raises(InputError, match="multiple of patch_size x scale_factor"):
        vlm.prepare([_noise(150, 97)], [F.prompt(vlm, "idefics3")], max_image_size={"longest_edge": 50})


@pytest.mark.parametrize("name", FAMS + REAL[:1])
def test_prune_the_global_image_equals_a_forward_without_it(tiny_vlm, name):
    """Prune(Kinds("thumbnail")) removes exactly the global image's tokens; its logits equal a plain LM forward
    on the clean LM input with those positions cut out (original position ids kept)."""
    from test_interventions import TOL, prune_reference

    vlm = tiny_vlm(name)
    batch = vlm.prepare([_noise(150, 97), _noise(61, 203, 1)],
                        [F.prompt(vlm, name), F.prompt(vlm, name, "describe the image")])
    sel = resolve(Kinds("thumbnail"), batch)
    gt = batch.grids[0]["rows"] * batch.grids[0]["cols"]
    assert sel.sum(1).tolist() == [gt, gt]  # one global image per prompt
    clean = clean_lm_kwargs(vlm, batch)
    logits, _ = nn_run(vlm, batch, [Prune(Kinds("thumbnail"))])
    for r, (ref, real, _) in enumerate(prune_reference(vlm, batch, sel, clean)):
        got = logits[r, -ref.shape[0]:]
        assert (got[real] - ref[real]).abs().max() < TOL


@pytest.mark.parametrize("name", FAMS)
def test_partition_calibrates_classifies_and_prunes(tiny_vlm, name):
    """The partition on a tiled model: every visual token (tiles and global image) gets one group; a token is a ViT
    sink only where ViTSinks finds one of its pixel-shuffle rows above the threshold; a group's token set prunes
    exactly its members."""
    from mech_vtokens.partition import calibrate
    from mech_vtokens.partition.partition import GROUPS

    vlm = tiny_vlm(name)
    prompt = F.prompt(vlm, name)
    imgs = [_noise(150, 97, s) for s in range(3)]
    part = calibrate(vlm, imgs, [prompt] * 3, vit_threshold=1.0)
    img = _noise(61, 203, 7)
    got = part.classify([img], [prompt])
    batch = vlm.prepare([img], [prompt])
    assert len(got.codes) == batch.n_visual and bool(((got.codes >= 0) & (got.codes < len(GROUPS))).all())
    vit = mv.run(vlm, [img], [prompt], probes=[ViTSinks(layer=-1, threshold=1.0)])["vit_sinks"]
    assert bool((vit.sinks[got.codes == GROUPS.index("vit_sink")]).all())
    group = GROUPS[int(torch.bincount(got.codes).argmax())]
    logits, _ = nn_run(vlm, batch, [Prune(part.token_set(group))])
    assert logits.shape[1] == batch.visual_mask.shape[1] - int((got.codes == GROUPS.index(group)).sum())


@pytest.mark.parametrize("name", FAMS)
def test_a_prompt_without_images_rides_along(tiny_vlm, name):
    """A batch of a prompt with an image and one without: the processor gets one (possibly empty) image list per
    prompt, the text-only row has no visual token and its frames are all padding; the image row's LM input at its
    visual positions is the connector output (hooks)."""
    vlm = tiny_vlm(name)
    batch = vlm.prepare([[_noise(150, 97)], []], [F.prompt(vlm, name), "USER : what is it ? ASSISTANT :"])
    assert batch.visual_mask.sum(1).tolist() == [80, 0]
    assert not bool(batch.inputs["pixel_values"][1].any())
    got = _connector_and_lm_input(vlm, batch)
    proj = got["proj"].reshape(-1, got["proj"].shape[-1])
    assert torch.equal(got["emb"][batch.visual_mask], proj[batch.tokens["projector_rows"]])
