"""vlm.prompt (chat template / plain format), the whole image span in prepare, visual tokens per image and the
many-visual-tokens warning; checked against the families' real template style and hand computations."""

from __future__ import annotations

import warnings

import pytest

import mech_vtokens as mv
from mech_vtokens import testing as T
from mech_vtokens.errors import InputError, ManyVisualTokensWarning

# The families' real chat-template styles (re-expressed from the public checkpoints' templates, trimmed to the parts a
# prompt of images + text uses): LLaVA "USER: <image>\n... ASSISTANT:", Qwen ChatML with the vision span, InternVL
# ChatML with "<IMG_CONTEXT>\n" per image.
TEMPLATES = {
    "llava": (
        "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
        "{% endif %}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
        "{{ '<image>\n' }}{% endfor %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
        "{{ content['text'] + ' '}}{% endfor %}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"),
    "qwen": (
        "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
        "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
        "{% for content in message['content'] %}{% if content['type'] == 'image' %}"
        "<|vision_start|><|image_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
        "{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"),
    "internvl": (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
        "{% for content in message['content'] %}"
        "{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}{% elif content['type'] == 'text' %}"
        "{{ content['text'] }}{% endif %}{% endfor %}{{'<|im_end|>\n'}}{% endfor %}"
        "{% if add_generation_prompt %}{{'<|im_start|>assistant\n' }}{% endif %}"),
    # llava-v1.6-mistral: Mistral [INST] turns, "<image>\n" per image first (no generation prompt: "[/INST]" opens it)
    "llava_next": (
        "{% for message in messages %}{% if message['role'] == 'system' %}{{ '<<SYS>>\n' + "
        "message['content'][0]['text'] + '\n<</SYS>>\n\n' }}{% elif message['role'] == 'user' %}{{ '[INST] ' }}"
        "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}"
        "{% endfor %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
        "{{ content['text'] }}{% endfor %}{{' [/INST]' }}{% endif %}{% endfor %}"),
    # llava-onevision: ChatML, "<image>\n" per image first (the converter's template)
    "llava_onevision": (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
        "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}"
        "{% endfor %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
        "{{ content['text'] }}{% endfor %}{{'<|im_end|>' + '\n'}}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"),
}
# gemma-3-4b-it: the system text opens the first user turn; "<start_of_image>" per image item, in content order
TEMPLATES["gemma3"] = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set prefix = messages[0]['content'][0]['text'] + "
    "'\n\n' %}{% set loop_messages = messages[1:] %}{% else %}{% set prefix = '' %}{% set loop_messages = messages %}"
    "{% endif %}{% for message in loop_messages %}{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' "
    "else message['role']) + '\n' + (prefix if loop.first else '') }}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<start_of_image>' }}{% elif item['type'] == 'text' %}{{ item['text'] | trim }}"
    "{% endif %}{% endfor %}{{ '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")
