"""Prune: remove a token set from the sequence before the language model (paper Sec. 4.3 "sinks pruning", Sec. 5.1
"-Dead" / "-Remaining", Sec. 6.2 "-Alive"; Tables 1-2).

As in the authors' code the selected visual positions are REMOVED (not masked): the LM runs on a really shorter
sequence (the compute saving), and the kept tokens keep their ORIGINAL position ids, gaps left
(``positions="original"``). ``positions="repacked"`` gives the kept tokens consecutive positions instead
(``0..n_kept-1`` over the non-padding tokens of each row, the same on all three M-RoPE axes for Qwen), as if the
shortened sequence had been the input.

Acts at ``lm.hook_inputs`` (the language model's ``(args, kwargs)``, right after ``hook_embed``): slices
``inputs_embeds``, ``attention_mask`` and ``position_ids`` (Qwen: the 3-D M-RoPE ids (3, B, L) along L; LLaVA /
InternVL pass None: the ids the LM would have built are used) and every per-token input the adapter declares
(``Adapter.lm_token_kwargs``: Qwen3-VL's DeepStack mask and vectors lose the pruned tokens' entries, so the vectors
added after the first layers land on the kept tokens). Rows that lose different numbers of tokens are
LEFT-padded to one width, so logits come back with length ``seq'``; the last position stays each row's last token.
Sites after the prune see the shortened sequence (``ctx["visual_mask"]`` is the shortened one); probes at
``hook_embed`` still see the full one.

In generation the prefill is pruned and every decode step attends to the shortened cache with the positions
continuing (original or repacked). Three ways: ``mech_vtokens.generate(vlm, images, prompts, interventions=[...])``;
an Experiment in your own nnsight generate trace with ``exp.execute(vlm.model, steps=tracer.iter[:n])`` (it then acts
on each step); or ``interventions.applied(...)`` around HF's / nnsight's ``generate`` (plain hooks). An Experiment run
ONCE inside a generate trace (no ``steps``) would prune the prefill only and leave the decode steps with the
unpruned mask and positions, so Prune RAISES when the language model receives a KV cache from its caller there.
Deliberate difference: the authors' code is unseeded for the random control; ``MatchedRandom`` is seeded.
"""

from __future__ import annotations

from mech_vtokens.compat import cache_position, kv_cache, past_length
from mech_vtokens.component import Intervention, rows_for
from mech_vtokens.errors import InputError
from mech_vtokens.sequence import (default_positions, extend_keys, image_blocks, lm_masks, refuse_single_pass,
                                   slice_token_kwargs)

from ._util import overlap
from mech_vtokens.token_sets import as_token_set, packed_layout, resolve


