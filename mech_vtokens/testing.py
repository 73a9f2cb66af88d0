"""Tiny, seeded, offline models of every supported family — for tests, notebooks and benchmarks.

``tiny_model(family, path)`` builds a random model of that family from configs (no hub), with a real
offline processor (word-level tokenizer, PIL image processor), saves both with ``save_pretrained``
and returns ``path``: load it back with ``mech_vtokens.load(path)``, the same code path as a real
checkpoint. ``medium_llava(path)`` builds a model with LLaVA-1.5-7B shapes for benchmarks.

Everything here is deterministic: the same family and seed give the same weights bit for bit.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

FAMILIES = ("llava", "qwen2_vl", "qwen2_5_vl", "internvl", "llava_next", "llava_onevision")

# Fixtures from the real checkpoints' hub files (mech_vtokens/fixtures/real.py).
from .fixtures.real import REAL_CHECKPOINTS, real_model  # noqa: E402,F401

# A small word-level vocabulary: enough to tokenize every prompt the tests and notebooks use.
WORDS = (
    "a an the is are of on in at to and with what which how many color colour shape object image picture "
    "photo there this that it here left right top bottom middle center red green blue yellow black white "
    "gray orange purple pink brown circle square triangle star cross one two three four five describe "
    "USER ASSISTANT user assistant system you helpful answer question word letter text ? : . , ! "
    "cat dog car tree sky house person ball"
).split()

_SPECIALS = {
    "llava": ["<pad>", "<unk>", "<s>", "</s>", "<image>"],
    "qwen2_vl": ["<pad>", "<unk>", "<|endoftext|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                 "<|video_pad|>"],
    "internvl": ["<pad>", "<unk>", "<s>", "</s>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"],
}
_SPECIALS["qwen2_5_vl"] = _SPECIALS["qwen2_vl"]
_SPECIALS["llava_next"] = _SPECIALS["llava"]
_SPECIALS["llava_onevision"] = ["<pad>", "<unk>", "<|endoftext|>", "<image>", "<video>"]

# The image token of each fixture's tokenizer (the adapters declare the span around it).
_IMAGE_TOKEN = {"llava": "<image>", "qwen2_vl": "<|image_pad|>", "qwen2_5_vl": "<|image_pad|>",
                "internvl": "<IMG_CONTEXT>", "llava_next": "<image>", "llava_onevision": "<image>"}


def image_span(family: str) -> str:
    """The whole text span of one image in a ``family`` prompt (the adapter's declaration; ``vlm.image_placeholder``
    once loaded)."""
    from .adapters import ADAPTERS

    return next(a for a in ADAPTERS if a.family == family).image_span.format(image=_IMAGE_TOKEN[family])


def prompt(family: str, question: str = "what color is the object ?", n_images: int = 1) -> str:
    """A prompt in the fixtures' own chat format (``USER : <spans> question ASSISTANT :``; first token ``USER``) with
    ``n_images`` image spans. On a loaded model use ``vlm.prompt``."""
    return "USER : " + image_span(family) * n_images + " " + question + " ASSISTANT :"


def _tokenizer(family: str):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = _SPECIALS[family]
    vocab = {tok: i for i, tok in enumerate(specials + [w for w in WORDS])}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    kwargs = dict(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>")
    if family in ("llava", "llava_next"):
        kwargs.update(bos_token="<s>", eos_token="</s>", extra_special_tokens={"image_token": "<image>"})
    elif family == "llava_onevision":
        kwargs.update(eos_token="<|endoftext|>", extra_special_tokens={"image_token": "<image>",
                                                                      "video_token": "<video>"})
    elif family == "internvl":
        kwargs.update(bos_token="<s>", eos_token="</s>", extra_special_tokens={
            "start_image_token": "<img>", "end_image_token": "</img>",
            "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"})
    else:
        kwargs.update(eos_token="<|endoftext|>", extra_special_tokens={
            "image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
            "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"})
    tok = PreTrainedTokenizerFast(**kwargs)
    tok.add_special_tokens({"additional_special_tokens": [t for t in specials if t not in ("<pad>", "<unk>")]})
    tok.padding_side = "left"
    return tok


def _llava(seed: int, medium: bool = False):
    from transformers import (CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    tok = _tokenizer("llava")
    if medium:  # LLaVA-1.5-7B shapes: CLIP-L/14-336 (576 patches), LLaMA-7B widths, vocab 32000, 2 + 2 layers
        vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=2,
                                  num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
        text = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=2, num_attention_heads=32,
                           num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
        size = 336
    else:
        vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=84, patch_size=14, projection_dim=32)
        text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=512)
        size = 84
    text.pad_token_id, text.bos_token_id, text.eos_token_id = tok.pad_token_id, tok.bos_token_id, tok.eos_token_id
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         image_seq_length=(size // 14) ** 2)
    config.architectures = ["LlavaForConditionalGeneration"]
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    ip = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                               do_center_crop=True, do_resize=True)
    proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, image_token="<image>")
    return model, proc


def _qwen(seed: int, v25: bool):
    from transformers import Qwen2VLImageProcessorPil

    tok = _tokenizer("qwen2_5_vl" if v25 else "qwen2_vl")
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=512,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0})
    ids = dict(image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
               video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
               vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
               vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"))
    if v25:
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration as M
        from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor as P

        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, window_size=56, out_hidden_size=64,
                      fullatt_block_indexes=[1])
        config = Qwen2_5_VLConfig(vision_config=vision, text_config=text, **ids)
        arch = "Qwen2_5_VLForConditionalGeneration"
    else:
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration as M
        from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor as P

        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2)
        config = Qwen2VLConfig(vision_config=vision, text_config=text, **ids)
        arch = "Qwen2VLForConditionalGeneration"
    config.architectures = [arch]
    torch.manual_seed(seed)
    model = M(config).eval()
    # 56*56 .. 112*112 pixels: an image becomes at most 8x8 patches = 4x4 merged visual tokens.
    ip = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112, patch_size=14, merge_size=2,
                                  temporal_patch_size=2)
    from .adapters.components import videoless

    proc = videoless(P)(image_processor=ip, tokenizer=tok)
    return model, proc


def _internvl(seed: int):
    from transformers import (GotOcr2ImageProcessorPil, InternVLConfig, InternVLForConditionalGeneration,
                              InternVLVisionConfig, Qwen2Config)
    from transformers.models.internvl.processing_internvl import InternVLProcessor

    from .adapters.components import videoless

    tok = _tokenizer("internvl")
    vision = InternVLVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=[112, 112], patch_size=[14, 14], use_mean_pooling=False)
    text = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=512)
    config = InternVLConfig(vision_config=vision, text_config=text,
                            image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"), image_seq_length=16,
                            downsample_ratio=0.5, vision_feature_layer=-1, tie_word_embeddings=False)
    config.architectures = ["InternVLForConditionalGeneration"]
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config).eval()
    ip = GotOcr2ImageProcessorPil(size={"height": 112, "width": 112}, crop_to_patches=True, min_patches=1,
                                  max_patches=4)
    proc = videoless(InternVLProcessor)(image_processor=ip, tokenizer=tok, image_seq_length=16)
    return model, proc


# Anyres fixtures: 56-px tiles of 4x4 patches (14 px); pinpoints up to 2x2 tiles, so the test images get 1-4 tiles.
_ANYRES_PINPOINTS = [[56, 56], [56, 112], [112, 56], [112, 112], [56, 168], [168, 56]]


def _llava_next(seed: int):
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration,
                              LlavaNextImageProcessorPil, LlavaNextProcessor)

    tok = _tokenizer("llava_next")
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=56, patch_size=14, projection_dim=32)
    text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=1024)
    text.pad_token_id, text.bos_token_id, text.eos_token_id = tok.pad_token_id, tok.bos_token_id, tok.eos_token_id
    config = LlavaNextConfig(vision_config=vision, text_config=text,
                             image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
                             vision_feature_select_strategy="default", image_grid_pinpoints=_ANYRES_PINPOINTS,
                             image_seq_length=16)
    config.architectures = ["LlavaNextForConditionalGeneration"]
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).eval()
    ip = LlavaNextImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56},
                                    image_grid_pinpoints=_ANYRES_PINPOINTS)
    proc = LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=14,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1,
                              image_token="<image>")
    return model, proc


def _llava_onevision(seed: int):
    from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration,
                              LlavaOnevisionImageProcessorPil, Qwen2Config, SiglipVisionConfig)
    from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor

    from .adapters.components import videoless

    tok = _tokenizer("llava_onevision")
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=56, patch_size=14, vision_use_head=False)
    text = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=1024)
    # anyres_max_3: canvases above 3 tiles' worth of tokens (48) are resized bilinearly (the 224-px test image)
    config = LlavaOnevisionConfig(vision_config=vision, text_config=text,
                                  image_token_id=tok.convert_tokens_to_ids("<image>"),
                                  video_token_id=tok.convert_tokens_to_ids("<video>"), vision_feature_layer=-1,
                                  vision_feature_select_strategy="full", image_grid_pinpoints=_ANYRES_PINPOINTS,
                                  vision_aspect_ratio="anyres_max_3", tie_word_embeddings=False)
    config.architectures = ["LlavaOnevisionForConditionalGeneration"]
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    ip = LlavaOnevisionImageProcessorPil(size={"height": 56, "width": 56}, image_grid_pinpoints=_ANYRES_PINPOINTS,
                                         do_pad=True)
    proc = videoless(LlavaOnevisionProcessor)(image_processor=ip, tokenizer=tok, num_image_tokens=16,
                                              vision_feature_select_strategy="full", image_token="<image>",
                                              video_token="<video>", vision_aspect_ratio="anyres_max_3")
    return model, proc


def build(family: str, seed: int = 0):
    """(model, processor) of a tiny random model of ``family``, in memory."""
    if family == "llava":
        return _llava(seed)
    if family in ("qwen2_vl", "qwen2_5_vl"):
        return _qwen(seed, family == "qwen2_5_vl")
    if family == "internvl":
        return _internvl(seed)
    if family == "llava_next":
        return _llava_next(seed)
    if family == "llava_onevision":
        return _llava_onevision(seed)
    raise ValueError(f"unknown tiny family {family!r}; choose one of {FAMILIES}")


def _save(model, proc, path) -> str:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    proc.save_pretrained(path)
    return str(path)


def tiny_model(family: str, path: str | os.PathLike, seed: int = 0) -> str:
    """Build a tiny random ``family`` model + processor, ``save_pretrained`` them into ``path``; return the path.

    Cached: if ``path`` already holds a saved model it is returned as is.
    """
    if (Path(path) / "config.json").exists():
        return str(path)
    return _save(*build(family, seed), path)


def medium_llava(path: str | os.PathLike, seed: int = 0) -> str:
    """A random model with real LLaVA-1.5-7B shapes (CLIP-L/14-336, 576 patches; LLaMA-7B widths, vocab 32000)
    but 2 vision + 2 text layers, saved in bf16 into ``path``. For benchmarks."""
    if (Path(path) / "config.json").exists():
        return str(path)
    model, proc = _llava(seed, medium=True)
    return _save(model.to(torch.bfloat16), proc, path)


def image(size: int = 112, seed: int = 0, marker: tuple[int, int, int, int] | None = None):
    """A seeded smooth random RGB image; ``marker=(x0, y0, x1, y1)`` paints that box pure white."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(4, 4, 3)).astype(np.uint8)
    img = Image.fromarray(base).resize((size, size), Image.BILINEAR)
    if marker is not None:
        arr = np.array(img)
        x0, y0, x1, y1 = marker
        arr[y0:y1, x0:x1] = 255
        img = Image.fromarray(arr)
    return img


