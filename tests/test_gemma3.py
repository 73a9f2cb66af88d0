"""Gemma 3: what the family does differently from the others, each against an independent reference.

The family-parametrised tests (sites vs HF, geometry marker, every probe vs plain torch, every intervention vs a
reference forward, generation, partition, remote="local") run on the tiny Gemma 3 and its real-file fixture too;
here: the sandwich norms (the residual decomposition holds with the declared sites, and fails with the Llama-style
ones), Prune against a forward through HF's own Gemma 3 mask code (bidirectional image blocks, sliding window on the
new indices) and the masks it must NOT build, the processor check (the start-of-image token is not the model's image
token), the sqrt(d) embedding scale in norm comparisons, and the boxes of a non-square image.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import mech_vtokens as mv
from mech_vtokens import testing as T
from mech_vtokens.adapters.base import _BLOCK_SITES, _resolve
from mech_vtokens.errors import InputError
from mech_vtokens.interventions import Prune
from mech_vtokens.probes.activations import Activations
from mech_vtokens.token_sets import Positions

import families as FM
from intervention_refs import batch_of, clean_lm_kwargs, nn_run

GEMMA = ("gemma3", "google/gemma-3-4b-it@float32")


def _acts(vlm, batch, sites):
    return nn_run(vlm, batch, [], [Activations(sites)])[1]["activations"]


# ---- sandwich norms ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", GEMMA)
def test_residual_decomposition_with_sandwich_norms(tiny_vlm, family):
    """resid_pre + attn_out == resid_mid and resid_mid + mlp_out == resid_post, bit for bit: attn_out / mlp_out are
    read after the post-norms (what Gemma adds to the residual). With the Llama-style declaration (the attention /
    MLP module outputs, resid_mid at post_attention_layernorm's input) it does not hold."""
    vlm = tiny_vlm(family)
    b = batch_of(vlm, family)
    hooks = ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post")
    sites = [f"blocks.{i}.{h}" for i in range(vlm.n_layers) for h in hooks]
    a = _acts(vlm, b, sites)
    for i in range(vlm.n_layers):
        pre, attn, mid, mlp, post = (a[f"blocks.{i}.{h}"] for h in hooks)
        assert torch.equal(pre + attn, mid), i
        assert torch.equal(mid + mlp, post), i
        if i + 1 < vlm.n_layers:
            assert torch.equal(post, a[f"blocks.{i + 1}.hook_resid_pre"])
    # the planted mistake, declared: Llama's block sites on the same model
    wrong = type("LlamaStyleGemma", (type(vlm.adapter),), {"block_sites": _BLOCK_SITES,
                                                            "ln2": "post_attention_layernorm"})(vlm.hf)
    right = vlm.adapter
    vlm.adapter = wrong
    try:
        w = _acts(vlm, b, [f"blocks.0.{h}" for h in hooks])
    finally:
        vlm.adapter = right
    gap = (w["blocks.0.hook_resid_pre"] + w["blocks.0.hook_attn_out"] - w["blocks.0.hook_resid_mid"]).abs().max()
    assert gap > 1e-2


# ---- Prune: bidirectional image blocks, sliding window on the new indices -----------------------------------------

def _wrapper_logits(vlm, emb, am, pos, token_type_ids):
    """HF's own Gemma 3 wrapper (``model.model``) on given embeddings: its mask code builds the per-kind masks from
    the token types (bidirectional images; None: causal only)."""
    with torch.no_grad():
        h = vlm.hf.model(inputs_embeds=emb, attention_mask=am, position_ids=pos,
                         token_type_ids=token_type_ids).last_hidden_state
        return vlm.hf.lm_head(h)


def _sliced_mask_logits(vlm, emb, am, pos, clean, r, keep):
    """The WRONG reference a sequence change must not reproduce: the clean per-kind 4-D masks sliced to the kept
    rows / columns (the sliding window then counts the pruned positions)."""
    sliced = {k: (None if m is None else m[r:r + 1][..., keep, :][..., keep]) for k, m in
              clean["lm_mask_mapping"].items()}
    with torch.no_grad():
        h = vlm.hf.model.language_model(inputs_embeds=emb, attention_mask=sliced, position_ids=pos).last_hidden_state
        return vlm.hf.lm_head(h)


@pytest.mark.parametrize("family", GEMMA)
def test_prune_rebuilds_bidirectional_and_sliding_masks(tiny_vlm, family):
    """Prune's forward == HF's Gemma 3 wrapper run on the pruned sequence (its own masks: the kept tokens of an image
    attend to each other both ways, the sliding window over the NEW indices); and it differs from a causal-only
    reference and from the clean masks sliced (window over the old indices), so each of those mistakes would fail."""
    vlm = tiny_vlm(family)
    b = batch_of(vlm, family)
    n_img = b.n_visual // 2
    ts = Positions([j for j in range(b.n_visual) if j % n_img < n_img // 2])  # first half of each image
    from mech_vtokens.token_sets import resolve

    sel = resolve(ts, b)
    clean = clean_lm_kwargs(vlm, b)
    assert isinstance(clean["lm_mask_mapping"], dict) and set(clean["lm_mask_mapping"]) == {"full_attention",
                                                                                          "sliding_attention"}
    logits, _ = nn_run(vlm, b, [Prune(ts)])
    emb, am, tt = clean["inputs_embeds"], clean["attention_mask"], clean["token_type_ids"]
    L = emb.shape[1]
    worst, causal_gap, sliced_gap = 0.0, 0.0, 0.0
    for r in range(emb.shape[0]):
        keep = [j for j in range(L) if not sel[r, j]]
        a = am[r:r + 1, keep]
        p0 = clean["position_ids"]  # the LM's own ids (Gemma's: 0..L-1, padding counted) at the kept columns
        pos = torch.arange(L)[None, keep] if p0 is None else p0[r:r + 1, keep]
        real = a[0].bool()
        ref = _wrapper_logits(vlm, emb[r:r + 1, keep], a, pos, tt[r:r + 1, keep])[0]
        got = logits[r, -len(keep):]
        worst = max(worst, float((got[real] - ref[real]).abs().max()))
        causal = _wrapper_logits(vlm, emb[r:r + 1, keep], a, pos, None)[0]
        causal_gap = max(causal_gap, float((got[real] - causal[real]).abs().max()))
        if am[r].all():  # the unpadded row: the clean masks sliced to the kept columns
            sliced = _sliced_mask_logits(vlm, emb[r:r + 1, keep], a, pos, clean, r, keep)[0]
            sliced_gap = max(sliced_gap, float((got - sliced).abs().max()))
    assert worst < 1e-4, worst
    assert causal_gap > 1e-3, "the image blocks must attend bidirectionally"
    if vlm.hf.config.get_text_config().sliding_window < L:
        assert sliced_gap > 1e-3, "the sliding window must count the new indices"


# ---- processor check --------------------------------------------------------------------------------------------

def test_processor_check_uses_the_soft_image_token(tiny_vlm, tiny_dir):
    """processor.image_token_id is <start_of_image> (not the model's image token): the real processor passes, a
    processor whose SOFT image token is another id, or another family's, is refused naming the attribute."""
    vlm = tiny_vlm("gemma3")
    proc = vlm.processor
    assert proc.image_token_id != vlm.adapter.image_token_id == proc.tokenizer.image_token_id
    vlm.adapter.check_processor(proc)  # no error
    real = tiny_vlm("google/gemma-3-4b-it")
    real.adapter.check_processor(real.processor)
    assert real.adapter.image_token_id == 262144 and real.processor.image_token_id == 255999
    with pytest.raises(InputError, match="tokenizer.image_token_id"):
        vlm.adapter.check_processor(real.processor)  # a foreign Gemma 3 processor: soft token 262144, not this one
    with pytest.raises(InputError, match="does not match"):
        vlm.adapter.check_processor(tiny_vlm("llava").processor)
    with pytest.raises(InputError, match="does not match"):
        mv.load(vlm.hf, real.processor)


# ---- sqrt(d) embedding scale --------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", GEMMA)
def test_embedding_scale_in_norm_comparisons(tiny_vlm, family):
    """A text token reaches the LM as sqrt(d) * its embedding row (in the weights' dtype): vlm.embedding_scale and
    vlm.input_embedding_norms() give the norms hook_embed holds at text positions; the raw rows' norms are sqrt(d)
    times smaller."""
    vlm = tiny_vlm(family)
    d = vlm.hf.config.get_text_config().hidden_size
    want = float(torch.tensor(math.sqrt(d)).to(vlm.embedding_matrix.dtype))
    assert vlm.embedding_scale == pytest.approx(want, rel=0, abs=0) and vlm.embedding_scale > 1
    b = batch_of(vlm, family)
    x = _acts(vlm, b, ["hook_embed"])["hook_embed"]
    text = b.inputs["attention_mask"].bool() & ~b.visual_mask
    ids = b.inputs["input_ids"][text]
    got = x[text].float().norm(dim=-1)
    torch.testing.assert_close(got, vlm.input_embedding_norms()[ids], rtol=1e-5, atol=1e-5)
    raw = vlm.embedding_matrix[ids].float().norm(dim=-1)
    assert (got / raw).sub(want).abs().max() < 1e-3 * want
    assert tiny_vlm("llava").embedding_scale == 1.0


# ---- geometry: boxes of the original image, the 4 x 4 (tiny: 2 x 2) pool -------------------------------------------

@pytest.mark.parametrize("family", GEMMA)
def test_boxes_and_pooled_rows_of_a_non_square_image(tiny_vlm, family):
    """The processor stretches the image to a square (no aspect kept): token (r, c) of the t x t grid is the box
    (c w/t, r h/t, (c+1) w/t, (r+1) h/t) of the ORIGINAL image, computed from the vision mean of its k x k patches
    (equal weights); a marker inside one token's box changes that token's projector row the most. Pan-and-scan is
    refused."""
    vlm = tiny_vlm(family)
    cfg = vlm.hf.config
    g = cfg.vision_config.image_size // cfg.vision_config.patch_size
    t = int(round(cfg.mm_tokens_per_image ** 0.5))
    k = g // t
    w, h = 150, 90
    img = T.image(112, 3).resize((w, h))
    b = vlm.prepare([img], [FM.prompt(vlm, family)])
    tok = b.tokens
    assert b.n_visual == t * t and b.grids == [{"rows": t, "cols": t, "tiles": 1}]
    j = t + 2  # row 1, col 2
    assert (int(tok["row"][j]), int(tok["col"][j])) == (1, 2)
    assert tok["box"][j].tolist() == pytest.approx([2 * w / t, h / t, 3 * w / t, 2 * h / t])
    want = sorted((1 * k + a) * g + (2 * k + c) for a in range(k) for c in range(k))
    assert sorted(tok["vision_rows"][j].tolist()) == want
    assert torch.allclose(tok["vision_weights"][j], torch.full((k * k,), 1 / (k * k)))
    x0, y0, x1, y1 = tok["box"][j].tolist()
    arr = __import__("numpy").array(img)
    arr[int(y0) + 2:int(y1) - 2, int(x0) + 2:int(x1) - 2] = 255
    from PIL import Image

    marked = Image.fromarray(arr)
    pa = mv.run(vlm, [img], b.prompts, probes=[Activations(["vision_projector.hook_out"])])["activations"]
    pb = mv.run(vlm, [marked], b.prompts, probes=[Activations(["vision_projector.hook_out"])])["activations"]
    change = (pa["vision_projector.hook_out"] - pb["vision_projector.hook_out"])[0].float().norm(dim=-1)
    assert int(change.argmax()) == int(tok["projector_rows"][j])
    with pytest.raises(InputError, match="do_pan_and_scan"):
        vlm.prepare([img], [FM.prompt(vlm, family)], do_pan_and_scan=True)


def test_no_second_bos_from_the_chat_template(tiny_vlm):
    """The Gemma template writes <bos> and the tokenizer adds one: prepare keeps one (as HF's own
    apply_chat_template(tokenize=True))."""
    vlm = tiny_vlm("google/gemma-3-4b-it")
    text = vlm.prompt("what color is the object ?")
    assert text.startswith("<bos>")
    ids = vlm.prepare([T.image(112)], [text]).inputs["input_ids"][0]
    assert int(ids[0]) == vlm.tokenizer.bos_token_id and int(ids[1]) != vlm.tokenizer.bos_token_id
    vis = _resolve(vlm.hf, vlm.adapter.projector)  # the projector's weight is random, not zero (fixture sanity)
    assert vis.mm_input_projection_weight.abs().sum() > 0


# ---- partition ---------------------------------------------------------------------------------------------------

def test_partition_vit_sinks_follow_the_pooled_rows(tiny_vlm):
    """calibrate + classify run on Gemma 3 (remote="local" identical); a token is a ViT sink exactly when the max L2
    norm over the k x k SigLIP patches of its pool (plain HF hook on the last vision block) exceeds the threshold."""
    from mech_vtokens.partition import calibrate

    vlm = tiny_vlm("gemma3")
    ims, pr = [T.image(112, s) for s in range(4)], T.prompt("gemma3")
    with warnings.catch_warnings():  # (its thresholds are below the paper's: the warning says so, once)
        warnings.simplefilter("ignore")
        part = calibrate(vlm, ims, pr, vit_threshold=7.0, phi_threshold=3.0)
    res = part.classify(ims[:2], pr)
    df = res.to_pandas()
    assert df.equals(part.classify(ims[:2], pr, remote="local").to_pandas())
    b = vlm.prepare(ims[:2], [pr] * 2)
    got = {}
    last = _resolve(vlm.hf, vlm.adapter.vision_layers)[-1]
    h = last.register_forward_hook(lambda m, i, o: got.__setitem__("x", o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        vlm.hf(**b.inputs)
    h.remove()
    norms = got["x"].reshape(-1, got["x"].shape[-1]).float().norm(dim=-1)
    cfg = vlm.hf.config
    g = cfg.vision_config.image_size // cfg.vision_config.patch_size
    t = int(round(cfg.mm_tokens_per_image ** 0.5))
    k = g // t
    want = []
    for i in range(2):
        for r in range(t):
            for c in range(t):
                rows = [i * g * g + (r * k + a) * g + (c * k + d) for a in range(k) for d in range(k)]
                want.append(bool(norms[rows].max() > 7.0))
    assert sum(want) > 0 and not all(want)
    assert (df.group == "vit_sink").tolist() == want
