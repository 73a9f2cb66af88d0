"""The sites this project reads equal TransformerLens 4.x ``TransformerBridge`` hooks (an independent oracle).

The bridge boots on a SEPARATE copy of the weights (it rewrites layers in place) with eager attention; our model is
loaded with eager attention too, so both run the same kernels. TL's automatic ``pip install torchvision`` is
disabled, and its Qwen2.5-VL adapter's torchvision requirement (for the video processor, unused here: we pass our
own processed inputs) is lifted for the test.

Qwen2-VL: TL 4.3 has no adapter for ``Qwen2VLForConditionalGeneration`` (its factory and ``MULTIMODAL_ARCHITECTURES``
list Qwen2.5-VL, not Qwen2-VL). Qwen2-VL's language side is module for module the one TL's Qwen2.5-VL adapter maps
(``model.language_model.layers[i]`` with ``input_layernorm`` / ``self_attn.{q,k,v,o}_proj`` (biased) /
``post_attention_layernorm`` / gated ``mlp``, ``model.language_model.norm``, ``lm_head``, merger at
``model.visual.merger``); only the ViT block's MLP differs (``fc1`` / ``fc2``, not gated, LayerNorm block norms).
So the test registers ``_Qwen2VLAdapter``: TL's own Qwen2.5-VL adapter with the ViT MLP renamed. Every hook value
still comes from TL's bridge (its block wrappers and hook points), not from our site table.

InternVL is NOT cross-checked: TL 4.3 has no InternVL adapter (no ``InternVLForConditionalGeneration`` in its
factory, nor in ``MULTIMODAL_ARCHITECTURES``), and no adapter of its maps InternVL's layout: a ViT at
``model.vision_tower.encoder.layer[i]`` whose sublayers are scaled by learned ``lambda_1`` / ``lambda_2`` before the
residual add (no TL vision block wrapper has them) and a pixel-shuffle projector. Writing that adapter here would
make the oracle our own reading of InternVL, which is what the test exists to check; InternVL's sites are checked
against plain HF forwards in tests/test_sites.py instead.

GLM-4.1V: TL 4.3's ``Glm4vArchitectureAdapter`` maps the GLM-4 decoder (its sandwich norms as ``ln1_post`` /
``ln2_post``, so the bridge's ``hook_attn_out`` / ``hook_mlp_out`` are the post-norm outputs) and the merger, but
delegates the vision tower opaquely (no per-block hooks): the vision blocks are not cross-checked there (they are
against plain HF in tests/test_core.py and tests/test_glm4v.py). GLM-4.5V (``Glm4vMoeForConditionalGeneration``) has
no TL adapter.
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
    from transformer_lens.model_bridge.supported_architectures.glm4v import Glm4vArchitectureAdapter

    Glm4vArchitectureAdapter.required_libraries = []  # torchvision: GLM's video processor, unused here

    from transformer_lens.model_bridge.supported_architectures.qwen3_5_multimodal import (
        Qwen3_5MultimodalArchitectureAdapter)

    Qwen3_5MultimodalArchitectureAdapter.required_libraries = []  # (Qwen3.5; the MoE adapter subclasses it)
    _register_qwen2_vl()
    hf = AutoModelForImageTextToText.from_pretrained(path, attn_implementation="eager").eval()
    tok = AutoTokenizer.from_pretrained(path)
    return TransformerBridge.boot_transformers(path, hf_model=hf, tokenizer=tok, device="cpu")


def _register_qwen2_vl():
    """TL's Qwen2.5-VL adapter registered for Qwen2-VL, the ViT MLP renamed (see the module docstring)."""
    from transformer_lens.factories import architecture_adapter_factory as factory
    from transformer_lens.model_bridge.generalized_components import LinearBridge
    from transformer_lens.model_bridge.generalized_components.base import GeneralizedComponent
    from transformer_lens.model_bridge.supported_architectures.qwen2_5_vl import Qwen2_5_VLArchitectureAdapter
    from transformer_lens.utilities import architectures

    class _Qwen2VLAdapter(Qwen2_5_VLArchitectureAdapter):
        def __init__(self, cfg):
            super().__init__(cfg)
            blocks = self.component_mapping["vision_encoder"].submodules["blocks"]
            blocks.submodules["mlp"] = GeneralizedComponent(
                name="mlp", submodules={"in": LinearBridge(name="fc1"), "out": LinearBridge(name="fc2")})

    factory.ArchitectureAdapterFactory.register_adapter("Qwen2VLForConditionalGeneration", _Qwen2VLAdapter)
    factory.SUPPORTED_ARCHITECTURES["Qwen2VLForConditionalGeneration"] = _Qwen2VLAdapter  # the config lookup
    architectures.MULTIMODAL_ARCHITECTURES.add("Qwen2VLForConditionalGeneration")