# ---------------------------------------------------------------------------------------------------------------
# A planted sink / dead / alive partition (for the partition analyses; paper Secs. 4-6)
# ---------------------------------------------------------------------------------------------------------------

# Per family: image side (px) = the model's input side, so the processor does not resample; cell = the pixels of one
# visual token (patches are 14 px); where the two kinds of sink markers are painted (token grid cells).
_PLANTED = {
    "llava": dict(side=84, cell=14, patch=14, grid=6, vit=[(0, 0), (0, 5)], llm=[(5, 5)]),
    "qwen2_5_vl": dict(side=112, cell=28, patch=14, grid=4, vit=[(0, 0)], llm=[(3, 3)]),
    "internvl": dict(side=112, cell=28, patch=14, grid=4, vit=[(0, 0)], llm=[(3, 3)]),
}
_CONTENT_WORDS = ("cat", "dog", "car", "tree", "person", "red", "green", "blue", "yellow", "circle", "square",
                  "star")


# C901: one weight-planting recipe per family, written out step by step (a test fixture)
def planted_partition_model(family: str, path: str | os.PathLike, seed: int = 0):  # noqa: C901
    """A tiny ``family`` model (llava, qwen2_5_vl, internvl) whose weights plant a known token partition.

    Returns ``(path, truth)``; draw images with :func:`planted_image` (``truth`` says where the sinks are).

    How the images code the groups (each token's cell is painted with one pattern, aligned to the patches):
    ViT-sink cells carry a 1-pixel checkerboard, LLM-sink cells vertical 1-pixel stripes, background cells horizontal
    1-pixel stripes, content cells four random uniform colours (one per quadrant of each patch). The sink cells sit
    at fixed grid positions (``truth["vit"]``, ``truth["llm"]``), so sinks are image-independent; background (dead)
    cells are the same pattern in every image; content (alive) cells differ.

    How the weights turn that into the partition (vision blocks are made the identity; channels come in (+x, -x)
    pairs so LayerNorms keep their direction): the patch convolution computes, per patch, the 12 quadrant-mean
    colours and three texture responses (checker, vertical, horizontal filters; exactly 0 on uniform colours) plus a
    constant. ViT sinks: the checker response is huge in the LAST vision block (``truth["vit_norm_min"]`` vs
    ``truth["other_norm_max"]``). The projector (its GELU kept in the linear regime) writes, in the LM's input space:

    - ViT sink: a fixed vector whose nearest embedding is the word ``truth["ref_words"]["vit_sink"]``;
    - LLM sink: massive values in channels ``truth["sink_dims"]`` (as the BOS-role first token ``USER`` has, so
      φ(x) > ``truth["phi_threshold"]`` and the dims are discoverable from BOS);
    - dead: one fixed vector far from the text embeddings (negative cosine to their centroid), nearest word
      ``truth["ref_words"]["dead"]``;
    - alive: ``base + s * Σ colour_j * e(content word j)``: image-dependent, near the text centroid.

    The LM's input embeddings share a constant channel ``truth["z"]`` (a non-zero text centroid); in every layer one
    low-frequency rotary dim of each query/key head reads that channel, so keys of dead tokens (negative there) get
    ~ -40 attention logits: dead tokens receive no attention (the paper's "inert residues").
    """
    import json

    if family not in _PLANTED:
        raise ValueError(f"planted_partition_model supports {tuple(_PLANTED)}, not {family!r}")
    path = Path(path)
    if (path / "config.json").exists() and (path / "planted_truth.json").exists():
        return str(path), json.loads((path / "planted_truth.json").read_text())
    spec = _PLANTED[family]
    model, proc = build(family, seed)
    tok = proc.tokenizer
    p = spec["patch"]
    h = p // 2
    # conv filters over NORMALISED pixels: (32, 3, p, p); pair j -> channels (2j, 2j+1)
    filt = torch.zeros(16, 3, p, p)
    for q, (r0, c0) in enumerate([(0, 0), (0, h), (h, 0), (h, h)]):
        for c in range(3):
            filt[3 * q + c, c, r0:r0 + h, c0:c0 + h] = 1.0 / (h * h)
    yy, xx = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    # +1 where the pattern is bright
    sign = {12: 2.0 * ((xx + yy) % 2) - 1, 13: 2.0 * (xx % 2) - 1, 14: 2.0 * (yy % 2) - 1}
    is_llava = family == "llava"
    gains = {12: 10.0, 13: 10.0, 14: 10.0} if is_llava else {12: 50.0, 13: 3.0, 14: 3.0}
    for j, s in sign.items():
        filt[j] = s / (p * p) * gains[j]
    w = torch.zeros(32, 3, p, p)
    w[0::2], w[1::2] = filt, -filt
    const = torch.zeros(32)
    const[30], const[31] = 1.0, -1.0
    with torch.no_grad():
        if is_llava:
            v = model.model.vision_tower
            v.embeddings.patch_embedding.weight.copy_(w)
            v.embeddings.class_embedding.zero_()
            v.embeddings.position_embedding.weight.copy_(const.expand_as(v.embeddings.position_embedding.weight))
            v.pre_layrnorm.weight.fill_(1.0)
            v.pre_layrnorm.bias.zero_()
            for layer in v.encoder.layers:
                for lin in (layer.self_attn.out_proj, layer.mlp.fc2):
                    lin.weight.zero_()
                    lin.bias.zero_()
            last = v.encoder.layers[-1]  # ViT-sink detector: huge checker channel in the last block only
            last.layer_norm2.weight.fill_(1.0)
            last.layer_norm2.bias.zero_()
            last.mlp.fc1.weight.zero_()
            last.mlp.fc1.bias.fill_(-20.0)
            last.mlp.fc1.weight[0, 24] = 10.0
            last.mlp.fc2.weight[24, 0], last.mlp.fc2.weight[25, 0] = 15.0, -15.0
            act_lin, out_lin = model.model.multi_modal_projector.linear_1, \
                model.model.multi_modal_projector.linear_2
        elif family == "qwen2_5_vl":
            v = model.model.visual
            v.patch_embed.proj.weight.copy_(w[:, :, None].expand(-1, -1, 2, -1, -1) / 2)
            for b in v.blocks:
                for lin in (b.attn.proj, b.mlp.down_proj):
                    lin.weight.zero_()
                    lin.bias.zero_()
            v.blocks[0].mlp.down_proj.bias.copy_(const)  # the constant channel pair
            v.merger.ln_q.weight.fill_(1.0)
            act_lin, out_lin = v.merger.mlp[0], v.merger.mlp[2]
        else:  # internvl
            v = model.model.vision_tower
            v.embeddings.patch_embeddings.projection.weight.copy_(w)
            v.embeddings.patch_embeddings.projection.bias.copy_(const)
            v.embeddings.cls_token.zero_()
            v.embeddings.position_embeddings.zero_()
            for layer in v.encoder.layer:
                layer.lambda_1.zero_()
                layer.lambda_2.zero_()
            v.layernorm.weight.fill_(1.0)
            v.layernorm.bias.zero_()
            pr = model.model.multi_modal_projector
            pr.layer_norm.weight.fill_(1.0)
            pr.layer_norm.bias.zero_()
            act_lin, out_lin = pr.linear_1, pr.linear_2

        # ---- the LM's input space -------------------------------------------------------------------------
        E = model.get_input_embeddings().weight
        d = E.shape[1]
        z, dims = d - 1, [5, 17]
        gen = torch.Generator().manual_seed(seed + 7)
        E[:, z] = 0.1
        user = tok.convert_tokens_to_ids("USER")
        E[user, dims] = 3.0  # the BOS role: massive activations in the sink dims
        cw = tok.convert_tokens_to_ids(list(_CONTENT_WORDS))
        Et = E.clone()
        Et[:, z] = 0.0
        basis = torch.linalg.qr(Et[cw].T)[0]  # (d, 12) orthonormal span of the content words (z part left out)
        refs = {"vit_sink": "sky", "dead": "house"}
        for word in refs.values():  # reference words orthogonal to the content words: alive tokens never hit them
            i = tok.convert_tokens_to_ids(word)
            row = Et[i] - basis @ (basis.T @ Et[i])
            row[dims] = 0.0
            E[i, :z] = row[:z] * (0.16 / row.norm())
        Et = E.clone()
        Et[:, z] = 0.0

        def unit(i):
            r = Et[tok.convert_tokens_to_ids(refs[i])]
            return r / r.norm()

        ez = torch.zeros(d)
        ez[z] = 1.0
        base = 0.1 * ez
        s_vit = 0.1 * ez + 0.15 * unit("vit_sink")
        s_llm = 0.1 * ez + 0.01 * torch.randn(d, generator=gen)
        s_llm[dims] = 3.0
        v_dead = -0.1 * ez + 0.15 * unit("dead")
        v_dead[dims] = -0.05  # away from the BOS-role token too
        act_lin.weight.zero_()
        act_lin.bias.zero_()
        for j in range(16):
            act_lin.weight[j, 2 * j] = 1.0
            act_lin.bias[j] = 30.0  # GELU(x + 30) = x + 30 to fp32 precision for |x| < 20
        out_lin.weight.zero_()
        for j, wi in enumerate(cw):
            out_lin.weight[:, j] = 0.12 * Et[wi]
        # the marker pair reads ~4 after the LayerNorms (one dominant (+x, -x) pair over 32 channels): target / 4
        out_lin.weight[:, 12] = (s_vit - base) / 4
        out_lin.weight[:, 13] = (s_llm - base) / 4
        out_lin.weight[:, 14] = (v_dead - base) / 4
        out_lin.bias.copy_(base - 30.0 * out_lin.weight[:, :16].sum(1))

        # ---- attention: keys negative on channel z (dead tokens) get ~no attention -------------------------
        lm = model.model.language_model
        for layer in lm.layers:
            att = layer.self_attn
            hd = att.head_dim
            for lin in (att.q_proj, att.k_proj):
                for hh in range(lin.weight.shape[0] // hd):
                    for r in (hd // 2 - 1, hd - 1):  # the lowest-frequency rotary pair
                        lin.weight[hh * hd + r] = 0.0
                        if lin.bias is not None:
                            lin.bias[hh * hd + r] = 0.0
                    lin.weight[hh * hd + hd // 2 - 1, z] = 2.0
    _save(model, proc, path)
    # measured facts of the construction (no code under test involved)
    truth = {"family": family, "side": spec["side"], "cell": spec["cell"], "grid": spec["grid"],
             "vit": spec["vit"], "llm": spec["llm"], "sink_dims": dims, "z": z, "phi_threshold": 4.0,
             "ref_words": {"vit_sink": refs["vit_sink"], "dead": refs["dead"], "llm_sink": "USER"},
             "ref_ids": {"vit_sink": tok.convert_tokens_to_ids(refs["vit_sink"]),
                         "dead": tok.convert_tokens_to_ids(refs["dead"]), "llm_sink": user},
             "content_words": list(_CONTENT_WORDS), "vit_threshold": 100.0}
    (path / "planted_truth.json").write_text(json.dumps(truth, indent=1))
    return str(path), truth


def planted_image(truth: dict, seed: int = 0, content: float | None = None):
    """An image for :func:`planted_partition_model` and its true labels.

    Returns ``(PIL image, labels)``: ``labels`` is a (grid, grid) list of lists with "vit_sink", "llm_sink", "dead"
    or "alive" per token cell (raster order). ``content``: fraction of the non-sink cells that carry content (default:
    drawn in 0.3..0.7 per image).
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    g, cell, side = truth["grid"], truth["cell"], truth["side"]
    arr = np.zeros((side, side, 3), np.uint8)
    yy, xx = np.mgrid[0:cell, 0:cell]
    pats = {"vit_sink": (xx + yy) % 2, "llm_sink": xx % 2, "dead": yy % 2}
    lo_hi = {"vit_sink": (30, 220), "llm_sink": (60, 200), "dead": (100, 156)}
    sinks = {tuple(c): "vit_sink" for c in truth["vit"]}
    sinks.update({tuple(c): "llm_sink" for c in truth["llm"]})
    free = [(r, c) for r in range(g) for c in range(g) if (r, c) not in sinks]
    frac = rng.uniform(0.3, 0.7) if content is None else content
    n_content = max(1, int(round(frac * len(free))))
    chosen = set(tuple(free[i]) for i in rng.choice(len(free), n_content, replace=False))
    labels = [[None] * g for _ in range(g)]
    # content: per patch four uniform blocks split at an EVEN offset (8 | 6 px), so every +-1 texture filter sums to
    # exactly 0 over them (textures and colours stay separate channels)
    spans = [(0, 8), (8, 14)]
    for r in range(g):
        for c in range(g):
            y0, x0 = r * cell, c * cell
            kind = sinks.get((r, c)) or ("alive" if (r, c) in chosen else "dead")
            labels[r][c] = kind
            if kind == "alive":
                for py in range(0, cell, 14):
                    for px in range(0, cell, 14):
                        for a, b in spans:
                            for e, f in spans:
                                arr[y0 + py + a:y0 + py + b, x0 + px + e:x0 + px + f] = rng.integers(0, 256, 3)
            else:
                lo, hi = lo_hi[kind]
                arr[y0:y0 + cell, x0:x0 + cell] = np.where(pats[kind][..., None] == 1, hi, lo)
    return Image.fromarray(arr), labels
