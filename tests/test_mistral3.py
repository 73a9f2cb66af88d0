"""Mistral 3 (Pixtral encoder): the one-sequence vision tower and the 2 x 2 unfold merge (which vision rows each
visual token is built from, in which order), the boxes, the [IMG] / [IMG_BREAK] / [IMG_END] layout, the processor
built without torchvision, and the settings processor and model must share.

Every check is against something the geometry does not compute: HF's own ``Mistral3PatchMerger`` input order
rebuilt with ``torch.nn.functional.unfold`` on plain-HF hooked tensors, the projector's own modules applied to the
rows the table names, the PIL image processor's ``get_resize_output_image_size``, a numpy resize / normalise of the
hub preprocessor settings, and the token ids the processor writes. The family-parametrised tests (sites vs plain HF,
every probe, Prune / VisualEntry / VisualExit vs hand-built forwards, generate, partition, remote="local", the TL
bridge for the LM side) run on the tiny Mistral 3 and its real-file fixture as on every family.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import mech_vtokens as mv
from mech_vtokens import testing as T
from mech_vtokens.adapters.base import _resolve
from mech_vtokens.adapters.geometry import mix_rows
from mech_vtokens.errors import InputError
from mech_vtokens.probes import Activations

import families as FM

REAL = "mistralai/Mistral-Small-3.1-24B-Instruct-2503"
FAMS = ("mistral3", f"{REAL}@float32")
# odd sizes: landscape, portrait, a one-pixel image, a thin strip; for the tiny fixture (longest edge 112) the first
# two and the strip are scaled DOWN first (floor), the others only rounded up to 28 px
ODD = [(150, 97), (61, 203), (1, 1), (213, 9), (29, 57)]


def _noise(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _hooked(vlm, batch):
    """Plain HF forward with hooks: the last vision block's output and the projector's input / output."""
    got = {}
    hs = [_resolve(vlm.hf, vlm.adapter.vision_layers)[-1].register_forward_hook(
              lambda m, i, o: got.__setitem__("vision", o)),
          _resolve(vlm.hf, vlm.adapter.projector).register_forward_hook(
              lambda m, i, o: got.update(proj_in=i[0], proj=o))]
    try:
        with torch.no_grad():
            vlm.hf(**batch.inputs)
    finally:
        for h in hs:
            h.remove()
    return got


def _unfold_groups(n_patches_hw, m):
    """Per token (row-major, images in order) the flat patch indices of its merge block in HF's concatenation order,
    computed by ``unfold`` on an index grid (what ``Mistral3PatchMerger`` does to the features)."""
    out, start = [], 0
    for gh, gw in n_patches_hw:
        grid = torch.arange(start, start + gh * gw, dtype=torch.float64).view(1, 1, gh, gw)
        cols = torch.nn.functional.unfold(grid, kernel_size=m, stride=m)[0].t()  # (tokens, m*m), kernel row-major
        out += [[int(v) for v in row] for row in cols]
        start += gh * gw
    return out


@pytest.mark.parametrize("family", FAMS)
def test_vision_rows_are_the_merge_blocks_in_hf_order(tiny_vlm, family):
    """Each visual token's vision rows are the 2 x 2 patches ``Mistral3PatchMerger`` unfolds for it, in its
    concatenation order: the projector's own modules applied to those rows of the hooked vision output give the
    hooked projector output (max |d| <= 1e-5), and the equal-weight mix of the rows is the plain-torch mean of the
    unfold block. Images of different sizes share one vision sequence (offsets per image)."""
    vlm = tiny_vlm(family)
    imgs = [_noise(150, 97, 0), _noise(61, 120, 1)]
    b = vlm.prepare([[im] for im in imgs], [FM.prompt(vlm, family)] * 2)
    cfg = vlm.hf.config
    p, m = cfg.vision_config.patch_size, cfg.spatial_merge_size
    hw = [(h // p, w // p) for h, w in b.inputs["image_sizes"].tolist()]
    groups = _unfold_groups(hw, m)
    tok = b.tokens
    assert tok["vision_rows"].tolist() == groups
    got = _hooked(vlm, b)
    vis = got["vision"].reshape(-1, got["vision"].shape[-1])
    assert vis.shape[0] == sum(gh * gw for gh, gw in hw)  # ONE sequence: every image's patches, no padding
    # the projector on the named rows, step by step (RMSNorm, channel-major concatenation as unfold, merge, MLP)
    proj = _resolve(vlm.hf, vlm.adapter.projector)
    with torch.no_grad():
        normed = proj.norm(vis)
        rows = normed[tok["vision_rows"]]  # (tokens, m*m, d)
        cat = rows.permute(0, 2, 1).reshape(len(rows), -1)  # (tokens, d*m*m), channel-major like unfold
        ref = proj.linear_2(proj.act(proj.linear_1(proj.patch_merger.merging_layer(cat))))
    out = got["proj"].reshape(-1, got["proj"].shape[-1])
    assert tok["projector_rows"].tolist() == list(range(len(out)))
    assert (ref - out[tok["projector_rows"]]).abs().max() <= 1e-5
    # the vision-site value of a token: the mean of its block (our mix vs plain torch on the unfold groups)
    mixed, present = mix_rows(vis, tok["vision_rows"], tok["vision_weights"])
    plain = torch.stack([vis[g].float().mean(0) for g in groups]).to(vis.dtype)
    assert bool(present.all()) and (mixed.float() - plain.float()).abs().max() <= 1e-5
    # through a probe: the vision site read by the project equals the hooked tensor
    acts = mv.run(vlm, [[im] for im in imgs], b.prompts,
                  probes=[Activations([f"vision.blocks.{vlm.n_vision_layers - 1}.hook_resid_post"])])["activations"]
    a = acts[f"vision.blocks.{vlm.n_vision_layers - 1}.hook_resid_post"]
    assert (a.reshape(vis.shape).float() - vis.float()).abs().max() <= 1e-5


@pytest.mark.parametrize("family", ("mistral3", REAL))
def test_boxes_follow_the_processors_resize_arithmetic(tiny_vlm, family):
    """Boxes / grids of odd sizes (downscaled with floor past the longest edge, every side rounded UP to patch x
    merge px, a 1-px image: first brought to the project's ``data.MIN_SIDE`` by ``fit_side``, the one size policy,
    so boxes are in the pixels of the image the processor receives) against the PIL image processor's own
    ``get_resize_output_image_size``; the layout of
    the ids: per image ``rows`` runs of ``cols`` [IMG] closed by [IMG_BREAK], the last by [IMG_END], neither in the
    image-token mask; every visual token is a "patch"."""
    from transformers.models.pixtral.image_processing_pil_pixtral import get_resize_output_image_size

    from mech_vtokens.data import fit_side

    vlm = tiny_vlm(family)
    ip, proc = vlm.processor.image_processor, vlm.processor
    side = proc.patch_size * proc.spatial_merge_size
    edge = ip.size["longest_edge"]
    imgs = [_noise(w, h, i) for i, (w, h) in enumerate(ODD)]
    b = vlm.prepare([[im] for im in imgs], [FM.prompt(vlm, family)] * len(imgs))
    tok, ids, mask = b.tokens, b.inputs["input_ids"], b.visual_mask
    tk = vlm.tokenizer
    img_id, brk, end = (tk.convert_tokens_to_ids(t) for t in ("[IMG]", "[IMG_BREAK]", "[IMG_END]"))
    assert not bool(mask[(ids == brk) | (ids == end)].any()) and set(tok["kind"].tolist()) == {0}
    for i, im in enumerate(imgs):
        w, h = fit_side(im)[0].size
        assert b.image_sizes[i] == (w, h)
        rh, rw = get_resize_output_image_size(np.zeros((h, w, 3)), size=(edge, edge), patch_size=(side, side))
        rows, cols = rh // side, rw // side
        assert b.grids[i] == {"rows": rows, "cols": cols, "tiles": 1}
        sel = tok["image"] == i
        want = [(c * w / cols, r * h / rows, (c + 1) * w / cols, (r + 1) * h / rows)
                for r in range(rows) for c in range(cols)]
        assert torch.allclose(tok["box"][sel], torch.tensor(want, dtype=torch.float64), atol=1e-9)
        assert tok["row"][sel].tolist() == [r for r in range(rows) for _ in range(cols)]
        row = ids[i][ids[i] != tk.pad_token_id].tolist()
        s = row.index(img_id)
        assert row[s:s + rows * (cols + 1)] == ([img_id] * cols + [brk]) * (rows - 1) + [img_id] * cols + [end]
        assert int(mask[i].sum()) == rows * cols == b.visual_tokens_per_image[i]


def test_empty_image_is_refused_before_any_work(tiny_vlm):
    vlm = tiny_vlm("mistral3")
    for size in ((0, 40), (0, 0)):
        with pytest.raises(InputError, match=r"empty \(0x"):
            vlm.prepare([Image.new("RGB", size)], [T.prompt("mistral3")])


def test_processor_without_torchvision_gives_the_hub_settings_pixels(tiny_vlm, tmp_path):
    """The real fixture's processor (HF's PixtralProcessor + PixtralImageProcessorPil from the hub
    preprocessor_config.json) gives the pixel values its settings define, computed here with PIL + numpy: resize
    to the rounded-up size (bicubic), rescale 1/255, normalise with the CLIP mean / std, zero-pad bottom / right to
    the batch's largest (fp32: prepare casts pixel values to the model's dtype). Saved and loaded, it keeps its
    class, merge size and patch size."""
    from mech_vtokens.fixtures.real import hub_file

    vlm = tiny_vlm(f"{REAL}@float32")
    pp = hub_file(REAL, "preprocessor_config.json")
    assert type(vlm.processor).__name__ == "PixtralProcessor"
    assert type(vlm.processor.image_processor).__name__ == "PixtralImageProcessorPil"
    imgs = [_noise(150, 97, 0), _noise(61, 203, 1)]
    b = vlm.prepare([[im] for im in imgs], [FM.prompt(vlm, REAL)] * 2)
    pv = b.inputs["pixel_values"]
    mean, std = np.array(pp["image_mean"])[:, None, None], np.array(pp["image_std"])[:, None, None]
    H, W = pv.shape[-2:]
    worst = 0.0
    for i, im in enumerate(imgs):
        rw, rh = -(-im.width // 28) * 28, -(-im.height // 28) * 28  # below 1540 px: only rounded up
        assert b.inputs["image_sizes"][i].tolist() == [rh, rw]
        arr = np.asarray(im.resize((rw, rh), Image.BICUBIC), dtype=np.float64).transpose(2, 0, 1)
        ref = np.zeros((3, H, W))
        ref[:, :rh, :rw] = (arr * pp["rescale_factor"] - mean) / std
        worst = max(worst, float(np.abs(pv[i].double().numpy() - ref).max()))
    assert worst <= 1e-5, worst
    vlm.processor.save_pretrained(tmp_path)
    again = vlm.adapter.load_processor(str(tmp_path), vlm.adapter.config)
    assert type(again).__name__ == "PixtralProcessor"
    assert (again.patch_size, again.spatial_merge_size) == (14, 2)


def test_merge_size_from_the_config_and_a_wrong_patch_size_refused(tiny_dir, tmp_path):
    """A processor saved without the merge size (the PixtralProcessor default 1: 4x the [IMG] tokens) is given the
    model's (config.spatial_merge_size) at load; a processor patch size the model cannot merge is refused with the
    setting to fix, before the model runs."""
    import json
    import shutil

    src = tiny_dir("mistral3")
    dst = tmp_path / "m3"
    shutil.copytree(src, dst)
    pc = json.loads((dst / "processor_config.json").read_text())
    pc.pop("spatial_merge_size")
    (dst / "processor_config.json").write_text(json.dumps(pc))
    vlm = mv.load(str(dst))
    assert vlm.processor.spatial_merge_size == 2
    b = vlm.prepare([T.image(112)], [T.prompt("mistral3")])
    assert b.n_visual == 16
    vlm.processor.patch_size = 7  # 90 px -> 98 px = 7 patches of 14: not a whole number of 2 x 2 blocks
    with pytest.raises(InputError, match="spatial_merge_size"):
        vlm.prepare([_noise(90, 90)], [T.prompt("mistral3")])
    vlm.processor.patch_size = 14
    with pytest.raises(InputError, match="do_resize=True"):  # the input size kept: 90 px is no multiple of 28
        vlm.prepare([_noise(90, 90)], [T.prompt("mistral3")], do_resize=False)


def test_chat_template_prompt_layout_with_two_images(tiny_vlm):
    """Through the real chat template: one [IMG] per image item inside [INST]; the processor expands each into its
    rows; the visual tokens per image follow each image's own size."""
    vlm = tiny_vlm(REAL)
    text = vlm.prompt("what color is it ?", n_images=2)
    assert text.count("[IMG]") == 2 and text.startswith("<s>[SYSTEM_PROMPT]") and text.endswith("[/INST]")
    imgs = [_noise(150, 97, 0), _noise(56, 56, 1)]
    b = vlm.prepare([imgs], [text])
    assert b.visual_tokens_per_image == [4 * 6, 2 * 2]
    ids = b.inputs["input_ids"][0].tolist()
    assert ids[0] == vlm.tokenizer.bos_token_id and ids[1] != vlm.tokenizer.bos_token_id  # one BOS
    assert ids.count(vlm.tokenizer.convert_tokens_to_ids("[IMG_END]")) == 2


