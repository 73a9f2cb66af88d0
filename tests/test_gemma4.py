"""Gemma 4: what the family does differently from the others, each against an independent reference.

The family-parametrised tests (sites vs HF, every probe vs plain torch, Prune vs a hand-built forward, generation ==
re-running the intervened forward, partition, remote="local") run on the tiny Gemma 4 too; here: the residual
decomposition with the per-layer-embedding step and the per-layer scalar (and that the Gemma 3 declaration breaks
it), the capped logits (the site, LogitLens, logit_diff_of), Prune slicing the per-layer inputs (and what a missing
declaration does), the per-image pooled geometry against the processor's own arithmetic on odd sizes, the pooled
vision rows against the projector, the image-only processor's round trip, probes at KV-shared layers under
mv.generate, the refusals (VisualEntry / VisualExit, a Gemma 4 without a vision encoder, Gemma 4 unified), and Prune
on a variant whose images attend bidirectionally in its sliding layers only, against HF's own mask code.
"""

from __future__ import annotations

import json

import pytest
import torch

import mech_vtokens as mv
from mech_vtokens import testing as T
from mech_vtokens.adapters.gemma3 import _GEMMA_BLOCK_SITES
from mech_vtokens.adapters.gemma4 import Gemma4Adapter, gemma4_image_processor_class
from mech_vtokens.attribution import logit_diff_of
from mech_vtokens.errors import InputError
from mech_vtokens.interventions import Prune, VisualEntry, VisualExit
from mech_vtokens.probes import LogitLens
from mech_vtokens.probes.activations import Activations
from mech_vtokens.token_sets import Positions, resolve

from intervention_refs import batch_of, clean_lm_kwargs, lm_of, nn_run


def _acts(vlm, batch, sites):
    return nn_run(vlm, batch, [], [Activations(sites)])[1]["activations"]


def _cap(vlm, logits):  # written here: Gemma 4's final_logit_softcapping after lm_head
    c = vlm.hf.config.get_text_config().final_logit_softcapping
    return torch.tanh(logits / c) * c


def test_residual_decomposition_with_ple_and_layer_scalar(tiny_vlm):
    """resid_pre + attn_out == resid_mid and (resid_mid + mlp_out + ple_out) * layer_scalar == resid_post, bit for
    bit (the model's own ops in its order); the scalar is not 1 and the PLE step is not zero, so both matter. The
    Gemma 3 declaration (no PLE site) on the same model does not decompose."""
    vlm = tiny_vlm("gemma4")
    b = batch_of(vlm, "gemma4")
    hooks = ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_ple_out", "hook_resid_post")
    sites = [f"blocks.{i}.{h}" for i in range(vlm.n_layers) for h in hooks]
    a = _acts(vlm, b, sites)
    layers = lm_of(vlm).layers
    for i in range(vlm.n_layers):
        pre, attn, mid, mlp, ple, post = (a[f"blocks.{i}.{h}"] for h in hooks)
        scalar = layers[i].layer_scalar
        assert float((scalar - 1).abs()) > 0.01 and bool((ple != 0).any())
        assert torch.equal(pre + attn, mid), i
        assert torch.equal(((mid + mlp) + ple) * scalar, post), i
        assert (mid + mlp - post).abs().max() > 1e-3  # what the four-site decomposition would claim
        if i + 1 < vlm.n_layers:
            assert torch.equal(post, a[f"blocks.{i + 1}.hook_resid_pre"])
    wrong = type("Gemma3StyleGemma4", (type(vlm.adapter),), {"block_sites": _GEMMA_BLOCK_SITES})(vlm.hf)
    right, vlm.adapter = vlm.adapter, wrong
    try:
        assert "blocks.0.hook_ple_out" not in vlm.sites
        w = _acts(vlm, b, ["blocks.0.hook_resid_mid", "blocks.0.hook_mlp_out", "blocks.0.hook_resid_post"])
        assert (w["blocks.0.hook_resid_mid"] + w["blocks.0.hook_mlp_out"] - w["blocks.0.hook_resid_post"]).abs().max() \
            > 1e-3
    finally:
        vlm.adapter = right


