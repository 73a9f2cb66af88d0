"""The sites this project reads equal TransformerLens 4.x ``TransformerBridge`` hooks (an independent oracle).

The bridge boots on a SEPARATE copy of the weights (it rewrites layers in place) with eager attention; our model is
loaded with eager attention too, so both run the same kernels. TL's automatic ``pip install torchvision`` is
disabled, and its Qwen2.5-VL adapter's torchvision requirement (for the video processor, unused here: we pass our
own processed inputs) is lifted for the test.
"""

from __future__ import annotations

import pytest
import torch

import mech_vtokens as mv
from mech_vtokens import testing as T

tl = pytest.importorskip("transformer_lens")

ATOL = 1e-5


def _boot(path):
    import transformer_lens.model_bridge.sources.transformers.helpers as helpers

    helpers._ensure_torchvision = lambda: False  # never let TL install torchvision
    from transformer_lens.model_bridge import TransformerBridge
    from transformer_lens.model_bridge.supported_architectures.qwen2_5_vl import Qwen2_5_VLArchitectureAdapter
    from transformer_lens.model_bridge.supported_architectures.qwen3_vl import Qwen3VLArchitectureAdapter
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    Qwen2_5_VLArchitectureAdapter.required_libraries = []
    Qwen3VLArchitectureAdapter.required_libraries = []  # the MoE adapter subclasses it
    hf = AutoModelForImageTextToText.from_pretrained(path, attn_implementation="eager").eval()
    tok = AutoTokenizer.from_pretrained(path)
    return TransformerBridge.boot_transformers(path, hf_model=hf, tokenizer=tok, device="cpu")


VISION = {"llava": "vision_encoder.encoder_layers.{i}.hook_resid_post",
          "qwen2_5_vl": "vision_encoder.blocks.{i}.hook_resid_post",
          "qwen3_vl": "vision_encoder.blocks.{i}.hook_resid_post",
          "qwen3_vl_moe": "vision_encoder.blocks.{i}.hook_resid_post",
          "llava_next": "vision_encoder.encoder_layers.{i}.hook_resid_post",
          "llava_onevision": "vision_encoder.encoder_layers.{i}.hook_resid_post",
          "gemma3": "vision_encoder.encoder_layers.{i}.hook_resid_post"}


# TL's RMSNorm bridge hooks `hook_normalized` BEFORE the weight; Gemma's norm scales by (1 + w): the module's output,
# what lm_head reads, is its `hook_out`
FINAL_OUT = {"gemma3"}


@pytest.mark.parametrize("fam", ["llava", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "llava_next", "llava_onevision",
                                 "gemma3"])
def test_sites_equal_transformer_bridge_hooks(tiny_dir, fam):
    from mech_vtokens.probes import Activations, EmbedLens, LogitLens

    path = tiny_dir(fam)
    vlm = mv.load(path, attn_implementation="eager")
    ims, prs = [T.image(112, 0), T.image(96, 1)], [T.prompt(fam), T.prompt(fam, "is the red circle left ?")]
    batch = vlm.prepare(ims, prs)
    ours_sites = [s for s in vlm.sites if s not in ("lm.hook_inputs",)]
    res = mv.run(vlm, ims, prs, probes=[Activations(ours_sites), EmbedLens(k=3), LogitLens(k=3)])
    act, el, ll = res["activations"], res["embed_lens"], res["logit_lens"]

    bridge = _boot(path)
    kw = {k: v for k, v in batch.inputs.items() if k != "input_ids"}
    with torch.no_grad():
        logits, cache = bridge.run_with_cache(batch.inputs["input_ids"], **kw)

    def theirs(site):
        if site == "hook_embed":
            return cache["blocks.0.hook_resid_pre"]  # the LM input: text embeddings with the image scattered in
        if site == "ln_final.hook_normalized" and fam in FINAL_OUT:
            return cache["ln_final.hook_out"]
        if site.startswith("vision.blocks."):
            return cache[VISION[fam].format(i=site.split(".")[2])]
        if site.endswith(".hook_deepstack"):  # TL has no hook for it: what lies between layer i and i + 1
            i = int(site.split(".")[1])
            nxt = cache[f"blocks.{i + 1}.hook_resid_pre"] if i + 1 < n else cache["ln_final.hook_in"]
            return nxt - cache[f"blocks.{i}.hook_resid_post"]
        return cache[site]

    n = vlm.n_layers
    checked = []
    for site in ours_sites:
        try:
            ref = theirs(site)
        except KeyError:
            continue
        a = act[site]
        assert a.numel() == ref.numel(), site
        torch.testing.assert_close(a.reshape(ref.shape), ref, atol=ATOL, rtol=0, msg=site)
        checked.append(site)
    must = {"hook_embed", "vision_projector.hook_out", "unembed.hook_out"} | {
        f"blocks.{i}.{h}" for i in range(n) for h in ("hook_resid_pre", "hook_attn_out", "hook_resid_mid",
                                                      "hook_mlp_out", "hook_resid_post")} | {
        f"vision.blocks.{i}.hook_resid_post" for i in range(vlm.n_vision_layers)} | {
        f"blocks.{i}.{vlm.adapter.injection[0]}" for i in vlm.adapter.injection_layers()}
    assert must <= set(checked), sorted(must - set(checked))
    torch.testing.assert_close(act["unembed.hook_out"], logits, atol=ATOL, rtol=0)
    # the lenses on the bridge's states give the same ids
    W = vlm.embedding_matrix.float()
    for site in el.ids:
        h = theirs(site)[batch.visual_mask].float()
        cos = torch.nn.functional.normalize(h, dim=1) @ torch.nn.functional.normalize(W, dim=1).T
        assert torch.equal(el.ids[site], cos.topk(3, dim=1).indices), site
        with torch.no_grad():
            lg = vlm.unembed(vlm.final_norm(theirs(site)[batch.visual_mask]))
        assert torch.equal(ll.ids[site], lg.topk(3, dim=1).indices), site
