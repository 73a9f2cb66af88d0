"""Tiny, seeded, offline models of every supported family — for tests, notebooks and benchmarks.

``tiny_model(family, path)`` builds a random model of that family from configs (no hub), with a real
offline processor (word-level tokenizer, PIL image processor), saves both with ``save_pretrained``
and returns ``path``: load it back with ``mech_vtokens.load(path)``, the same code path as a real
checkpoint. ``medium_llava(path)`` builds a model with LLaVA-1.5-7B shapes for benchmarks.

Everything here is deterministic: the same family and seed give the same weights bit for bit.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

FAMILIES = ("llava", "qwen2_vl", "qwen2_5_vl", "internvl", "qwen3_vl", "qwen3_vl_moe", "llava_next",
            "llava_onevision",
            "idefics3", "smolvlm")
FAMILIES += ("gemma3",)
FAMILIES += ("qwen3_5", "qwen3_5_moe")
FAMILIES += ("mistral3",)
FAMILIES += ("glm4v", "glm4v_moe")
FAMILIES += ("gemma4",)

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
_SPECIALS["qwen2_5_vl"] = _SPECIALS["qwen3_vl"] = _SPECIALS["qwen3_vl_moe"] = _SPECIALS["qwen2_vl"]
_SPECIALS["llava_next"] = _SPECIALS["llava"]
_SPECIALS["llava_onevision"] = ["<pad>", "<unk>", "<|endoftext|>", "<image>", "<video>"]
_SPECIALS["gemma3"] = ["<pad>", "<unk>", "<bos>", "<eos>", "<start_of_image>", "<end_of_image>", "<image_soft_token>"]
# Gemma 4: the image token, its begin / end, and the audio begin / end the processor requires to exist
_SPECIALS["gemma4"] = ["<pad>", "<unk>", "<bos>", "<eos>", "<|image>", "<image|>", "<|image|>", "<|audio>", "<audio|>",
                       "<|audio|>", "<|video|>"]
# Idefics3 / SmolVLM: the image token, the fake-around / global / row-col text tokens, the end of an utterance
_SPECIALS["idefics3"] = _SPECIALS["smolvlm"] = (
    ["<pad>", "<unk>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<image>", "<global-img>"]
    + [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)])
_SPECIALS["glm4v"] = _SPECIALS["glm4v_moe"] = [
    "<pad>", "<unk>", "<|endoftext|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>",
    "<|end_of_video|>", "<|image|>", "<|video|>", "[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>"]

# The image token of each fixture's tokenizer (the adapters declare the span around it).
_IMAGE_TOKEN = {"llava": "<image>", "qwen2_vl": "<|image_pad|>", "qwen2_5_vl": "<|image_pad|>",
                "internvl": "<IMG_CONTEXT>", "qwen3_vl": "<|image_pad|>", "qwen3_vl_moe": "<|image_pad|>",
                "llava_next": "<image>", "llava_onevision": "<image>"}
_IMAGE_TOKEN["gemma3"] = "<start_of_image>"  # what a Gemma 3 prompt holds per image (the processor expands it)
_IMAGE_TOKEN.update(idefics3="<image>", smolvlm="<image>")
_SPECIALS["qwen3_5"] = _SPECIALS["qwen3_5_moe"] = _SPECIALS["qwen2_vl"]
_IMAGE_TOKEN.update(qwen3_5="<|image_pad|>", qwen3_5_moe="<|image_pad|>")
# Mistral 3: [IMG] (the processor expands it into rows of [IMG] ending in [IMG_BREAK] / [IMG_END], text tokens)
_SPECIALS["mistral3"] = ["<pad>", "<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[IMG]", "[IMG_BREAK]", "[IMG_END]"]
_IMAGE_TOKEN["mistral3"] = "[IMG]"
_IMAGE_TOKEN.update(glm4v="<|image|>", glm4v_moe="<|image|>")
_IMAGE_TOKEN["gemma4"] = "<|image|>"  # the soft token; the processor expands it to <|image> + n x it + <image|>


def image_span(family: str) -> str:
    """The whole text span of one image in a ``family`` prompt (the adapter's declaration; ``vlm.image_placeholder``
    once loaded)."""
    from .adapters import ADAPTERS

    return next(a for a in ADAPTERS if a.family == family).image_span.format(image=_IMAGE_TOKEN[family])


def prompt(family: str, question: str = "what color is the object ?", n_images: int = 1) -> str:
    """A prompt in the fixtures' own chat format (``USER : <spans> question ASSISTANT :``; first token ``USER``) with
    ``n_images`` image spans. On a loaded model use ``vlm.prompt``."""
    return "USER : " + image_span(family) * n_images + " " + question + " ASSISTANT :"


def _word_bpe_tokenizer(family: str):
    """A Qwen3.5 tokenizer (``Qwen3_5Tokenizer``: byte-level BPE with its own pre-tokenizer, which transformers loads
    for model_type qwen3_5 whatever class a checkpoint names) whose BPE, trained on :data:`WORDS`, makes every word
    ONE token, bare ("red") and after a space ("\u0120red"); the family's specials added after it."""
    from tokenizers import Tokenizer
    from tokenizers.trainers import BpeTrainer
    from transformers import Qwen3_5Tokenizer

    base = Qwen3_5Tokenizer()._tokenizer  # the class's normalizer / pre-tokenizer, an empty BPE
    trainer = BpeTrainer(vocab_size=4000, show_progress=False,
                         initial_alphabet=__import__("tokenizers").pre_tokenizers.ByteLevel.alphabet())
    corpus = [" ".join(WORDS), "\n".join(WORDS)] * 4
    base.train_from_iterator(corpus, trainer)
    model = json.loads(Tokenizer.to_str(base))["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    specials = _SPECIALS[family]
    vocab = {t: i for i, t in enumerate(specials)}
    for t in sorted(model["vocab"], key=model["vocab"].get):
        vocab.setdefault(t, len(vocab))
    tok = Qwen3_5Tokenizer(vocab=vocab, merges=merges, unk_token="<unk>", eos_token="<|endoftext|>",
                           pad_token="<pad>", extra_special_tokens={
                               "image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                               "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"})
    tok.add_special_tokens({"additional_special_tokens": [t for t in specials if t not in ("<pad>", "<unk>")]})
    tok.padding_side = "left"
    return tok


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
    elif family == "gemma3":
        kwargs.update(bos_token="<bos>", eos_token="<eos>", extra_special_tokens={
            "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"})
    elif family == "gemma4":
        kwargs.update(bos_token="<bos>", eos_token="<eos>", extra_special_tokens={
            "boi_token": "<|image>", "eoi_token": "<image|>", "image_token": "<|image|>", "boa_token": "<|audio>",
            "eoa_token": "<audio|>", "audio_token": "<|audio|>"})
    elif family in ("idefics3", "smolvlm"):
        kwargs.update(bos_token="<|im_start|>", eos_token="<end_of_utterance>", extra_special_tokens={
            "image_token": "<image>", "fake_image_token": "<fake_token_around_image>",
            "global_image_token": "<global-img>", "end_of_utterance_token": "<end_of_utterance>"})
    elif family == "mistral3":
        kwargs.update(bos_token="<s>", eos_token="</s>")
    elif family in ("glm4v", "glm4v_moe"):
        kwargs.update(eos_token="<|endoftext|>", extra_special_tokens={"image_token": "<|image|>",
                                                                      "video_token": "<|video|>"})
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


def _qwen3(seed: int, moe: bool):
    """Qwen3-VL (dense / MoE): 3 vision blocks, DeepStack from blocks 0 and 1 into decoder layers 0 and 1 of 3 (so
    one layer has none); 14-px patches like the Qwen2 fixtures (the hub's 16 px is the real fixtures' job)."""
    from transformers import Qwen2VLImageProcessorPil

    from .adapters.components import videoless

    tok = _tokenizer("qwen3_vl")
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, head_dim=16,
                num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=512,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "mrope_interleaved": True,
                                 "rope_theta": 10000.0})
    vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=64, num_position_embeddings=16,
                  deepstack_visual_indexes=[0, 1])
    ids = dict(image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
               video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
               vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
               vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"))
    if moe:  # every layer sparse but the last (mlp_only_layers): both MLP kinds are exercised
        from transformers import Qwen3VLMoeConfig as C, Qwen3VLMoeForConditionalGeneration as M

        text.update(moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1,
                    mlp_only_layers=[2])
        arch = "Qwen3VLMoeForConditionalGeneration"
    else:
        from transformers import Qwen3VLConfig as C, Qwen3VLForConditionalGeneration as M

        arch = "Qwen3VLForConditionalGeneration"
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor as P

    config = C(vision_config=vision, text_config=text, tie_word_embeddings=False, **ids)
    config.architectures = [arch]
    torch.manual_seed(seed)
    model = M(config).eval()
    ip = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112, patch_size=14, merge_size=2,
                                  temporal_patch_size=2)
    return model, videoless(P)(image_processor=ip, tokenizer=tok)
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


