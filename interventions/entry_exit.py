"""VisualEntry / VisualExit: visual tokens enter the language model at layer k, or leave it at layer k (paper Sec. 7.2
"Shallow-Layer Skipping", Table 3's L_in rows; the notes' inference-time L_in of the authors' code).

``VisualEntry(k)``: layers ``< k`` run on the TEXT ONLY — the selected visual positions are removed from the sequence
(really shorter, as ``Prune`` does) — and at layer ``k`` the raw projected visual embeddings (the LM's
``inputs_embeds`` at those positions, exactly what the LM would have received at layer 0) are re-inserted at their
original positions, next to the text hidden states coming out of layer ``k-1``. Positions and mask, precisely:

- layers ``< k``: the text runs as its own sequence. ``text_positions="repacked"`` (default) gives it position ids
  ``0..T-1`` over the real tokens of each row (Qwen: the same on all three M-RoPE axes, which is what Qwen gives a
  text-only prompt); ``"original"`` keeps the text tokens' ids from the full sequence (gaps). The LM builds the causal
  mask (with padding) of this shortened sequence itself.
- layer ``k`` on: the position ids are RESET to those of the full sequence — the ids the LM receives for the
  unmodified input: ``0..L-1`` for LLaVA / InternVL (the authors' reset), the 3-D M-RoPE ids for Qwen — and the
  position embeddings are recomputed from them by the LM's own rotary module. The attention mask is rebuilt for the
  full sequence: causal over the ``L`` positions plus the batch's padding, in the format the LM passes its layers
  (eager: additive float with ``finfo.min``; sdpa: bool, or None when nothing is masked but causality) — the same mask
  the LM builds for the clean input.
- generation (KV cache): layers ``< k`` cache the ``T`` text keys, layers ``>= k`` all ``L``. On every decode step
  the new token runs through layers ``< k`` against the text-only cache (the LM's mask and positions of the text
  window, continued as ``Prune`` continues them) and through layers ``>= k`` against the full cache, with the mask
  rebuilt over those ``L + steps`` keys and the position the unmodified model gives the new token. The same as
  re-running the whole forward on prompt + generated tokens (tests check the logits of every step). Generation
  without a cache (``use_cache=False``) is refused.

``VisualExit(k)``: layers ``< k`` see the full sequence; at layer ``k`` the selected visual tokens are dropped
(hidden states, positions and mask sliced). The kept text tokens KEEP their position ids (no reset: their keys in
earlier layers were computed at those positions); the mask is the causal + padding mask of the shortened sequence.
Logits come back shortened (rows left-padded to one width, as after ``Prune``). In generation layers ``>= k`` attend
to their shortened cache (mask rebuilt per step), layers ``< k`` to the full one; ``k >= 1`` (an exit at layer 0 is
``Prune(tokens)``).

Masks: :func:`mech_vtokens.sequence.attention_mask` (transformers ``masking_utils``), one per attention kind of the
layers from ``k`` on, so a layer with a sliding window gets the sliding-window mask of the rebuilt sequence; in
generation (a KV cache) each layer's own (:func:`mech_vtokens.sequence.layer_mask`), sized by its cache layer (a
sliding layer's cache keeps only its last keys). A family whose images attend bidirectionally
(``Adapter.image_attention``, Gemma 3) gets its image blocks in the rebuilt masks (the kept tokens of an image see
each other); one whose rotary module takes the layer kind (Gemma 3: local and global rope) gets each layer's own.

Vectors the model ADDS between layers (``Adapter.injection``; Qwen3-VL DeepStack after layers 0..2): the LM call
holds one mask for all its layers while these sequences change between layers, so both take the vectors out of the LM
call at ``lm.hook_inputs`` and add them at their sites (``blocks.{j}.hook_deepstack``) for the tokens in the sequence
there: on the full sequence every row, in the shortened window only the tokens outside the set (at their new
positions). A selected token's vector after a layer where it is not in the sequence is dropped (Entry: layers
``< k``; Exit: layers ``>= k``), as the token itself is.

Both act at the decoder layers' ``(args, kwargs)`` (sites ``blocks.{i}.hook_inputs`` for every ``i >= k``: the LM
builds one mask and one position embedding for all its layers, so each layer from ``k`` on gets the ones computed at
``k``) and at ``lm.hook_inputs``, and take a token set (default: all visual tokens). Sites between the shortening and
the restoring see the shortened sequence (``ctx["visual_mask"]`` has no selected token there); an intervention that
acts on the selected tokens inside that window is a contradiction and is refused before the forward. Deliberate
differences: the authors' code is LLaVA-1.5 only and single-prompt (no padding); for Qwen we reset to the model's own
M-RoPE ids rather than a flat ``0..L-1``.
"""