def test_logits_are_capped_at_the_site_the_lens_and_attribution(tiny_vlm):
    """unembed.hook_out IS the model's logits (capped after lm_head, bit for bit), not lm_head's output; LogitLens at
    the last layer equals the model's logits (scores and log-probs); logit_diff_of on the final residual equals the
    model's logit difference. The cap changes these values (|lm_head - logits| > 0.01)."""
    vlm = tiny_vlm("gemma4")
    b = batch_of(vlm, "gemma4")
    last = f"blocks.{vlm.n_layers - 1}.hook_resid_post"
    with torch.no_grad():
        logits = vlm.hf(**b.inputs).logits
    lens, lens_lp = LogitLens(k=3, sites=[last]), LogitLens(k=3, sites=[last], logprobs=True)
    _, res = nn_run(vlm, b, [], [Activations(["unembed.hook_out", last]), lens, lens_lp])
    acts = res["activations"]
    assert torch.equal(acts["unembed.hook_out"], logits)
    with torch.no_grad():
        raw = vlm.hf.lm_head(vlm.final_norm(acts[last]))
    assert (raw - logits).abs().max() > 0.01
    torch.testing.assert_close(_cap(vlm, raw), logits, atol=1e-6, rtol=0)
    ll, lp = res[lens], res[lens_lp]
    vis = logits[b.visual_mask]
    top = vis.topk(3, dim=-1)
    assert torch.equal(ll.ids[last], top.indices)
    torch.testing.assert_close(ll.scores[last], top.values, atol=1e-5, rtol=0)
    torch.testing.assert_close(lp.scores[last], torch.log_softmax(vis, -1).topk(3, -1).values, atol=1e-5, rtol=0)
    a_id, b_id = 10, 20
    d = logit_diff_of(vlm, acts[last][:, -1], a_id, b_id)
    torch.testing.assert_close(d, logits[:, -1, a_id] - logits[:, -1, b_id], atol=1e-6, rtol=0)


def test_prune_slices_the_per_layer_inputs(tiny_vlm):
    """Prune == the LM run by hand on the kept columns of inputs_embeds AND per_layer_inputs (the PLE token
    embeddings the wrapper hands the LM); the per-layer inputs of the image positions are the PAD token's. Without
    the ``lm_token_kwargs`` declaration the LM gets full-length per-layer inputs next to the pruned embeddings and
    fails."""
    vlm = tiny_vlm("gemma4")
    b = vlm.prepare([T.image(seed=1)], [T.prompt("gemma4")])
    clean = clean_lm_kwargs(vlm, b)
    ple = clean["per_layer_inputs"]
    pad = lm_of(vlm).embed_tokens_per_layer(torch.tensor([vlm.hf.config.text_config.pad_token_id]))
    assert torch.equal(ple[b.visual_mask], pad.reshape(1, *ple.shape[2:]).expand(int(b.n_visual), -1, -1))
    ts = Positions(list(range(0, b.n_visual, 2)))
    logits, _ = nn_run(vlm, b, [Prune(ts)])
    keep = (b.visual_mask.cumsum(1) - 1) % 2 == 1
    keep = ~b.visual_mask | keep
    kept = keep[0].nonzero()[:, 0]
    with torch.no_grad():
        h = lm_of(vlm)(inputs_embeds=clean["inputs_embeds"][:, kept], attention_mask=clean["attention_mask"][:, kept],
                       position_ids=clean["position_ids"][:, kept], per_layer_inputs=ple[:, kept]).last_hidden_state
        ref = _cap(vlm, vlm.hf.lm_head(h))
    assert logits.shape == ref.shape
    assert (logits - ref).abs().max() < 1e-5
    wrong = type("NoPle", (type(vlm.adapter),), {"lm_token_kwargs": {}})(vlm.hf)
    right, vlm.adapter = vlm.adapter, wrong
    try:
        with pytest.raises(Exception):
            nn_run(vlm, b, [Prune(ts)])
    finally:
        vlm.adapter = right


