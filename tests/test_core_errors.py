"""Bad input to the core: each a clear InputError raised before any forward, naming the problem and the fix."""

import pytest

import mech_vtokens as mv
from mech_vtokens import testing as T
from mech_vtokens.errors import InputError
from mech_vtokens.probes.activations import Activations


def _run(vlm, images, prompts, probes=None, **kw):
    return mv.run(vlm, images, prompts, probes=probes or [Activations(["hook_embed"])], **kw)


def test_prompt_without_placeholder(no_forward):
    with pytest.raises(InputError, match="put the image placeholder '<image>' in the prompt"):
        _run(no_forward, [T.image()], ["what color is it ?"])


def test_placeholder_without_image(no_forward):
    with pytest.raises(InputError, match="pass an image for each"):
        _run(no_forward, [[]], [T.prompt("llava")])


def test_several_images_where_family_allows_one(no_forward):
    with pytest.raises(InputError, match="at most 1 per prompt; split them"):
        _run(no_forward, [[T.image(), T.image(seed=1)]], [T.prompt("llava", n_images=2)])


def test_unsupported_model_lists_families_and_how_to_add():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, vocab_size=50))
    with pytest.raises(InputError, match=r"unsupported model type 'llama'.*llava.*qwen2_vl.*qwen2_5_vl.*internvl"
                                         r".*To add one"):
        mv.load(model, processor=object())


@pytest.mark.parametrize("site,msg", [
    ("blocks.7.hook_resid_post", r"layer 7 is out of range; .* has 3 decoder layers"),
    ("vision.blocks.5.hook_resid_post", r"layer 5 is out of range; .* 2 vision layers"),
    ("blocks.0.hook_q", r"no hook 'hook_q'.*valid hooks: hook_resid_pre"),
    ("hook_pos_embed", r"unknown site 'hook_pos_embed'.*vlm.sites lists them"),
])
def test_bad_sites(no_forward, site, msg):
    with pytest.raises(InputError, match=msg):
        _run(no_forward, [T.image()], [T.prompt("llava")], probes=[Activations([site])])


def test_processor_of_another_model(tiny_dir):
    model, _ = T.build("llava")
    _, other = T.build("internvl")
    with pytest.raises(InputError, match="processor does not match the model.*same checkpoint"):
        mv.load(model, other)


def test_text_only_input_to_visual_probe(no_forward):
    with pytest.raises(InputError, match="needs visual tokens, but the batch has none"):
        _run(no_forward, None, ["what color is it ?"], probes=[Activations(["hook_embed"], visual_only=True)])


def test_remote_in_memory_model_without_hub_id(tiny_dir):
    model, proc = T.build("llava")
    vlm = mv.load(model, proc)
    with pytest.raises(InputError, match="remote=True needs a model that NDIF can load by its hub id.*"
                                         "remote='local'"):
        _run(vlm, [T.image()], [T.prompt("llava")], remote=True)


def test_nothing_to_run(no_forward):
    with pytest.raises(InputError, match="nothing to run"):
        mv.run(no_forward, [T.image()], [T.prompt("llava")])


def test_images_prompts_count_mismatch(no_forward):
    with pytest.raises(InputError, match="2 image entries for 1 prompts"):
        _run(no_forward, [T.image(), T.image()], [T.prompt("llava")])


def test_bad_source():
    with pytest.raises(InputError, match="cannot load a config from"):
        mv.load("/nonexistent/dir/for/sure")
