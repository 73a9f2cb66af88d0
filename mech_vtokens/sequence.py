"""What changes when an intervention changes the sequence (``Prune``, ``VisualEntry``, ``VisualExit``; the helpers
they share): the attention mask the decoder layers get, position ids and position embeddings, the KV cache's key
mask. Everything but :func:`attention_kinds` runs inside the trace (torch, transformers and stdlib only; every tensor
on the device of the value it works on).

- :func:`attention_kinds` (outside the trace): per decoder layer its attention window, ``None`` for full attention,
  from the text config's standard ``layer_types`` / ``sliding_window`` fields.
- :func:`attention_mask`: the 4-D mask of a rebuilt sequence, built by ``transformers.masking_utils`` (causal or
  sliding-window causal, plus the padding; with :func:`image_blocks` bidirectional within each image), in the
  format the language model passes its layers. :func:`lm_masks`: the per-kind mask DICT a language model receives
  when its wrapper builds the masks (Gemma 3), rebuilt for a changed sequence the way transformers builds it.
- :func:`default_positions`, :func:`split_positions`, :func:`rotary`: position ids when the caller passed none,
  M-RoPE's split into the rotary module's and the layers' ids, the LM's own rotary module on new ids.
- :func:`layer_mask`: one decoder layer's mask sized by its own KV cache layer (generation: a sliding layer's
  cache drops old keys), through ``masking_utils.create_causal_mask``.
- :func:`recurrent_mask`: a linear-attention layer's 2-D padding mask (Qwen3.5), as transformers builds it.
- :func:`layer_io` / :func:`pack`: a decoder layer's ``(args, kwargs)`` as ``(hidden, rest, kwargs, positional)``
  and back.
- :func:`extend_keys`: the 2-D key mask followed by generated tokens; :func:`refuse_single_pass`: the refusal of a
  sequence change that would reach the prefill only. Cache slots: :func:`mech_vtokens.compat.cache_position`.
- :func:`slice_token_kwargs`: the other per-token LM inputs a family declares (``Adapter.lm_token_kwargs``: Qwen3-VL's
  DeepStack mask and vectors) for the shortened sequence; :func:`reinjected`: vectors added between layers
  (``Adapter.injection``) put back at their site for the tokens in the sequence there.
"""

from __future__ import annotations


def attention_kinds(vlm) -> list:
    """Per decoder layer of the language model: its sliding window (int) or None (full attention)."""
    cfg = vlm.hf.config.get_text_config()
    kinds = list(getattr(cfg, "layer_types", None) or ["full_attention"] * vlm.n_layers)
    window = getattr(cfg, "sliding_window", None)
    return [window if kind == "sliding_attention" else None for kind in kinds]


def check_attention_kinds(vlm, who: str) -> None:
    """Refuse layer kinds whose mask :func:`attention_mask` cannot build (chunked, linear, ...)."""
    from .errors import InputError

    cfg = vlm.hf.config.get_text_config()
    kinds = set(getattr(cfg, "layer_types", None) or ["full_attention"])
    other = kinds - {"full_attention", "sliding_attention", "linear_attention"}
    if other or ("sliding_attention" in kinds and not getattr(cfg, "sliding_window", None)):
        raise InputError(f"{who}: this model has {sorted(kinds)} layers; the rebuilt mask supports full, "
                         f"sliding-window (with the config's sliding_window) and linear attention only")