from __future__ import annotations

from mech_vtokens.compat import cache_position, kv_cache, past_length
from mech_vtokens.component import Intervention, rows_for
from mech_vtokens.errors import InputError
from mech_vtokens.sequence import (attention_kinds, attention_mask, check_attention_kinds, default_positions,
                                   extend_keys, image_blocks, layer_io, layer_mask, pack, recurrent_mask,
                                   refuse_single_pass, reinjected, rotary, split_positions)
from mech_vtokens.token_sets import as_token_set, packed_layout, resolve

from ._util import layer_list
from .prune import Prune


def _lm_step(value, ctx, out, who):
    """At ``lm.hook_inputs``: how many keys the cache already holds (0 at the prefill), after the refusals."""
    kwargs = value[1]
    cache = kv_cache(kwargs)
    past = past_length(kwargs)
    refuse_single_pass(ctx, cache, past, who)
    emb = kwargs.get("inputs_embeds")
    if past == 0 and emb is not None and emb.shape[1] != ctx["mine"]["keep"].shape[1]:
        raise ValueError(f"{who}: the language model got {emb.shape[1]} tokens without a KV cache where the prompt "
                         f"has {ctx['mine']['keep'].shape[1]} (generation with use_cache=False); generate with the "
                         f"cache (the default), or score prompt + answer in one forward")
    out["_decoding"] = past > 0
    return past


def _masks(like, am, h, kwargs, ctx, blocks=None):
    """The mask of every layer from k on (``{site: mask}``) for the queries ``h`` (batch, q, d) against the keys of
    the 2-D mask ``am``. Without a KV cache one per attention kind (the LM gives each layer the mask of its kind);
    with one (generation) each layer's own, sized by its cache layer (a sliding layer's cache keeps only its last
    keys). ``blocks``: the image blocks of the keys (a family whose images attend bidirectionally, at a prefill)."""
    mine = ctx["mine"]
    cache = kv_cache(kwargs)
    # linear-attention layers (a recurrent state, no attention pattern: Qwen3.5) take the 2-D padding mask of the
    # queries (or None), as the LM builds it for them; the other layers' mask then comes from the config (the layer
    # at k may be a linear one, whose mask says nothing of the attention implementation's format)
    linear = {site: recurrent_mask(ctx["model"], h, am, cache) for site, kind in mine["kinds"].items()
              if kind == "linear_attention"}
    windows = {site: w for site, w in mine["windows"].items() if site not in linear}
    if cache is None and not linear:
        by_window = {w: attention_mask(like, am, h.shape[1], w, blocks) for w in set(windows.values())}
        return {site: by_window[w] for site, w in windows.items()}
    return dict(linear, **{site: layer_mask(ctx["model"], h, am, cache, mine["layer_of"][site], w, blocks)
                           for site, w in windows.items()})


def _rotaries(h, pos, ctx):
    """``{kind: (cos, sin)}`` of the LM's rotary module on ``pos`` for every attention kind of the layers from k on,
    where the module takes the kind (``Adapter.rotary_takes_kind``, Gemma 3: one rope per kind); None otherwise."""
    mine = ctx["mine"]
    if not mine["rotary_kind"]:
        return None
    return {kind: rotary(ctx["model"], mine["rotary"], h, pos, kind) for kind in set(mine["kinds"].values())}


def _later_layer(site, h, rest, kwargs, positional, ctx, out):
    """A layer after k: the mask / positions computed at k, the mask (and rope) of this layer's own kind."""
    kwargs.update(out["_kw"])
    kwargs["attention_mask"] = out["_masks"][site]
    if out.get("_pe") is not None:
        kwargs["position_embeddings"] = out["_pe"][ctx["mine"]["kinds"][site]]
    return pack(h, rest, kwargs, positional)


def _injection_sites(vlm):
    """{site: layer} of the vectors the model adds after a layer (``Adapter.injection``; Qwen3-VL DeepStack)."""
    a = vlm.adapter
    return {f"blocks.{j}.{a.injection[0]}": j for j in a.injection_layers()} if a.injection else {}