# GLM-4.1V-9B-Thinking / GLM-4.5V: "[gMASK]<sop>", then "<|role|>\n" turns, the image span per image item in content
# order, "<|assistant|>\n" opening the answer (trimmed: no tools, no thinking blocks)
TEMPLATES["glm4v"] = TEMPLATES["glm4v_moe"] = (
    "[gMASK]<sop>{% for m in messages %}{{ '<|' + m['role'] + '|>\n' }}{% if m['content'] is string %}"
    "{{ m['content'] }}{% else %}{% for item in m['content'] %}{% if item['type'] == 'image' %}"
    "<|begin_of_image|><|image|><|end_of_image|>{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
# gemma-4-*-it: <|turn>role ... <turn|> (the system prompt its own turn), "<|image|>" per image item, in content order
TEMPLATES["gemma4"] = (
    "{{ bos_token }}{% for message in messages %}{{ '<|turn>' + ('model' if message['role'] == 'assistant' "
    "else message['role']) + '\n' }}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<|image|>' }}{% elif item['type'] == 'text' %}{{ item['text'] | trim }}"
    "{% endif %}{% endfor %}{{ '<turn|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|turn>model\n' }}{% endif %}")
SPAN = {"llava": "<image>", "qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>",
        "qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>", "internvl": "<IMG_CONTEXT>",
        "qwen3_vl": "<|vision_start|><|image_pad|><|vision_end|>",
        "qwen3_vl_moe": "<|vision_start|><|image_pad|><|vision_end|>",
        "llava_next": "<image>", "llava_onevision": "<image>"}
SPAN["glm4v"] = SPAN["glm4v_moe"] = "<|begin_of_image|><|image|><|end_of_image|>"
SPAN["gemma3"] = "<start_of_image>"  # the processor expands it to <start_of_image> + soft tokens + <end_of_image>
SPAN.update(qwen3_5=SPAN["qwen3_vl"], qwen3_5_moe=SPAN["qwen3_vl"])
# what flanks each run of image tokens in input_ids (InternVL: the processor's own <img> .. </img>)
FLANKS = {"llava": (None, None), "qwen2_vl": ("<|vision_start|>", "<|vision_end|>"),
          "qwen2_5_vl": ("<|vision_start|>", "<|vision_end|>"), "internvl": ("<img>", "</img>"),
          "qwen3_vl": ("<|vision_start|>", "<|vision_end|>"), "qwen3_vl_moe": ("<|vision_start|>", "<|vision_end|>"),
          "llava_next": (None, None), "llava_onevision": (None, None)}
FLANKS.update(qwen3_5=FLANKS["qwen3_vl"], qwen3_5_moe=FLANKS["qwen3_vl"])
FLANKS["gemma3"] = ("<start_of_image>", "<end_of_image>")
FLANKS["glm4v"] = FLANKS["glm4v_moe"] = ("<|begin_of_image|>", "<|end_of_image|>")
# the template's turns: (what opens the assistant turn at the end, what opens the user turn)
TURNS = {"llava": ("ASSISTANT:", "USER: "), "llava_next": ("[/INST]", "[INST] ")}
TURNS["gemma3"] = ("<start_of_turn>model\n", "<start_of_turn>user\n")
TURNS["glm4v"] = TURNS["glm4v_moe"] = ("<|assistant|>\n", "<|user|>\n")
SPAN["gemma4"], FLANKS["gemma4"] = "<|image|>", ("<|image>", "<image|>")  # the processor adds the begin / end
TURNS["gemma4"] = ("<|turn>model\n", "<|turn>user\n")
# visual tokens of one 112-px image in a two-image prompt, by hand: LLaVA 6x6; LLaVA-NeXT base 4x4 + the 2x2-tile
# canvas 8x8 with a newline per row (16 + 8 * 9); OneVision does not tile multi-image prompts: base 4x4 + 1 newline;
# the rest 4x4
PER_IMAGE = {"llava": 36, "llava_next": 16 + 8 * 9, "llava_onevision": 16 + 1}
PER_IMAGE["gemma4"] = 64  # 112 px -> 96 px (multiples of 3 x 4 px within 70 x 9 patches) -> 8 x 8 pooled cells


def _fresh(tiny_dir, family):
    return mv.load(tiny_dir(family))  # its own processor: the test may set a template on it


def _runs(mask_row):
    """(start, length) of each run of True in a 1-D bool tensor."""
    out, start = [], None
    for p, v in enumerate(mask_row.tolist() + [False]):
        if v and start is None:
            start = p
        elif not v and start is not None:
            out.append((start, p - start))
            start = None
    return out


# Idefics3 / SmolVLM: an image is several runs of image tokens (one per tile + the global image), each flanked by
# text tokens: tests/test_idefics3.py checks that layout through the real chat template. Mistral 3 likewise (one run of
# [IMG] per token row, split by the [IMG_BREAK] text token): tests/test_mistral3.py
@pytest.mark.parametrize("family", [f for f in T.FAMILIES if f not in ("idefics3", "smolvlm", "mistral3")])
def test_prompt_through_the_chat_template(tiny_dir, family):
    vlm = _fresh(tiny_dir, family)
    vlm.processor.chat_template = TEMPLATES["qwen" if family.startswith("qwen") else family]
    assert vlm.image_placeholder == SPAN[family]
    n = vlm.adapter.max_images_per_prompt or 2
    text = vlm.prompt("what color is it ?", n_images=n, system="you are a helpful answer")
    assert text.count(SPAN[family]) == n
    # the template's own turns: the assistant turn opened at the end, the user turn before the images
    gen, user = TURNS.get(family, ("<|im_start|>assistant\n", "<|im_start|>user\n"))
    assert text.endswith(gen) and text.index(user) < text.index(SPAN[family])
    assert "you are a helpful answer" in text and "what color is it ?" in text
    assert "you are a helpful answer" not in vlm.prompt("what color is it ?", n_images=n)
    images = [T.image(112, seed=s) for s in range(n)]
    batch = vlm.prepare([images], [text])
    ids = batch.inputs["input_ids"][0]
    runs = _runs(batch.visual_mask[0])
    lengths = [length for _, length in runs]
    if FLANKS[family] == (None, None) and n > 1:
        # "<image>\n<image>\n": the tiny word-level tokenizer drops "\n", so unflanked spans are one run
        assert len(runs) == 1
        lengths = [lengths[0] // n] * n
    assert len(lengths) == n  # one run of image tokens per image, each as long as that image's visual tokens
    assert lengths == batch.visual_tokens_per_image == [PER_IMAGE.get(family, 16)] * n
    before, after = FLANKS[family]
    tok = vlm.tokenizer
    for start, length in runs:
        if before:
            assert int(ids[start - 1]) == tok.convert_tokens_to_ids(before)
            assert int(ids[start + length]) == tok.convert_tokens_to_ids(after)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_prompt_plain_format_without_a_template(tiny_vlm, family):
    vlm = tiny_vlm(family)
    assert not getattr(vlm.processor, "chat_template", None)
    assert vlm.prompt("what color ?") == f"{SPAN[family]} what color ?"
    assert vlm.prompt("what color ?", n_images=2, system="you are helpful") == \
        f"you are helpful {SPAN[family]} {SPAN[family]} what color ?"
    batch = vlm.prepare([T.image()], [vlm.prompt("what color ?")])
    assert batch.visual_tokens_per_image == [int(batch.visual_mask.sum())]


def test_bare_image_pad_is_refused_naming_the_span_and_the_helper(tiny_vlm):
    vlm = tiny_vlm("qwen2_vl")
    with pytest.raises(InputError) as err:
        vlm.prepare([T.image()], ["USER : <|image_pad|> what color ? ASSISTANT :"])
    assert "vlm.prompt" in str(err.value) and SPAN["qwen2_vl"] in str(err.value)
    with pytest.raises(InputError, match="vlm.prompt"):  # the span once, a stray pad besides
        vlm.prepare([T.image()], [f"{SPAN['qwen2_vl']} <|image_pad|> what"])


def test_many_visual_tokens_warn_with_the_count_and_the_knob(tiny_dir):
    vlm = _fresh(tiny_dir, "qwen2_vl")
    assert vlm.visual_token_warning == 4096
    small, big = T.image(112, seed=1), T.image(112, seed=2).resize((500, 300))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ManyVisualTokensWarning)
        vlm.prepare([small], [vlm.prompt("what ?")], max_pixels=448 * 448)  # 16 tokens: no warning
    # by hand: Qwen resizes each side to a multiple of patch 14 x merge 2 = 28 (when the pixels stay within
    # min/max_pixels), one visual token per 28 x 28 block
    h, w = round(300 / 28) * 28, round(500 / 28) * 28
    assert 56 * 56 <= h * w <= 448 * 448
    want = (h // 28) * (w // 28)  # 11 x 18 = 198
    vlm.visual_token_warning = 150
    with pytest.warns(ManyVisualTokensWarning) as rec:
        batch = vlm.prepare([[small, big]], [vlm.prompt("what ?", n_images=2)], max_pixels=448 * 448)
    assert batch.visual_tokens_per_image == [16, want]
    msg, = [str(w.message) for w in rec if w.category is ManyVisualTokensWarning]
    assert f"image 1 (500x300 px): {want}" in msg and "max_pixels" in msg and "image 0" not in msg
    vlm.visual_token_warning = None
    with warnings.catch_warnings():
        warnings.simplefilter("error", ManyVisualTokensWarning)
        vlm.prepare([big], [vlm.prompt("what ?")], max_pixels=448 * 448)


def test_internvl_warning_names_max_patches(tiny_dir):
    vlm = _fresh(tiny_dir, "internvl")
    vlm.visual_token_warning = 20
    wide = T.image(112).resize((448, 112))  # 4 tiles + a thumbnail, 16 tokens each
    with pytest.warns(ManyVisualTokensWarning, match="max_patches") as rec:
        batch = vlm.prepare([wide], [vlm.prompt("what ?")])
    assert batch.visual_tokens_per_image == [80] == [int(batch.visual_mask.sum())]
    assert ": 80" in str(rec[-1].message)