def attention_mask(like, keys, q: int, window=None, blocks=None):
    """Causal (``window``: sliding-window causal) + padding mask for the LAST ``q`` of the ``keys.shape[1]`` key
    positions (``keys``: (batch, keys) 2-D, 1 = attend), built by ``transformers.masking_utils`` in the format of
    ``like`` (what the LM passes its layers): None (sdpa, when only causality masks), a bool (True = attend) or an
    additive float (batch, 1, q, keys) of ``like``'s dtype. ``q == keys`` at a prefill, 1 on a decode step.
    ``blocks`` (batch, keys) (:func:`image_blocks`; the adapter's ``image_attention = "bidirectional"``): a token
    also sees every token of its own image, the window still applied: ``AND(OR(causal, same image), window)``, as
    Gemma 3 composes them."""
    import torch
    from transformers.masking_utils import (and_masks, blockwise_overlay, causal_mask_function, eager_mask, or_masks,
                                            sdpa_mask, sliding_window_causal_mask_function, sliding_window_overlay)

    if like is not None and not (isinstance(like, torch.Tensor) and like.ndim == 4):
        raise ValueError(f"expected the decoder layer's attention_mask to be None or a 4-D tensor, got "
                         f"{type(like).__name__} (flash / flex attention are not supported; load with "
                         f"attn_implementation='eager' or 'sdpa')")
    dev = like.device if like is not None else keys.device
    n = keys.shape[1]
    if blocks is not None:
        fn = or_masks(causal_mask_function, blockwise_overlay(blocks.to(dev)))
        fn = fn if window is None else and_masks(fn, sliding_window_overlay(int(window)))
    else:
        fn = causal_mask_function if window is None else sliding_window_causal_mask_function(int(window))
    common = dict(batch_size=keys.shape[0], q_length=q, kv_length=n, q_offset=n - q, kv_offset=0, mask_function=fn,
                  attention_mask=keys.to(device=dev, dtype=torch.bool), device=dev)
    if like is not None and like.dtype != torch.bool:
        return eager_mask(dtype=like.dtype, **common)
    return sdpa_mask(allow_is_causal_skip=like is None and blocks is None, local_size=window, **common)


def image_blocks(visual):
    """(batch, seq) long: per position the index of the image it belongs to (its run of consecutive visual
    positions, counted from 0 per row), -1 at text: the ``block_sequence_ids`` of ``transformers.masking_utils``
    (``blockwise_overlay``), what a bidirectional-image family builds from its ``token_type_ids``."""
    import torch

    visual = visual.bool()
    prev = torch.nn.functional.pad(visual, (1, 0), value=False)[:, :-1]
    ids = (visual & ~prev).long().cumsum(1) - 1
    return torch.where(visual, ids, torch.full_like(ids, -1))


def lm_masks(model, embeds, keys, cache, blocks=None, block_kinds=("full_attention", "sliding_attention")):
    """The masks a language model receives keyed by attention kind (``{"full_attention": ..., "sliding_attention":
    ...}``: transformers' mask mapping, which Gemma 3's wrapper builds and hands the LM) for the sequence ``embeds``
    (batch, q, d) with the 2-D key mask ``keys`` (batch, past + q) and the LM's ``cache`` (None, or the cache the
    call carries: it sizes a sliding layer's keys). Built as transformers builds them (``masking_utils``): with
    ``blocks`` (:func:`image_blocks` of the sequence, a prefill) full layers get ``OR(causal, same image)``, sliding
    layers ``AND(OR(causal, same image), window)``; without (a decode step: the query is text)
    ``create_masks_for_generate``. ``model``: the root module (nnsight envoy or HF model), for its config.
    ``block_kinds``: the kinds that get the image blocks (``Adapter.image_attention_kinds``; Gemma 4: sliding only,
    its full layers stay causal)."""
    from transformers.masking_utils import (blockwise_overlay, create_causal_mask, create_masks_for_generate,
                                            maybe_pad_block_sequence_ids, sliding_window_overlay)

    cfg = getattr(model, "_module", model).config.get_text_config()
    keys = keys.to(embeds.device)
    if blocks is None:
        return create_masks_for_generate(config=cfg, inputs_embeds=embeds, attention_mask=keys, cache=cache,
                                         position_ids=None)
    blocks = blocks.to(embeds.device)
    kinds = set(cfg.layer_types)
    out = {}
    if "full_attention" in kinds:
        full_blocks = {"block_sequence_ids": blocks} if "full_attention" in block_kinds else {}
        out["full_attention"] = create_causal_mask(config=cfg, inputs_embeds=embeds, attention_mask=keys, cache=cache,
                                                   **full_blocks)
    if "sliding_attention" in kinds:
        sliding = getattr(cache, "is_sliding", None)
        layer = sliding.index(True) if sliding and True in sliding else 0
        padded = maybe_pad_block_sequence_ids(blocks, keys, keys.shape[1], 0)
        out["sliding_attention"] = create_causal_mask(
            config=cfg, inputs_embeds=embeds, attention_mask=keys, cache=cache,
            or_mask_function=blockwise_overlay(padded),
            and_mask_function=sliding_window_overlay(cfg.sliding_window), layer_idx=layer)
    return out