def test_llava_with_a_pixtral_tower_is_refused_at_load(tmp_path):
    """LLaVA with a Pixtral tower (``mistral-community/pixtral-12b``: model_type llava, no patch merger) has its
    vision blocks at ``vision_tower.transformer.layers``: the llava adapter's declaration does not fit, and the load
    says so (InputError naming the path and the tower) instead of an AttributeError."""
    from transformers import (LlavaConfig, LlavaForConditionalGeneration, MistralConfig, PixtralImageProcessorPil,
                              PixtralVisionConfig)

    from mech_vtokens.adapters.mistral3 import pixtral_processor_class

    tok = T._tokenizer("mistral3")
    vision = PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                 head_dim=16, image_size=112, patch_size=16)
    text = MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=16, vocab_size=len(tok))
    config = LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                         image_token_index=tok.convert_tokens_to_ids("[IMG]"), vision_feature_layer=-1,
                         vision_feature_select_strategy="full")
    LlavaForConditionalGeneration(config).save_pretrained(tmp_path)
    pixtral_processor_class()(image_processor=PixtralImageProcessorPil(size={"longest_edge": 112}), tokenizer=tok,
                              patch_size=16, spatial_merge_size=1).save_pretrained(tmp_path)
    with pytest.raises(InputError, match=r"'pixtral'\) has no vision blocks at 'model.vision_tower.encoder.layers'"):
        mv.load(str(tmp_path))