class _Window(Intervention):
    """Shared checks: layer, token set, contradictions with interventions inside the shortened window."""

    who = "window"

    def _layer(self, vlm):
        return layer_list(vlm, self.layer, self.who)[0]

    def check(self, vlm, batch):
        if not isinstance(self.layer, int) or isinstance(self.layer, bool):
            raise InputError(f"{self.who}: layer must be one int, got {self.layer!r}")
        k = self._layer(vlm)
        why = vlm.adapter.sequence_change_refusal  # a family whose layers hold per-token state of the full sequence
        if why:
            raise InputError(f"{self.who}: this {vlm.adapter.family} model cannot change the sequence between decoder "
                             f"layers: {why}. Use Prune (removes the tokens before the language model, exact for "
                             f"every layer) instead")
        self._check_layer(vlm, k)
        resolve(self.tokens, batch, self.who)
        check_attention_kinds(vlm, self.who)

    def _check_layer(self, vlm, k):
        pass

    def _window(self, vlm):
        raise NotImplementedError

    def conflicts(self, other, vlm, batch):
        if other is self or not isinstance(other, Intervention) or getattr(other, "tokens", None) is None:
            return None
        lo, hi = self._window(vlm)
        inside = [s for s in other.sites(vlm) if lo < vlm.adapter.site(s)[0] < hi]
        if not inside:
            return None
        sel = resolve(self.tokens, batch, self.who)
        if bool((resolve(other.tokens, batch) & sel).any()):
            return (f"{self!r} removes the selected visual tokens at {inside[0]!r}, where {other!r} acts on some of "
                    f"them: they are not in the sequence there; move that intervention outside layers "
                    f"{self._span(vlm)} or make the token sets disjoint")
        return None

    def extras(self, vlm, batch):
        kinds, a = attention_kinds(vlm), vlm.adapter
        later = {a.canonical(f"blocks.{i}.hook_inputs"): i for i in range(self._layer(vlm), vlm.n_layers)}
        windows = {site: kinds[i] for site, i in later.items()}
        cfg = vlm.hf.config.get_text_config()
        types = list(getattr(cfg, "layer_types", None) or ["full_attention"] * vlm.n_layers)
        blocks = image_blocks(batch.visual_mask) if a.image_attention == "bidirectional" else None
        return dict(packed_layout(~resolve(self.tokens, batch, self.who)), mrope=vlm.adapter.rope == "mrope",
                    k_site=a.canonical(f"blocks.{self._layer(vlm)}.hook_inputs"), windows=windows, layer_of=later,
                    kinds={site: types[i] for site, i in later.items()}, rotary_kind=a.rotary_takes_kind,
                    rotary=a.rotary_emb, blocks=blocks, keys=batch.inputs.get("attention_mask"),  # (Prune's too)
                    injection=a.injection, inject_at=_injection_sites(vlm), token_kwargs=a.lm_token_kwargs,
                    block_kinds=a.image_attention_kinds)  # (Prune's too)

    def _take_injection(self, value, ctx, out):
        """At the prefill's ``lm.hook_inputs``: keep the vectors the model adds between layers (DeepStack) and take
        them out of the LM call, which holds ONE mask for all its layers while this sequence changes between layers;
        they go back at their sites (``_put_injection``) for the tokens in the sequence there."""
        inj = ctx["mine"]["injection"]
        if inj is None or out["_decoding"]:
            return value
        args, kwargs = value
        kwargs = dict(kwargs)
        out["_inj"] = {"rows": kwargs.get(inj[1]), "mask": kwargs.get(inj[2])}
        kwargs[inj[1]] = kwargs[inj[2]] = None
        return (args, kwargs)

    def _put_injection(self, site, value, ctx, out):
        if out["_decoding"] or "_inj" not in out:
            return None
        return reinjected(value, ctx, out["_inj"], ctx["mine"]["inject_at"][site])

    def decode_sites(self, vlm):  # every decode step: each layer gets the mask of its own (shorter or full) cache
        return self.sites(vlm)


