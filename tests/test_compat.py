"""mech_vtokens.compat (transformers-version differences, written once) and per-call padding side."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from mech_vtokens import testing as T
from mech_vtokens.compat import cache_position, kv_cache, past_length


def test_kv_cache_under_both_names_and_its_length():
    cache = DynamicCache()
    k = torch.zeros(1, 2, 5, 4)
    cache.update(k, k, 0)
    assert kv_cache({"cache": cache}) is cache and kv_cache({"past_key_values": cache}) is cache
    assert kv_cache({}) is None and past_length({}) == 0
    assert past_length({"past_key_values": cache}) == 5 and past_length({"cache": cache}) == 5


def test_cache_position_only_where_the_caller_passed_one():
    assert cache_position({"attention_mask": None}, 3, 2, "cpu") == {}
    got = cache_position({"cache_position": torch.arange(9)}, 3, 2, "cpu")
    assert torch.equal(got["cache_position"], torch.tensor([3, 4]))


def test_left_padding_per_call_leaves_the_tokenizer_alone(tiny_vlm):
    from mech_vtokens.evaluate import _prepare_left

    vlm = tiny_vlm("llava")
    tok = vlm.tokenizer
    side = tok.padding_side
    tok.padding_side = "right"
    try:
        prompts = [T.prompt("llava"), T.prompt("llava", "describe the image in a few words")]
        batch = _prepare_left(vlm, [T.image(seed=1), T.image(seed=2)], prompts)
        assert tok.padding_side == "right"
        am = batch.inputs["attention_mask"]
        assert am[0, 0] == 0 and am[0, -1] == 1 and bool(am[1].all())  # the shorter row padded on the left
        right = vlm.prepare([T.image(seed=1), T.image(seed=2)], prompts).inputs["attention_mask"]
        assert right[0, -1] == 0  # the tokenizer's own side (right) where no side is passed
    finally:
        tok.padding_side = side
