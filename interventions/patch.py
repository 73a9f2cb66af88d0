"""PatchActivations: activation patching of visual tokens between rows of ONE batch (issue 17; the causal test the
paper's ablations approximate, Secs. 4.3 and 7.2, made token- and region-precise).

At each of its ``sites`` it writes, into every TARGET row, the values of the SOURCE row at the same visual tokens:
the j-th visual token of the target image receives the j-th visual token of the source image, for the tokens of
``tokens`` (a token set: ``Region(box)``, a sink / dead / alive ``Group``, ``Positions``, one token) that lie in the
target rows. ``pairs`` says which row is patched from which: ``{target_row: source_row}`` or a list of
``(target, source)``. Source and target images must have the same token geometry (same size and tiling: every
token's box equal), so "the same token" is the same region of the picture; anything else is refused before the
forward.

Because source and target are rows of the same forward, the source's values at a site are the clean values of that
row at that site, computed in the same pass; a sweep (layers x regions, layers x tokens) puts many patched copies of
the target in one batch (``mech_vtokens.patching.patch_sweep``).

Sites: any site whose value is laid out per token. LM sites (``hook_embed``, ``blocks.{i}.hook_resid_pre`` /
``hook_attn_out`` / ``hook_resid_mid`` / ``hook_mlp_out`` / ``hook_resid_post``, ``ln_final.hook_normalized``):
sequence positions. ``vision.blocks.{i}.hook_resid_post``: the vision rows each token is computed from
(``batch.tokens["vision_rows"]``, the flattened block output); ``vision_projector.hook_out``: its projector rows
(``batch.tokens["projector_mix"]``). Prefill only (a decode step computes new text tokens only).
"""

from __future__ import annotations

import torch

from mech_vtokens.component import Intervention
from mech_vtokens.errors import InputError
from mech_vtokens.token_sets import as_token_set, resolve

_REFUSED_HOOKS = ("hook_inputs", "attn.hook_pattern")


def _pairs(pairs, n_rows: int) -> dict:
    items = pairs.items() if isinstance(pairs, dict) else pairs
    try:
        out = {int(t): int(s) for t, s in items}
    except (TypeError, ValueError):
        raise InputError(f"PatchActivations: pairs={pairs!r}: give {{target_row: source_row}} or a list of "
                         f"(target_row, source_row)") from None
    if not out:
        raise InputError("PatchActivations: give at least one (target_row, source_row) pair")
    for t, s in out.items():
        if not (0 <= t < n_rows and 0 <= s < n_rows):
            raise InputError(f"PatchActivations: pair ({t}, {s}) names a row outside this batch (rows 0..{n_rows - 1})")
        if t == s:
            raise InputError(f"PatchActivations: row {t} is patched from itself (a no-op); give another source row")
        if s in out:
            raise InputError(f"PatchActivations: row {s} is a source and also patched; a source row must stay clean")
    return out


class PatchActivations(Intervention):
    """Write the source row's values at ``tokens`` into each target row, at ``sites`` (one forward, rows of one
    batch)."""

    def __init__(self, sites, tokens, pairs):
        self.sites_given = [sites] if isinstance(sites, str) else list(sites)
        if not self.sites_given:
            raise InputError("PatchActivations: give at least one site, e.g. 'blocks.0.hook_resid_pre'")
        self.tokens = as_token_set(tokens)
        self.pairs = pairs

    def sites(self, vlm):
        out = []
        for name in self.sites_given:
            info = vlm.adapter.parse_site(name)  # an unknown name raises its InputError here
            if info.kind in ("lm_inputs", "unembed") or info.hook in _REFUSED_HOOKS:
                raise InputError(f"PatchActivations: {name!r} holds no per-token activations to patch; patch a "
                                 f"residual / sublayer site (blocks.{{i}}.hook_resid_pre, ...), hook_embed, "
                                 f"vision_projector.hook_out or vision.blocks.{{i}}.hook_resid_post")
            out.append(info.name)
        return out

    def check(self, vlm, batch):
        self.sites(vlm)
        self._plan(batch)

    def conflicts(self, other, vlm, batch):
        if other.layout(vlm, batch) is not None:
            return (f"PatchActivations pairs tokens by their place in the full sequence; {other!r} changes the "
                    f"sequence length: patch in a separate run")
        return None

    def _plan(self, batch):
        """(target (row, pos) pairs, source (row, pos) pairs, target visual indices, source visual indices)."""
        pairs = _pairs(self.pairs, len(batch))
        sel = self.tokens.visual(batch) if batch.n_visual else None
        resolve(self.tokens, batch, "PatchActivations")  # an empty set: refused
        vpos, t = batch.visual_positions, batch.tokens
        row_of = vpos[:, 0]
        dst, src = [], []
        for tr, sr in sorted(pairs.items()):
            ti, si = (row_of == tr).nonzero().flatten(), (row_of == sr).nonzero().flatten()
            if len(ti) != len(si):
                raise InputError(f"PatchActivations: target row {tr} has {len(ti)} visual tokens and source row {sr} "
                                 f"{len(si)}; patching needs images of the same size and tiling (the same token "
                                 f"grid)")
            bt, bs = t["box"][ti], t["box"][si]
            same = ((bt == bs) | (torch.isnan(bt) & torch.isnan(bs))).all()
            if not bool(same):
                raise InputError(f"PatchActivations: the visual tokens of rows {tr} and {sr} cover different regions "
                                 f"(the images differ in size or tiling); give source and target images of one size")
            keep = sel[ti]
            dst.append(ti[keep])
            src.append(si[keep])
        dst, src = torch.cat(dst), torch.cat(src)
        if len(dst) == 0:
            raise InputError(f"PatchActivations: the token set {self.tokens!r} selects no visual token in the target "
                             f"rows {sorted(pairs)}; nothing would be patched")
        return dst, src

    def extras(self, vlm, batch):
        dst, src = self._plan(batch)
        t, vpos = batch.tokens, batch.visual_positions

        def rows(table, idx):  # flat vision / projector rows of each token, element-wise between target and source
            return table[idx]

        vt, vs = rows(t["vision_rows"], dst), rows(t["vision_rows"], src)
        pt, ps = rows(t["projector_mix"], dst), rows(t["projector_mix"], src)
        okv, okp = (vt >= 0) & (vs >= 0), (pt >= 0) & (ps >= 0)
        return {"dst": vpos[dst], "src": vpos[src], "vision_dst": vt[okv], "vision_src": vs[okv],
                "proj_dst": pt[okp], "proj_src": ps[okp]}

    def at(self, site, value, ctx, out):
        if ctx.get("decode"):
            return None
        mine = ctx["mine"]
        if site.startswith("vision.") or site == "vision_projector.hook_out":
            key = "vision" if site.startswith("vision.") else "proj"
            d, s = mine[key + "_dst"].to(value.device), mine[key + "_src"].to(value.device)
            flat = value.reshape(-1, value.shape[-1])
            new = flat.clone()
            new[d] = flat[s]
            return new.reshape(value.shape)
        if value.shape[0] != ctx["visual_mask"].shape[0]:
            raise ValueError(f"PatchActivations copies rows of the prompt's batch, but this forward has "
                             f"{value.shape[0]} rows for {ctx['visual_mask'].shape[0]} prompts (num_beams / "
                             f"num_return_sequences > 1 repeat each prompt): generate with one sequence per prompt")
        d, s = mine["dst"].to(value.device), mine["src"].to(value.device)
        new = value.clone()
        new[d[:, 0], d[:, 1]] = value[s[:, 0], s[:, 1]]
        return new