def _target(h, w, ps, k, budget):
    """The processor's target size, written here from its documented rule: the largest (H, W), multiples of k * ps,
    with the aspect ratio kept (floored), within budget * k^2 patches."""
    import math

    f = math.sqrt(budget * k * k * ps * ps / (h * w))
    side = k * ps
    return int(math.floor(f * h / side)) * side, int(math.floor(f * w / side)) * side


def test_pooled_geometry_on_odd_sizes(tiny_vlm):
    """Per image the (rows, cols) grid, the visual-token count in the prompt, the boxes (cells of the ORIGINAL
    image) and the vision rows match the processor's own arithmetic for odd sizes; the mean of each token's vision
    rows of the last vision block, times sqrt(d_vision), through ``embed_vision``, is the projector row."""
    from PIL import Image

    vlm = tiny_vlm("gemma4")
    ip = vlm.processor.image_processor
    ps, k, budget = ip.patch_size, ip.pooling_kernel_size, ip.max_soft_tokens
    sizes = [(37, 91), (101, 29), (61, 61)]  # (w, h), odd, none below the 28 px data.to_rgb upsizes
    gen = torch.Generator().manual_seed(0)
    imgs = [Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=gen, dtype=torch.uint8).numpy())
            for w, h in sizes]
    b = vlm.prepare([imgs], [T.prompt("gemma4", n_images=3)])
    grids = vlm.adapter.geometry(vlm.adapter, vlm.hf, vlm.processor).grids(b.inputs, sizes)
    tok = b.tokens
    for i, (w, h) in enumerate(sizes):
        th, tw = _target(h, w, ps, k, budget)
        rows, cols = th // ps // k, tw // ps // k
        assert (grids[i]["rows"], grids[i]["cols"]) == (rows, cols), (w, h)
        mine = tok["image"] == i
        assert int(mine.sum()) == rows * cols
        r, c = tok["row"][mine], tok["col"][mine]
        box = tok["box"][mine]
        want = torch.stack([c * w / cols, r * h / rows, (c + 1) * w / cols, (r + 1) * h / rows], 1).double()
        torch.testing.assert_close(box, want)
    assert int(b.visual_mask.sum()) == len(tok["image"])
    v = _acts(vlm, b, [f"vision.blocks.{vlm.adapter.n_vision_layers - 1}.hook_resid_post",
                       "vision_projector.hook_out"])
    vis = v[f"vision.blocks.{vlm.adapter.n_vision_layers - 1}.hook_resid_post"]
    flat = vis.reshape(-1, vis.shape[-1]).float()
    rows_, wts = tok["vision_rows"], tok["vision_weights"]
    assert bool(((wts > 0).sum(1) == k * k).all())
    pooled = (flat[rows_.clamp(min=0)] * wts[..., None]).sum(1) * vis.shape[-1] ** 0.5
    with torch.no_grad():
        proj = vlm.hf.model.embed_vision(pooled.to(vis.dtype)[None])[0]
    torch.testing.assert_close(proj, v["vision_projector.hook_out"][tok["projector_rows"]], atol=1e-4, rtol=1e-4)


def test_image_only_processor_round_trip(tmp_path):
    """The image-only Gemma4Processor (no audio feature extractor, no video processor: built by keyword) saves and
    loads as ``Gemma4Processor`` with its settings; the adapter loads it when AutoProcessor cannot."""
    _, proc = T.build("gemma4")
    proc.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    assert saved["processor_class"] == "Gemma4Processor" and saved["image_seq_length"] == 70
    back = Gemma4Adapter.load_processor(str(tmp_path))
    assert type(back).__name__ == "Gemma4Processor" and back.image_seq_length == 70
    assert type(back) is gemma4_image_processor_class()
    assert back.image_processor.max_soft_tokens == 70 and back.image_token_id == proc.image_token_id


def test_probes_at_kv_shared_layers_under_generate(tiny_vlm):
    """mv.generate's probes read the prompt's forward; at the KV-shared layers (which a generate prefill runs on the
    last position only) they still see the whole prompt, the same as one traced forward."""
    vlm = tiny_vlm("gemma4")
    first = vlm.hf.config.text_config.num_hidden_layers - vlm.hf.config.text_config.num_kv_shared_layers
    site = f"blocks.{first}.hook_resid_post"
    imgs, prompts = [T.image(seed=1)], [T.prompt("gemma4")]
    gen = mv.generate(vlm, imgs, prompts, probes=[Activations([site])], max_new_tokens=2)
    alone = mv.run(vlm, imgs, prompts, probes=[Activations([site])])["activations"][site]
    got = gen.results["activations"][site]
    assert got.shape == alone.shape
    torch.testing.assert_close(got, alone, atol=1e-6, rtol=0)