class VisualEntry(_Window):
    who = "VisualEntry"

    def __init__(self, layer: int, tokens="all", text_positions: str = "repacked"):
        if text_positions not in ("repacked", "original"):
            raise InputError(f"VisualEntry: text_positions must be 'repacked' (the text as its own sequence, "
                             f"0..T-1) or 'original' (gaps where the visual tokens were), not {text_positions!r}")
        self.layer = layer
        self.tokens = as_token_set(tokens)
        self.text_positions = text_positions
        self._prune = Prune(self.tokens, positions=text_positions)

    def _check_layer(self, vlm, k):
        if k == 0:
            raise InputError("VisualEntry: layer 0 is where visual tokens enter anyway (an entry at 0 changes "
                             "nothing); use 1..n_layers-1")

    def _span(self, vlm):
        return f"0..{self._layer(vlm) - 1}"

    def _window(self, vlm):
        a = vlm.adapter
        return a.site("lm.hook_inputs")[0], a.site(f"blocks.{self._layer(vlm)}.hook_inputs")[0]

    def sites(self, vlm):  # the LM builds one mask / position embedding for all layers: every layer >= k gets ours
        return (["lm.hook_inputs"] + [f"blocks.{i}.hook_inputs" for i in range(self._layer(vlm), vlm.n_layers)]
                + list(_injection_sites(vlm)))

    def layout(self, vlm, batch):
        return dict(self.extras(vlm, batch), start="lm.hook_inputs", stop=f"blocks.{self._layer(vlm)}.hook_inputs")

    def at(self, site, value, ctx, out):
        import torch

        if site == "lm.hook_inputs":
            past = _lm_step(value, ctx, out, "VisualEntry")
            kw = value[1]
            if past == 0:
                out["_full"] = {"emb": kw["inputs_embeds"], "am": kw.get("attention_mask"),
                                "pos": kw.get("position_ids")}
            else:  # decode: layer 0 (< k) caches the text window; the incoming positions are the full sequence's
                out["_step"] = {"done": past - out["_prune"]["_state"]["width"], "pos": kw.get("position_ids")}
            value = self._take_injection(value, ctx, out)
            return self._prune.at(site, value, ctx, out.setdefault("_prune", {}))
        if site in ctx["mine"]["inject_at"]:
            return self._put_injection(site, value, ctx, out)
        h, rest, kwargs, positional = layer_io(value)
        if site != ctx["mine"]["k_site"]:  # a layer after k: the full sequence's mask / positions computed at k
            return _later_layer(site, h, rest, kwargs, positional, ctx, out)
        if out["_decoding"]:
            return self._decode(h, rest, kwargs, positional, ctx, out)
        # at layer k: re-insert the raw embeddings, restore the full sequence's mask and positions
        full = out["_full"]
        emb = full["emb"]
        b, n, d = emb.shape
        mine = ctx["mine"]
        index, valid = rows_for(mine["index"], b).to(h.device), rows_for(mine["valid"], b).to(h.device)
        # the text hidden states go back to their original columns; invalid (padding) slots go to a spare column n
        dest = torch.where(valid, index, torch.full_like(index, n))
        new = torch.cat([emb.to(h.dtype), emb.new_zeros(b, 1, d).to(h.dtype)], 1)
        new = new.scatter(1, dest.unsqueeze(-1).expand(-1, -1, d), h)[:, :n]
        am = full["am"]
        if isinstance(am, dict):  # the LM got its masks per kind from its wrapper (Gemma 3): the batch's 2-D mask
            am = None if mine["keys"] is None else rows_for(mine["keys"], b)
        am = torch.ones(b, n, dtype=torch.long, device=h.device) if am is None else am.to(h.device)
        pos = full["pos"]
        if pos is None:  # what the LM builds when it gets none: 0..n-1
            pos = default_positions(n, 1, mine["mrope"], h.device)
        out["_am"], out["_next"] = am, pos[..., -1:] + 1  # for the decode steps
        blocks = None if mine["blocks"] is None else rows_for(mine["blocks"], b).to(h.device)  # the full sequence's
        return self._restore(new, rest, kwargs, positional, ctx, out,
                             _masks(kwargs.get("attention_mask"), am, new, kwargs, ctx, blocks), pos)

    def _decode(self, h, rest, kwargs, positional, ctx, out):
        """Layer k on a decode step: the new tokens attend to the full cache (prompt + generated so far)."""
        import torch

        b, q = h.shape[:2]
        step = out["_step"]
        pos = step["pos"]
        if pos is None:  # no ids from the caller: continue the full sequence's
            pos = out["_next"] + step["done"] + torch.arange(q, device=h.device)
        am = extend_keys(out["_am"], b, step["done"] + q)
        return self._restore(h, rest, kwargs, positional, ctx, out, _masks(kwargs.get("attention_mask"), am, h, kwargs,
                                                                           ctx), pos)

    def _restore(self, h, rest, kwargs, positional, ctx, out, masks, pos):
        rope_pos, layer_pos = split_positions(pos.to(h.device), ctx["mine"]["mrope"])
        out["_masks"] = masks
        out["_pe"] = _rotaries(h, rope_pos, ctx)
        pe = (rotary(ctx["model"], ctx["mine"]["rotary"], h, rope_pos) if out["_pe"] is None
              else out["_pe"][ctx["mine"]["kinds"][ctx["mine"]["k_site"]]])
        kw = {"attention_mask": masks[ctx["mine"]["k_site"]], "position_embeddings": pe}
        if kwargs.get("position_ids") is not None and layer_pos is not None:
            kw["position_ids"] = layer_pos
        done = out["_step"]["done"] + out["_am"].shape[1] if out["_decoding"] else 0
        kw.update(cache_position(kwargs, done, h.shape[1], h.device))
        out["_kw"] = kw
        kwargs.update(kw)
        return pack(h, rest, kwargs, positional)