def _gemma3(seed: int):
    """Gemma 3: SigLIP over a 112-px image (8x8 patches of 14 px) avg-pooled 2x2 -> 4x4 = 16 soft tokens; a
    3-layer Gemma 3 text model (sliding, sliding, full; window 6, far shorter than a prompt) with sandwich norms.
    ``mm_input_projection_weight`` is zero at init (every visual token would be zero) and the RMSNorm weights are
    zero (1 + w): both are randomised so every site carries a signal."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil
    from transformers.models.gemma3.processing_gemma3 import Gemma3Processor

    tok = _tokenizer("gemma3")
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=112, patch_size=14, vision_use_head=False)
    text = Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=16, vocab_size=len(tok), max_position_embeddings=512,
                            sliding_window=6, query_pre_attn_scalar=16,
                            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                            rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                                             "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
                            pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                            eos_token_id=tok.eos_token_id)
    ids = {t: tok.convert_tokens_to_ids(s) for t, s in (("boi_token_index", "<start_of_image>"),
                                                        ("eoi_token_index", "<end_of_image>"),
                                                        ("image_token_index", "<image_soft_token>"))}
    config = Gemma3Config(vision_config=vision, text_config=text, mm_tokens_per_image=16, **ids)
    config.architectures = ["Gemma3ForConditionalGeneration"]
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config).eval()
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed + 1)
        proj = model.model.multi_modal_projector.mm_input_projection_weight
        proj.copy_(torch.randn(proj.shape, generator=gen) * 0.2)
        for mod in model.modules():  # Gemma's RMSNorms scale by (1 + w), w zero at init (SigLIP's LayerNorms stay)
            if isinstance(mod, Gemma3RMSNorm):
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=gen) * 0.1)
        # SigLIP's post-layernorm and the projector's RMSNorm normalise every token, which compresses how much more a
        # patch's own token changes than its neighbours: quieter ViT attention keeps the random tower local (the
        # single-patch benchmark's premise, as in a trained SigLIP)
        for layer in model.model.vision_tower.encoder.layers:
            layer.self_attn.out_proj.weight.mul_(0.1)
    ip = Gemma3ImageProcessorPil(size={"height": 112, "width": 112}, do_pan_and_scan=False)
    proc = Gemma3Processor(image_processor=ip, tokenizer=tok, image_seq_length=16)
    return model, proc


def _gemma4(seed: int):
    """Gemma 4 (E2B-shaped): a 2-layer vision tower over 4-px patches, 3 x 3 average-pooled, at most 70 soft tokens
    per image (the smallest budget the processor allows) with the count following the aspect ratio; a 4-layer text
    model (sliding, sliding, full, full; window 6) whose last layer reuses layer 2's keys / values
    (``num_kv_shared_layers=1``), with per-layer embeddings (PLE, 8 dims per layer), a per-layer scalar and a final
    logit softcap of 1.0 (small, so it matters at these logit sizes). Gemma's RMSNorm scales by w (ones at init) and
    ``layer_scalar`` is one at init: both are randomised so every site carries a signal and the scalar shows."""
    from transformers import (Gemma4Config, Gemma4ForConditionalGeneration, Gemma4ImageProcessorPil, Gemma4TextConfig,
                              Gemma4VisionConfig)
    from transformers.models.gemma4.modeling_gemma4 import Gemma4RMSNorm

    from .adapters.gemma4 import gemma4_image_processor_class

    tok = _tokenizer("gemma4")
    vision = Gemma4VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                num_key_value_heads=2, head_dim=16, patch_size=4, pooling_kernel_size=3,
                                position_embedding_size=64)
    text = Gemma4TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=16, global_head_dim=32, vocab_size=len(tok),
                            vocab_size_per_layer_input=len(tok), hidden_size_per_layer_input=8,
                            max_position_embeddings=512, sliding_window=6, num_kv_shared_layers=1,
                            final_logit_softcapping=1.0,
                            layer_types=["sliding_attention", "sliding_attention", "full_attention", "full_attention"],
                            pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                            eos_token_id=tok.eos_token_id)
    ids = {t: tok.convert_tokens_to_ids(s) for t, s in (("boi_token_id", "<|image>"), ("eoi_token_id", "<image|>"),
                                                        ("image_token_id", "<|image|>"), ("boa_token_id", "<|audio>"),
                                                        ("eoa_token_index", "<audio|>"),
                                                        ("audio_token_id", "<|audio|>"))}
    config = Gemma4Config(vision_config=vision, text_config=text, audio_config=None,
                          video_token_id=tok.convert_tokens_to_ids("<|video|>"), **ids)
    config.architectures = ["Gemma4ForConditionalGeneration"]
    torch.manual_seed(seed)
    model = Gemma4ForConditionalGeneration(config).eval()
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed + 1)
        for mod in model.modules():
            if isinstance(mod, Gemma4RMSNorm) and getattr(mod, "with_scale", True) and hasattr(mod, "weight"):
                mod.weight.copy_(1 + torch.randn(mod.weight.shape, generator=gen) * 0.1)
        for layer in model.model.language_model.layers:
            layer.layer_scalar.copy_(0.5 + torch.rand(1, generator=gen))
        table = model.model.vision_tower.patch_embedder.position_embedding_table
        table.copy_(torch.randn(table.shape, generator=gen) * 0.5)
        # quieter ViT attention keeps the random tower local (the single-patch benchmark's premise), as for Gemma 3;
        # the sandwich norm after the attention would undo a smaller o_proj: its scale is reduced instead
        for layer in model.model.vision_tower.encoder.layers:
            layer.post_attention_layernorm.weight.mul_(0.1)
    ip = Gemma4ImageProcessorPil(patch_size=4, max_soft_tokens=70, pooling_kernel_size=3)
    proc = gemma4_image_processor_class()(image_processor=ip, tokenizer=tok, image_seq_length=70)
    return model, proc


def _idefics3(seed: int, smol: bool):
    """Idefics3 / SmolVLM: 56-px tiles of 8 x 8 patches (7 px), pixel shuffle 2 -> 16 tokens per frame; the longest
    edge resized to 112 px, so an image becomes up to 2 x 2 tiles + the global image."""
    import transformers
    from transformers import LlamaConfig

    pre = "SmolVLM" if smol else "Idefics3"
    tok = _tokenizer("smolvlm" if smol else "idefics3")
    vision = getattr(transformers, f"{pre}VisionConfig")(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                          num_attention_heads=2, image_size=56, patch_size=7)
    text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=1024)
    text.pad_token_id, text.bos_token_id, text.eos_token_id = tok.pad_token_id, tok.bos_token_id, tok.eos_token_id
    config = getattr(transformers, f"{pre}Config")(vision_config=vision.to_dict(), text_config=text.to_dict(),
                                                   scale_factor=2, image_token_id=tok.convert_tokens_to_ids("<image>"),
                                                   tie_word_embeddings=False)
    config.architectures = [f"{pre}ForConditionalGeneration"]
    torch.manual_seed(seed)
    model = getattr(transformers, f"{pre}ForConditionalGeneration")(config).eval()
    ip = getattr(transformers, f"{pre}ImageProcessorPil")(size={"longest_edge": 112},
                                                           max_image_size={"longest_edge": 56})
    if smol:  # its video processor needs torchvision: the adapter's image + text processor
        from .adapters.idefics3 import smolvlm_image_processor_class

        proc = smolvlm_image_processor_class()(image_processor=ip, tokenizer=tok, image_seq_len=16)
    else:
        proc = transformers.Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=16)
    return model, proc


def _qwen3_5(seed: int, moe: bool, layer_types=("linear_attention", "full_attention", "full_attention")):
    """Qwen3.5 (dense / MoE): 2 vision blocks (no DeepStack), a 3-layer hybrid decoder (linear, full, full: layer 0
    has no attention pattern, layers 1-2 do, as the family tests' knockout layers expect); rotary on a quarter of the
    32-d heads (8 dims, interleaved M-RoPE sections [2, 1, 1]); 14-px patches like the other Qwen fixtures. The
    RMSNorms scale by (1 + w), w zero at init: randomised so every site carries a signal. The gated delta nets'
    decay rates (``A_log``, init up to 16: the state forgets within one token) are drawn from 0.005-0.05 so the
    recurrent state remembers a few dozen tokens, as trained layers do: a linear layer then depends on the image."""
    from transformers import Qwen2VLImageProcessorPil
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor as P

    from .adapters.components import videoless

    tok = _word_bpe_tokenizer("qwen3_5")
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=len(layer_types), num_attention_heads=4,
                head_dim=32,
                num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=512,
                layer_types=list(layer_types),
                linear_conv_kernel_dim=4, linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
                linear_num_value_heads=4,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "mrope_interleaved": True,
                                 "rope_theta": 10000.0, "partial_rotary_factor": 0.25})
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=64, num_position_embeddings=16)
    ids = dict(image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
               video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
               vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
               vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"))
    if moe:
        from transformers import Qwen3_5MoeConfig as C, Qwen3_5MoeForConditionalGeneration as M

        text.pop("intermediate_size")
        text.update(moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=4,
                    num_experts_per_tok=2)
        arch = "Qwen3_5MoeForConditionalGeneration"
    else:
        from transformers import Qwen3_5Config as C, Qwen3_5ForConditionalGeneration as M

        arch = "Qwen3_5ForConditionalGeneration"
    config = C(vision_config=vision, text_config=text, tie_word_embeddings=False, **ids)
    config.architectures = [arch]
    torch.manual_seed(seed)
    model = M(config).eval()
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed + 1)
        for name, mod in model.named_modules():
            if type(mod).__name__.endswith("RMSNorm") and "visual" not in name:
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=gen) * 0.1)
            if hasattr(mod, "A_log"):
                mod.A_log.copy_((torch.rand(mod.A_log.shape, generator=gen) * 0.045 + 0.005).log())
    ip = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112, patch_size=14, merge_size=2,
                                  temporal_patch_size=2)
    return model, videoless(P)(image_processor=ip, tokenizer=tok)


def _mistral3(seed: int):
    """Mistral 3: a 2-block Pixtral tower (14-px patches, 2-D RoPE over up to 8 x 8 patches) over images resized to
    at most 112 px on the longest edge (sides rounded up to 28 px: 2 x 2 patches per token, so a square image is 4
    x 4 tokens and a 112 x 56 one 2 x 4), the 2 x 2 patch merger, a 3-layer Mistral decoder."""
    from transformers import (Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig,
                              PixtralImageProcessorPil, PixtralVisionConfig)

    from .adapters.mistral3 import pixtral_processor_class

    tok = _tokenizer("mistral3")
    vision = PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                 head_dim=16, image_size=112, patch_size=14)
    text = MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, vocab_size=len(tok), max_position_embeddings=1024,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    config = Mistral3Config(vision_config=vision.to_dict(), text_config=text.to_dict(),
                            image_token_index=tok.convert_tokens_to_ids("[IMG]"), spatial_merge_size=2,
                            vision_feature_layer=-1, tie_word_embeddings=False)
    config.architectures = ["Mistral3ForConditionalGeneration"]
    torch.manual_seed(seed)
    model = Mistral3ForConditionalGeneration(config).eval()
    ip = PixtralImageProcessorPil(size={"longest_edge": 112}, patch_size={"height": 14, "width": 14})
    proc = pixtral_processor_class()(image_processor=ip, tokenizer=tok, patch_size=14, spatial_merge_size=2)
    return model, proc


def _glm4v(seed: int, moe: bool):
    """GLM-4.1V (dense) / GLM-4.5V (MoE): 2 vision blocks (14-px patches, a 4 x 4 position table interpolated to
    each grid, 2 x 2 downsample conv + merger), a 3-layer decoder; head_dim 16 with partial rotary 0.5 (8 rotary
    dims = 4 frequencies, M-RoPE sections [2, 1, 1]). Dense: sandwich norms, whose weights (ones at init) are
    randomised so a wrong post-norm site shows. MoE: layer 0 dense (first_k_dense_replace), 1-2 sparse (4 routed
    experts, top-2, one shared)."""
    from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil
    from transformers.models.glm4v.processing_glm4v import Glm4vProcessor

    from .adapters.components import videoless

    tok = _tokenizer("glm4v_moe" if moe else "glm4v")
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=512,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 10000.0,
                                 "partial_rotary_factor": 0.5}, pad_token_id=tok.pad_token_id)
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=64, image_size=56)
    ids = dict(image_token_id=tok.convert_tokens_to_ids("<|image|>"),
               video_token_id=tok.convert_tokens_to_ids("<|video|>"),
               image_start_token_id=tok.convert_tokens_to_ids("<|begin_of_image|>"),
               image_end_token_id=tok.convert_tokens_to_ids("<|end_of_image|>"),
               video_start_token_id=tok.convert_tokens_to_ids("<|begin_of_video|>"),
               video_end_token_id=tok.convert_tokens_to_ids("<|end_of_video|>"))
    if moe:
        from transformers import Glm4vMoeConfig as C, Glm4vMoeForConditionalGeneration as M

        text.update(head_dim=16, moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2,
                    n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1, norm_topk_prob=True)
        arch = "Glm4vMoeForConditionalGeneration"
    else:
        from transformers import Glm4vConfig as C, Glm4vForConditionalGeneration as M

        arch = "Glm4vForConditionalGeneration"
    config = C(vision_config=vision, text_config=text, tie_word_embeddings=False, **ids)
    config.architectures = [arch]
    torch.manual_seed(seed)
    model = M(config).eval()
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed + 1)
        for name, p in model.named_parameters():  # norms are ones and the MoE router zero at init
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.copy_(1 + torch.randn(p.shape, generator=gen) * 0.2)
            elif p.ndim == 2 and not bool(p.any()):
                p.normal_(0.0, 0.02, generator=gen)
    # smart_resize counts both temporal copies of a still image (t = 2): 56*56 .. 112*112 pixels per frame, so an
    # image becomes at most 8x8 patches = 4x4 merged visual tokens, as in the Qwen fixtures
    ip = Glm4vImageProcessorPil(size={"shortest_edge": 2 * 56 * 56, "longest_edge": 2 * 112 * 112}, patch_size=14,
                                merge_size=2, temporal_patch_size=2)
    return model, videoless(Glm4vProcessor)(image_processor=ip, tokenizer=tok)


def build(family: str, seed: int = 0):
    """(model, processor) of a tiny random model of ``family``, in memory."""
    if family == "llava":
        return _llava(seed)
    if family in ("qwen2_vl", "qwen2_5_vl"):
        return _qwen(seed, family == "qwen2_5_vl")
    if family == "internvl":
        return _internvl(seed)
    if family in ("qwen3_vl", "qwen3_vl_moe"):
        return _qwen3(seed, family == "qwen3_vl_moe")
    if family == "llava_next":
        return _llava_next(seed)
    if family == "llava_onevision":
        return _llava_onevision(seed)
    if family == "gemma3":
        return _gemma3(seed)
    if family in ("idefics3", "smolvlm"):
        return _idefics3(seed, family == "smolvlm")
    if family in ("qwen3_5", "qwen3_5_moe"):
        return _qwen3_5(seed, family == "qwen3_5_moe")
    if family == "mistral3":
        return _mistral3(seed)
    if family in ("glm4v", "glm4v_moe"):
        return _glm4v(seed, family == "glm4v_moe")
    if family == "gemma4":
        return _gemma4(seed)
    raise ValueError(f"unknown tiny family {family!r}; choose one of {FAMILIES}")


def _save(model, proc, path) -> str:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    proc.save_pretrained(path)
    return str(path)


def tiny_model(family: str, path: str | os.PathLike, seed: int = 0) -> str:
    """Build a tiny random ``family`` model + processor, ``save_pretrained`` them into ``path``; return the path.

    Cached: if ``path`` already holds the model of this ``family`` and ``seed`` (``tiny_model.json`` says which) it
    is returned as is; one of another family or seed written here is rebuilt; any other model there is refused.
    """
    if family not in FAMILIES:
        from .errors import InputError

        raise InputError(f"tiny_model: unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    if _cached(family, seed, Path(path)):
        return str(path)
    out = _save(*build(family, seed), path)
    (Path(path) / TINY_MARKER).write_text(json.dumps({"family": family, "seed": seed}))
    return out


TINY_MARKER = "tiny_model.json"  # which family / seed tiny_model saved in a directory


def _cached(family: str, seed: int, path: Path) -> bool:
    """True when ``path`` holds tiny_model(family, seed); False when it must be (re)built; InputError when it holds
    a model tiny_model did not write."""
    import shutil

    from .errors import InputError

    if not (path / "config.json").exists():
        return False
    marker = path / TINY_MARKER
    if marker.exists():
        if json.loads(marker.read_text()) == {"family": family, "seed": seed}:
            return True
        shutil.rmtree(path)  # ours, of another family / seed: rebuild
        return False
    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    if model_type == family and seed == 0:
        return True  # written before the marker existed, by the only seed those callers used
    raise InputError(f"tiny_model({family!r}, {str(path)!r}, seed={seed}): {path} already holds a {model_type!r} model "
                     f"that tiny_model did not mark as ({family!r}, seed {seed}); give an empty or new path, or delete "
                     f"it")


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


# The planted sink / dead / alive partition model (mech_vtokens/fixtures/planted.py), re-exported for callers.
from .fixtures.planted import planted_image, planted_partition_model  # noqa: E402,F401