def test_refusals(tiny_vlm, tmp_path):
    """VisualEntry / VisualExit refuse before any work, naming the per-layer embeddings and the shared KV and
    pointing at Prune; a Gemma 4 config without a vision encoder is refused by mv.load before any weight is read
    (the directory holds no weights)."""
    vlm = tiny_vlm("gemma4")
    b = batch_of(vlm, "gemma4")
    for iv in (VisualEntry(1), VisualExit(1)):
        with pytest.raises(InputError, match=r"per-layer embedding.*reuse the keys / values.*Use Prune"):
            vlm.experiment(b, interventions=[iv])
    cfg = T.build("gemma4")[0].config
    d = cfg.to_dict()
    d["vision_config"] = None
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(InputError, match="no vision encoder"):
        mv.load(str(tmp_path))
    from transformers import Gemma4UnifiedConfig  # the encoder-free variant: refused, naming why

    (tmp_path / "config.json").write_text(json.dumps(Gemma4UnifiedConfig().to_dict()))
    with pytest.raises(InputError, match=r"gemma4_unified.*no vision encoder"):
        mv.load(str(tmp_path))


def test_prune_on_a_bidirectional_vision_variant_matches_hf_masks():
    """A Gemma 4 whose images attend bidirectionally (``use_bidirectional_attention="vision"``, the 31B / 26B-A4B
    setting) does so in its SLIDING layers only: Prune rebuilds that (``image_attention_kinds``) == HF's own mask code
    (``Gemma4Model`` given the kept embeddings, per-layer inputs and token types). Declaring both kinds (Gemma 3's
    rule) or none gives other logits."""
    model, proc = T.build("gemma4")
    model.config.text_config.use_bidirectional_attention = "vision"
    vlm = mv.load(model, proc)
    assert vlm.adapter.image_attention == "bidirectional"
    assert "sliding layers only" in vlm.adapter.sequence_change_refusal  # VisualEntry / VisualExit refuse it too
    b = batch_of(vlm, "gemma4")
    clean = clean_lm_kwargs(vlm, b)
    ts = Positions(list(range(0, int(b.visual_mask[0].sum()), 2)))
    sel = resolve(ts, b)
    logits, _ = nn_run(vlm, b, [Prune(ts)])
    pos = clean["position_ids"].expand(b.visual_mask.shape[0], -1)
    for r in range(b.visual_mask.shape[0]):
        kept = (~sel[r]).nonzero()[:, 0]
        with torch.no_grad():
            h = vlm.hf.model(inputs_embeds=clean["inputs_embeds"][r:r + 1, kept],
                             attention_mask=b.inputs["attention_mask"][r:r + 1, kept], position_ids=pos[r:r + 1, kept],
                             mm_token_type_ids=b.inputs["mm_token_type_ids"][r:r + 1, kept],
                             per_layer_inputs=clean["per_layer_inputs"][r:r + 1, kept]).last_hidden_state
            ref = _cap(vlm, vlm.hf.lm_head(h))[0]
        real = b.inputs["attention_mask"][r, kept].bool()
        got = logits[r, -len(kept):]
        assert (got[real] - ref[real]).abs().max() < 1e-5, r
    for kinds, attn in ((("full_attention", "sliding_attention"), "bidirectional"), ((), "causal")):
        wrong = type("WrongKinds", (type(vlm.adapter),), {"image_attention_kinds": kinds,
                                                          "image_attention": attn})(vlm.hf)
        right, vlm.adapter = vlm.adapter, wrong
        try:
            bad, _ = nn_run(vlm, b, [Prune(ts)])
        finally:
            vlm.adapter = right
        assert (bad - logits).abs().max() > 1e-4, kinds