VISION = {"qwen2_vl": "vision_encoder.blocks.{i}.hook_resid_post",
          "llava": "vision_encoder.encoder_layers.{i}.hook_resid_post",
          "qwen2_5_vl": "vision_encoder.blocks.{i}.hook_resid_post",
          "qwen3_vl": "vision_encoder.blocks.{i}.hook_resid_post",
          "qwen3_vl_moe": "vision_encoder.blocks.{i}.hook_resid_post",
          "llava_next": "vision_encoder.encoder_layers.{i}.hook_resid_post",
          "llava_onevision": "vision_encoder.encoder_layers.{i}.hook_resid_post",
          "gemma3": "vision_encoder.encoder_layers.{i}.hook_resid_post",
          "idefics3": "vision_encoder.encoder_layers.{i}.hook_resid_post"}
VISION.update(qwen3_5=VISION["qwen3_vl"], qwen3_5_moe=VISION["qwen3_vl"])


# TL's RMSNorm bridge hooks `hook_normalized` BEFORE the weight; Gemma's norm scales by (1 + w): the module's output,
# what lm_head reads, is its `hook_out`
FINAL_OUT = {"gemma3"}
FINAL_OUT |= {"qwen3_5", "qwen3_5_moe"}  # Qwen3.5's RMSNorm scales by (1 + w) too
# TL 4.3's Mistral 3 adapter delegates the Pixtral tower opaquely (one component, no per-block hooks: its 2-D RoPE
# block-diagonal attention has no bridge), so the vision blocks are not cross-checked there; tests/test_mistral3.py
# checks them against a plain-torch Pixtral forward instead
OPAQUE_VISION = {"mistral3"}
# (the tiny GLM-4.1V's final norm has a random weight, not ones: its output is not TL's pre-weight hook_normalized)
FINAL_OUT |= {"glm4v"}
# TL's GLM-4V adapter delegates the GLM vision tower opaquely too
OPAQUE_VISION |= {"glm4v"}
# Gemma 4: Gemma4RMSNorm scales by w (TL's final norm has hook_out only); TL bridges the vision tower as one component
# (no per-block hooks: OPAQUE_VISION; its pooled output is checked against ours in tests/test_gemma4.py); its
# `unembed.hook_out` is lm_head's output, our site the model's logits = final_logit_softcapping applied to it
# (written here); our `hook_ple_out` is its `post_per_layer_input_norm.hook_out`
FINAL_OUT.add("gemma4")
SOFTCAP = {"gemma4"}
OPAQUE_VISION.add("gemma4")


@pytest.mark.parametrize("fam", ["llava", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "llava_next", "llava_onevision",
                                 "idefics3", "gemma3", "mistral3", "glm4v", "qwen3_5", "qwen3_5_moe", "gemma4"])
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
        if site.endswith(".hook_attn_out") and site not in cache:  # a linear-attention layer (Qwen3.5): its mixer
            return cache[site.replace("hook_attn_out", "linear_attn.hook_out")]
        if site == "unembed.hook_out" and fam in SOFTCAP:
            cap = vlm.hf.config.get_text_config().final_logit_softcapping
            return torch.tanh(cache["unembed.hook_out"] / cap) * cap
        if site.endswith(".hook_ple_out"):
            return cache[site.replace("hook_ple_out", "post_per_layer_input_norm.hook_out")]
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
        f"blocks.{i}.{vlm.adapter.injection[0]}" for i in vlm.adapter.injection_layers()} | {
        f"blocks.{i}.hook_ple_out" for i in range(n) if "hook_ple_out" in vlm.adapter.block_site_names}
    if fam in OPAQUE_VISION:
        must -= {f"vision.blocks.{i}.hook_resid_post" for i in range(vlm.n_vision_layers)}
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


def test_qwen2_vl_sites_equal_transformer_bridge_hooks(tiny_dir):
    """Qwen2-VL through TL's Qwen2.5-VL adapter, the ViT MLP renamed (module docstring); the same checks."""
    test_sites_equal_transformer_bridge_hooks(tiny_dir, "qwen2_vl")