def layer_mask(model, embeds, keys, cache, layer: int, window=None, blocks=None):
    """The mask of decoder layer ``layer`` for the queries ``embeds`` (batch, q, d) against the keys its OWN KV cache
    layer holds plus these (``keys``: the 2-D mask (batch, past + q) of every key that layer has seen), built by
    ``transformers.masking_utils.create_causal_mask`` sized by that cache layer (``layer_idx``): a sliding-window
    layer's cache keeps only its last ``window - 1`` keys, which the mask follows. ``window``: the layer's window
    (None: full); ``blocks``: :func:`image_blocks` of the keys (bidirectional images at a prefill). In the format
    the model's attention implementation takes (its config)."""
    from transformers.masking_utils import (blockwise_overlay, create_causal_mask, maybe_pad_block_sequence_ids,
                                            sliding_window_overlay)

    cfg = getattr(model, "_module", model).config.get_text_config()
    keys = keys.to(embeds.device)
    extra = {}
    if blocks is not None:
        extra["or_mask_function"] = blockwise_overlay(maybe_pad_block_sequence_ids(blocks.to(embeds.device), keys,
                                                                                   keys.shape[1], 0))
    if window is not None:
        extra["and_mask_function"] = sliding_window_overlay(int(window))
    return create_causal_mask(config=cfg, inputs_embeds=embeds, attention_mask=keys, cache=cache, layer_idx=layer,
                              **extra)


def recurrent_mask(model, embeds, keys, cache):
    """The mask of a linear-attention layer (a recurrent state, no attention pattern: Qwen3.5's gated delta net) for
    the queries ``embeds`` (batch, q, d) with the 2-D key mask ``keys``: what the LM builds for it
    (``transformers.masking_utils.create_recurrent_attention_mask``: the padding mask of the last q keys, or None on
    a decode step / with no padding)."""
    from transformers.masking_utils import create_recurrent_attention_mask

    cfg = getattr(model, "_module", model).config.get_text_config()
    return create_recurrent_attention_mask(config=cfg, inputs_embeds=embeds, attention_mask=keys.to(embeds.device),
                                           cache=cache)


def default_positions(n: int, rows: int, mrope: bool, device):
    """The position ids the LM builds when it gets none: 0..n-1 for ``rows`` rows (on every M-RoPE axis)."""
    import torch

    return torch.arange(n, device=device).expand(*((3,) if mrope else ()), rows, n)


def split_positions(pos, mrope):
    """Position ids as the LM holds them -> (ids for the rotary module, ids for the decoder layers' kwarg). M-RoPE
    (the adapter's ``rope = "mrope"``): (3, batch, n), one row per axis, no layer ids; Qwen's generate puts the text
    positions in front of the three axes, (4, batch, n)."""
    if not mrope:
        return pos, pos
    if pos.shape[0] == 4:
        return pos[1:], pos[0]
    return pos, None


def rotary(model, path: str, h, pos, kind=None):
    """The LM's rotary module at ``path`` (the adapter's ``rotary_emb``) on position ids ``pos``: (cos, sin).
    ``kind``: the layer's attention kind, for a module with one rope per kind (``Adapter.rotary_takes_kind``)."""
    for part in path.split("."):
        model = model[int(part)] if part.isdigit() else getattr(model, part)
    rot = getattr(model, "_module", model)  # the plain torch module (nnsight envoy or HF module)
    if kind is not None:
        return type(rot).forward(rot, h, pos, kind)
    return type(rot).forward(rot, h, pos)  # class forward: no hooks, no nnsight call


def layer_io(value):
    """A decoder layer's ``(args, kwargs)`` -> ``(hidden_states, other args, kwargs copy, positional)``."""
    args, kwargs = value
    kwargs = dict(kwargs)
    if args:
        return args[0], tuple(args[1:]), kwargs, True
    return kwargs.pop("hidden_states"), (), kwargs, False


