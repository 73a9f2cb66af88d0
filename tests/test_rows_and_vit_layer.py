"""Lenses leave out embedding rows no token maps to (unless asked), and ViTSinks reads the vision layer the LM receives;
both against plain torch on HF outputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mech_vtokens as mv
from mech_vtokens import testing as T
from mech_vtokens.probes import EmbedLens, LogitLens, ViTSinks

EXTRA = 6  # rows beyond len(tokenizer), as llava-hf pads 32002 tokens to 32064 rows


@pytest.fixture(scope="module")
def padded():
    """A tiny LLaVA whose embedding and unembedding matrices have EXTRA rows no token maps to, planted as the nearest
    neighbours of the visual tokens' hidden states (so a lens that searches them returns them)."""
    model, proc = T.build("llava", seed=3)
    n_tok = len(proc.tokenizer)
    model.resize_token_embeddings(n_tok + EXTRA, mean_resizing=False)
    vlm = mv.load(model, proc)
    batch = vlm.prepare([T.image(seed=1)], [T.prompt("llava")])
    with torch.no_grad():  # the hidden states do not depend on rows no input id selects
        hs = vlm.hf(**batch.inputs, output_hidden_states=True).hidden_states
    h0 = hs[0][batch.visual_mask]  # hook_embed at the visual positions
    h1 = hs[1][batch.visual_mask]  # blocks.0.hook_resid_post
    with torch.no_grad():
        E = vlm.hf.get_input_embeddings().weight
        E[n_tok:] = h0[:EXTRA] * 3.0  # cosine 1 with visual tokens 0..EXTRA-1
        normed = vlm.final_norm(h1)
        vlm.unembed.weight[n_tok:] = 50.0 * normed[:EXTRA] / normed[:EXTRA].norm(dim=-1, keepdim=True)
    return vlm, batch, n_tok, h0, h1


def _cos_topk(h, W, k):
    return (F.normalize(h.float(), dim=-1) @ F.normalize(W.float(), dim=-1).T).topk(k, dim=-1)


def test_lenses_leave_out_unused_rows_by_default(padded):
    vlm, batch, n_tok, h0, h1 = padded
    E, U = vlm.embedding_matrix.detach(), vlm.unembed.weight.detach()
    k = 4
    res = mv.run(
        vlm, batch.images, batch.prompts,
        probes=[EmbedLens(k=k, sites=["hook_embed"]), EmbedLens(k=k, sites=["hook_embed"], unused_rows=True),
                LogitLens(k=k, sites=["blocks.0.hook_resid_post"]),
                LogitLens(k=k, sites=["blocks.0.hook_resid_post"], unused_rows=True)])
    default_e, all_e, default_l, all_l = (res[k] for k in ("embed_lens", "embed_lens_1", "logit_lens", "logit_lens_1"))
    # the planted rows ARE the nearest neighbours over the whole matrix ...
    full = _cos_topk(h0, E, k)
    assert (full.indices[:EXTRA, 0] >= n_tok).all()
    assert torch.equal(all_e.ids["hook_embed"], full.indices)
    torch.testing.assert_close(all_e.scores["hook_embed"], full.values, atol=1e-5, rtol=1e-5)
    # ... and left out by default: the answer is the top-k over the tokenizer's rows
    kept = _cos_topk(h0, E[:n_tok], k)
    assert torch.equal(default_e.ids["hook_embed"], kept.indices)
    assert (default_e.ids["hook_embed"] < n_tok).all()
    with torch.no_grad():
        logits = vlm.final_norm(h1).float() @ U.float().T
    site = "blocks.0.hook_resid_post"
    assert (logits.topk(k).indices[:EXTRA, 0] >= n_tok).all()
    assert torch.equal(all_l.ids[site], logits.topk(k).indices)
    assert torch.equal(default_l.ids[site], logits[:, :n_tok].topk(k).indices)
    assert (default_l.to_pandas()["token"] != "").all()


@pytest.mark.parametrize("family", T.FAMILIES)
def test_vit_sinks_default_layer_is_the_one_the_lm_receives(tiny_vlm, family):
    vlm = tiny_vlm(family)
    cfg_layer = getattr(vlm.hf.config, "vision_feature_layer", None)
    if cfg_layer is None and not family.startswith("qwen"):
        cfg_layer = -1  # Gemma 3: no key, its projector reads the last block (through SigLIP's post-layernorm)
    n = vlm.n_vision_layers
    # Qwen's merger / Idefics3's connector / GLM-4V's downsample + merger / Gemma 4's pooler: the last block
    last = family.startswith(("qwen", "idefics3", "smolvlm", "glm4v", "gemma4"))
    want = n - 1 if last else cfg_layer % n
    assert last or cfg_layer in (-1, -2)
    batch = vlm.prepare([T.image(112, 0)], [T.prompt(family)])
    res = mv.run(vlm, batch.images, batch.prompts, probes=[ViTSinks(threshold=1.0)])["vit_sinks"]
    assert res.layer == want and res.site == f"vision.blocks.{want}.hook_resid_post"
    assert (res.to_pandas()["vision_layer"] == want).all()
    # plain-torch reference: HF output_hidden_states of the vision tower at the config's index (Qwen: a forward hook
    # on the last block, what the merger reads)
    from mech_vtokens.adapters.base import _resolve

    if last:
        got = {}
        hook = _resolve(vlm.hf, vlm.adapter.vision_layers)[-1].register_forward_hook(
            lambda m, i, o: got.__setitem__("x", o))
        with torch.no_grad():
            vlm.hf(**batch.inputs)
        hook.remove()
        ref = got["x"]
    else:  # the pixels the model hands its vision tower (anyres: the images' real tiles), run once more by hand
        seen = {}
        hook = vlm.hf.model.vision_tower.register_forward_pre_hook(
            lambda m, a, k: seen.update(pixels=a[0] if a else k["pixel_values"]), with_kwargs=True)
        with torch.no_grad():
            vlm.hf(**batch.inputs)
        hook.remove()
        with torch.no_grad():
            out = vlm.hf.model.vision_tower(seen["pixels"], output_hidden_states=True)
        ref = out.hidden_states[cfg_layer]
    norms = ref.reshape(-1, ref.shape[-1]).float().norm(dim=-1)
    torch.testing.assert_close(res.row_norms, norms, atol=1e-5, rtol=1e-5)
    # per token the max over its vision rows (weight > 0; NaN for a newline token, which has none), by a plain loop
    want = [max((float(norms[r]) for r, w in zip(rows, ws) if w > 0), default=float("nan"))
            for rows, ws in zip(batch.tokens["vision_rows"].tolist(), batch.tokens["vision_weights"].tolist())]
    torch.testing.assert_close(res.l2, torch.tensor(want), atol=1e-5, rtol=1e-5, equal_nan=True)
