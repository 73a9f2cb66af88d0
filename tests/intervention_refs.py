"""Shared by the intervention tests: the two-row left-padded batch, and the plain-HF / plain-nnsight runs the
intervened forwards are compared with (torch hooks and a bare trace, written here, not through the package)."""

from __future__ import annotations

import nnsight
import torch

from mech_vtokens import testing as T

import families as F


def batch_of(vlm, family, seeds=(1, 2)):
    """Two rows of different lengths: the shorter one is left-padded. ``family``: a family or a real checkpoint id."""
    return vlm.prepare([T.image(seed=seeds[0]), T.image(seed=seeds[1])],
                       [F.prompt(vlm, family), F.prompt(vlm, family, "describe the image")])


def eager_weights(query, key, value, attention_mask, scaling):
    """Plain-torch eager attention up to the softmax: the post-softmax weights (batch, head, q, k) and the values
    repeated over the query groups, for references that edit the weights before ``w @ v``."""
    g = query.shape[1] // key.shape[1]
    k, v = key.repeat_interleave(g, 1), value.repeat_interleave(g, 1)
    w = query @ k.transpose(2, 3) * scaling
    if attention_mask is not None:
        w = w + attention_mask
    return torch.softmax(w.float(), -1).to(query.dtype), v


def lm_of(vlm):  # a VLM or a plain HF model
    return getattr(vlm, "hf", vlm).get_decoder()


def clean_lm_kwargs(vlm, batch):
    """The LM's inputs_embeds / attention_mask / position_ids in a clean forward (captured with a plain hook), and
    the logits."""
    got = {}

    def grab(mod, args, kwargs):
        for k in ("inputs_embeds", "attention_mask", "position_ids", "visual_pos_masks", "per_layer_inputs"):
            if isinstance(kwargs.get(k), dict):  # Gemma 3's per-kind masks: replaced below
                got[k] = kwargs[k]
                continue
            v = kwargs.get(k)
            got[k] = None if v is None else v.detach().clone()
        rows = kwargs.get("deepstack_visual_embeds")  # Qwen3-VL: vectors added after the first layers
        got["deepstack_visual_embeds"] = None if rows is None else [r.detach().clone() for r in rows]

    def grab_mapping(mod, args, kwargs):  # a wrapper that hands the LM its masks per kind (Gemma 3)
        got["lm_mask_mapping"] = kwargs.get("attention_mask")

    h = lm_of(vlm).register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            got["logits"] = vlm.hf(**batch.inputs).logits
    finally:
        h.remove()
    if isinstance(got["attention_mask"], dict):  # the LM got Gemma 3's mask dict: keep the wrapper's 2-D mask and
        got["lm_mask_mapping"] = got["attention_mask"]  # token types, so references rebuild it through the wrapper
        got["attention_mask"] = batch.inputs["attention_mask"].clone()
        if "token_type_ids" in batch.inputs:  # Gemma 3 (Gemma 4 E2B-like: causal, the LM builds its own masks)
            got["token_type_ids"] = batch.inputs["token_type_ids"].clone()
    return got


def lm_hidden(vlm, embeds, am, pos, token_type_ids=None, **injected):
    """The LM's last hidden state on given inputs. ``token_type_ids`` (Gemma 3, whose wrapper builds the LM's
    bidirectional-image masks from them): through the HF wrapper (``model.model``, no pixels: the embeddings given),
    so its own mask code runs on these inputs."""
    if token_type_ids is not None:
        return getattr(vlm, "hf", vlm).model(inputs_embeds=embeds, attention_mask=am, position_ids=pos,
                                             token_type_ids=token_type_ids, **injected).last_hidden_state
    return lm_of(vlm)(inputs_embeds=embeds, attention_mask=am, position_ids=pos, **injected).last_hidden_state


def injections(clean, r, cols):
    """Row ``r``'s vectors added to the residual stream after layer j (Qwen3-VL DeepStack), {j: (1, len(cols), d)}
    at the row's columns ``cols``, zero at text positions; {} for a model without them."""
    rows, mask = clean.get("deepstack_visual_embeds"), clean.get("visual_pos_masks")
    if rows is None:
        return {}
    off, n_r = int(mask[:r].sum()), int(mask[r].sum())
    out = {}
    for j, packed in enumerate(rows):
        full = packed.new_zeros(1, mask.shape[1], packed.shape[-1])
        full[0, mask[r]] = packed[off:off + n_r]
        out[j] = full[:, cols]
    return out


def nn_run(vlm, batch, interventions, probes=(), remote=False):
    """Logits and results of one nnsight trace running an Experiment."""
    exp = vlm.experiment(batch, probes=probes, interventions=interventions)
    with vlm.trace(**batch.inputs, remote=remote):
        raw = nnsight.save(exp.execute(vlm.model))
        logits = nnsight.save(vlm.model.output.logits)
    return logits, exp.results(raw)