class VisualExit(_Window):
    who = "VisualExit"

    def __init__(self, layer: int, tokens="all"):
        self.layer = layer
        self.tokens = as_token_set(tokens)

    def _span(self, vlm):
        return f"{self._layer(vlm)}..{vlm.n_layers - 1}"

    def _window(self, vlm):
        return vlm.adapter.site(f"blocks.{self._layer(vlm)}.hook_inputs")[0], len(vlm.adapter._sites)

    def sites(self, vlm):  # lm.hook_inputs: to refuse a KV cache (generate) before any layer runs, and DeepStack
        return (["lm.hook_inputs"] + [f"blocks.{i}.hook_inputs" for i in range(self._layer(vlm), vlm.n_layers)]
                + list(_injection_sites(vlm)))

    def layout(self, vlm, batch):
        return dict(self.extras(vlm, batch), start=f"blocks.{self._layer(vlm)}.hook_inputs")

    def _check_layer(self, vlm, k):
        if k == 0:
            raise InputError("VisualExit: an exit at layer 0 removes the tokens before any layer, which is "
                             "Prune(tokens) (original positions kept); use 1..n_layers-1")

    def at(self, site, value, ctx, out):
        import torch

        if site == "lm.hook_inputs":
            past = _lm_step(value, ctx, out, "VisualExit")
            out["_done"] = past - ctx["mine"]["keep"].shape[1] if past else 0  # layer 0 (< k) caches everything
            new = self._take_injection(value, ctx, out)
            return None if new is value else new
        if site in ctx["mine"]["inject_at"]:
            return self._put_injection(site, value, ctx, out)
        h, rest, kwargs, positional = layer_io(value)
        if site != ctx["mine"]["k_site"]:  # a layer after k: the shortened sequence's mask / positions computed at k
            return _later_layer(site, h, rest, kwargs, positional, ctx, out)
        b, n, d = h.shape
        if out["_decoding"]:  # the new tokens attend to the shortened cache; their positions are unchanged
            am = extend_keys(out["_am"], b, out["_done"] + n)
            out["_masks"] = _masks(kwargs.get("attention_mask"), am, h, kwargs, ctx)
            out["_pe"] = None  # the LM's own position embeddings (per kind) are the right ones on a decode step
            kw = {"attention_mask": out["_masks"][site]}
            kw.update(cache_position(kwargs, out["_am"].shape[1] + out["_done"], n, h.device))
            out["_kw"] = kw
            kwargs.update(kw)
            return pack(h, rest, kwargs, positional)
        mine = ctx["mine"]
        index, valid = rows_for(mine["index"], b).to(h.device), rows_for(mine["valid"], b).to(h.device)
        new = h.gather(1, index.unsqueeze(-1).expand(-1, -1, d))
        am = ctx.get("attention_mask")  # the full-length 2-D mask (this site is before the shortened window)
        am = torch.ones(b, n, dtype=torch.long, device=h.device) if am is None else rows_for(am, b).to(h.device)
        am = am.gather(1, index) * valid.to(am.dtype)
        out["_am"] = am
        blocks = None
        if mine["blocks"] is not None:  # the kept tokens of an image still see each other
            blocks = rows_for(mine["blocks"], b).to(h.device).gather(1, index).masked_fill(~valid, -1)
        out["_masks"] = _masks(kwargs.get("attention_mask"), am, new, kwargs, ctx, blocks)
        kw = {"attention_mask": out["_masks"][site]}
        cos, sin = kwargs["position_embeddings"]
        idx = index.unsqueeze(-1).expand(-1, -1, cos.shape[-1])
        kw["position_embeddings"] = (cos.expand(b, -1, -1).gather(1, idx), sin.expand(b, -1, -1).gather(1, idx))
        pid = kwargs.get("position_ids")
        if pid is not None and pid.ndim == 2:
            kw["position_ids"] = pid.expand(b, -1).gather(1, index)
        out["_pe"] = None
        if mine["rotary_kind"]:  # one rope per attention kind: each later layer gets its kind's, at the kept ids
            out["_pe"] = _rotaries(new, kw["position_ids"], ctx)
        kw.update(cache_position(kwargs, 0, index.shape[1], h.device))
        out["_kw"] = kw
        kwargs.update(kw)
        return pack(new, rest, kwargs, positional)