def pack(h, rest, kwargs, positional):
    """The inverse of :func:`layer_io` with new hidden states ``h``."""
    if positional:
        return ((h,) + rest, kwargs)
    kwargs["hidden_states"] = h
    return (rest, kwargs)


def extend_keys(am, b, more):
    """The 2-D key mask ``am`` (batch, keys) followed by ``more`` generated tokens (always attended)."""
    import torch

    return torch.cat([am, torch.ones(b, more, dtype=am.dtype, device=am.device)], 1)


def refuse_single_pass(ctx, cache, past, who):
    """In an nnsight generate trace an Experiment run once (no ``steps``) reaches only the prefill: a
    sequence-changing intervention would leave every decode step with the wrong mask and positions. A cache the
    model's wrapper built itself for a plain forward (``ctx["caller_cache"]`` False) has no decode step after it."""
    if past == 0 and cache is not None and not ctx.get("generating") and ctx.get("caller_cache", True):
        raise ValueError(
            f"{who} inside an nnsight generate trace through an Experiment run once would change the prefill only: "
            f"the decode steps would run with the unchanged attention mask and positions against the changed KV "
            f"cache (wrong tokens, silently). Let it act on every step: mech_vtokens.generate(vlm, images, prompts, "
            f"interventions=[...]), or exp.execute(vlm.model, steps=tracer.iter[:max_new_tokens]) in your trace, "
            f"or wrap the generate call in interventions.applied(vlm, batch, interventions=[...])")


def slice_token_kwargs(kwargs, decl, index, valid, keep):
    """The per-token LM kwargs a family declares (``Adapter.lm_token_kwargs``), for the shortened sequence
    (``index`` / ``valid`` (batch, n'): gather index and real slots; ``keep`` (batch, n): the kept positions). A
    ``"seq"`` entry (batch, n, ...) is gathered along the sequence (padding slots zero / False); a ``("rows", mask)``
    entry (packed rows at the True positions of kwarg ``mask``, row-major: one tensor or a list of them, e.g.
    Qwen3-VL's ``deepstack_visual_embeds``) keeps the rows of the kept positions, in order. Entries the call does
    not carry (None) are left out. Returns the replacements (the old masks are read from ``kwargs``)."""
    import torch

    new = {}
    for name, kind in decl.items():
        v = kwargs.get(name)
        if v is None:
            continue
        if kind == "seq":
            idx = index.to(v.device)
            ok = valid.to(v.device)
            idx = idx.reshape(*idx.shape, *([1] * (v.ndim - 2))).expand(*idx.shape, *v.shape[2:])
            g = v.gather(1, idx)
            ok = ok.reshape(*ok.shape, *([1] * (v.ndim - 2)))
            new[name] = g & ok if g.dtype == torch.bool else g * ok.to(g.dtype)
        else:
            m = kwargs[kind[1]]
            k = keep.to(m.device)[m.bool()]
            new[name] = [r[k.to(r.device)] for r in v] if isinstance(v, (list, tuple)) else v[k.to(v.device)]
    return new


def reinjected(value, ctx, stash, j):
    """The vectors the model adds after layer ``j`` (``Adapter.injection``: Qwen3-VL DeepStack), put back by an
    intervention that took them out of the LM call (VisualEntry / VisualExit: the LM holds one mask for all its
    layers, but their sequence changes between layers): ``stash`` = {"rows": the packed rows per layer, "mask": their
    (batch, seq) positions} of the full sequence. On the full sequence all rows go back; in the shortened window
    (``ctx["shortened"]``) only the rows of the tokens still in it, at their new positions: a removed token's vector
    has no position to go to."""
    rows, mask = stash["rows"], stash["mask"]
    if rows is None or j >= len(rows):
        return None
    packed = rows[j].to(value.device, value.dtype)
    mask = mask.to(value.device)
    if ctx.get("shortened"):
        lay = ctx["layout"]
        index, valid, keep = (lay[k].to(value.device) for k in ("index", "valid", "keep"))
        packed = packed[keep[mask]]
        mask = mask.gather(1, index) & valid
    out = value.clone()
    out[mask] = out[mask] + packed
    return out