class Prune(Intervention):
    def __init__(self, tokens="all", positions: str = "original"):
        if positions not in ("original", "repacked"):
            raise InputError(f"Prune: positions must be 'original' (the paper's code: gaps left) or 'repacked', "
                             f"not {positions!r}")
        self.tokens = as_token_set(tokens)
        self.positions = positions

    def sites(self, vlm):
        return ["lm.hook_inputs"]

    def decode_sites(self, vlm):  # each decode step: the shortened cache's mask, the positions continuing
        return ["lm.hook_inputs"]

    def check(self, vlm, batch):
        resolve(self.tokens, batch, "Prune")

    def conflicts(self, other, vlm, batch):
        if isinstance(other, Intervention) and not isinstance(other, Prune):
            if overlap(self, other, vlm, batch):
                return (f"{self!r} removes tokens that {other!r} also acts on ({overlap(self, other, vlm, batch)} "
                        f"shared): a pruned token cannot be changed later; make the token sets disjoint "
                        f"(e.g. Complement(...))")
        return None

    def layout(self, vlm, batch):
        return packed_layout(~resolve(self.tokens, batch, "Prune"))

    def extras(self, vlm, batch):
        # a family whose wrapper hands the LM its masks per attention kind (Gemma 3) gets them rebuilt here: the
        # batch's 2-D padding mask, and the image blocks where the family's images attend bidirectionally
        att = batch.inputs.get("attention_mask")
        blocks = image_blocks(batch.visual_mask) if vlm.adapter.image_attention == "bidirectional" else None
        return dict(self.layout(vlm, batch), mrope=vlm.adapter.rope == "mrope",
                    token_kwargs=vlm.adapter.lm_token_kwargs, keys=att, blocks=blocks,
                    block_kinds=vlm.adapter.image_attention_kinds)

    def at(self, site, value, ctx, out):
        import torch

        args, kwargs = value
        kwargs = dict(kwargs)
        emb = kwargs["inputs_embeds"]
        mine = ctx["mine"]
        b, n, d = emb.shape
        index, valid = rows_for(mine["index"], b).to(emb.device), rows_for(mine["valid"], b).to(emb.device)
        cache = kv_cache(kwargs)
        past = past_length(kwargs)
        am = kwargs.get("attention_mask")
        mapping = isinstance(am, dict)  # the LM gets one mask per attention kind, built by its wrapper (Gemma 3)
        if mapping:  # rebuilt from the batch's 2-D mask (prefill) / the shortened one (decode)
            am = None if mine["keys"] is None else rows_for(mine["keys"], b).to(emb.device)
        if am is not None and not (isinstance(am, torch.Tensor) and am.ndim == 2):
            raise ValueError("Prune needs a 2-D attention mask (or None) at the language model; got "
                             f"{type(am).__name__} — compiled/static caches are not supported")
        pos = kwargs.get("position_ids")
        refuse_single_pass(ctx, cache, past, "Prune")
        if past == 0:  # prefill (or a generation step without a cache: the full sequence again)
            full = mine["keep"].shape[1]
            if n > full:  # tokens appended by generation without a cache: all kept
                extra = torch.arange(full, n, device=emb.device).expand(b, -1)
                index = torch.cat([index, extra], 1)
                valid = torch.cat([valid, torch.ones_like(extra, dtype=torch.bool)], 1)
            if pos is None:  # what the LM builds when it gets none: 0..n-1 (on every M-RoPE axis)
                pos = default_positions(n, b, mine["mrope"], emb.device)
            elif pos.shape[-2] == 1 and b > 1:  # one row of ids for the whole batch (Gemma 4's wrapper): per row
                pos = pos.expand(*pos.shape[:-2], b, pos.shape[-1])
            am_full = torch.ones(b, n, dtype=torch.long, device=emb.device) if am is None else am
            new_am = am_full.gather(1, index) * valid.to(am_full.dtype)
            if self.positions == "original":
                if mine["mrope"]:  # one row of ids per M-RoPE axis in front
                    new_pos = pos.gather(2, index.unsqueeze(0).expand(pos.shape[0], -1, -1))
                else:
                    new_pos = pos.gather(1, index)
                nxt = pos[..., -1:] + 1
            else:
                rep = (new_am.long().cumsum(1) - 1).clamp(min=0)
                new_pos = rep.unsqueeze(0).expand(pos.shape[0], -1, -1) if mine["mrope"] else rep
                nxt = new_pos[..., -1:] + 1
            keep = rows_for(mine["keep"], b).to(emb.device)
            if n > full:
                keep = torch.cat([keep, torch.ones(b, n - full, dtype=torch.bool, device=emb.device)], 1)
            kwargs.update(slice_token_kwargs(kwargs, mine["token_kwargs"], index, valid, keep))  # DeepStack ...
            kwargs["inputs_embeds"] = emb.gather(1, index.unsqueeze(-1).expand(-1, -1, d))
            kwargs["attention_mask"] = new_am
            kwargs["position_ids"] = new_pos.contiguous()
            if mapping:  # the kept tokens of an image still see each other (blocks), the window on the new indices
                blocks = None
                if mine["blocks"] is not None:
                    blocks = rows_for(mine["blocks"], b).to(emb.device).gather(1, index)
                    blocks = blocks.masked_fill(~valid, -1)
                kwargs["attention_mask"] = lm_masks(ctx["model"], kwargs["inputs_embeds"], new_am, cache, blocks,
                                                    mine["block_kinds"])
            out["_state"] = {"am": new_am, "next": nxt, "width": index.shape[1]}
        else:  # a cached decode step: attend to the shortened cache, continue the positions
            st = out.get("_state")
            if st is None:
                raise ValueError("Prune: a decode step without its prefill; apply Prune for the whole generate call")
            kwargs["attention_mask"] = extend_keys(st["am"].to(emb.device), b, past + n - st["width"])
            step = torch.arange(n, device=emb.device) + (past - st["width"])
            kwargs["position_ids"] = (st["next"] + step).contiguous()
            if mapping:  # a decode step's query is text: the causal / sliding masks of the shortened cache
                kwargs["attention_mask"] = lm_masks(ctx["model"], emb, kwargs["attention_mask"], cache)
        kwargs.update(cache_position(kwargs, past, kwargs["inputs_embeds"].shape[1], emb.device))
        return (args, kwargs)
