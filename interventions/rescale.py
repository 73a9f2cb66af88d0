"""Rescale: multiply a token set's value at one LM site by a factor (paper Sec. 6.2, Fig. 8: the projected visual
embeddings x 0.01 before the LLM). Not in the authors' released code; the paper text is the specification.

The default site ``hook_embed`` is the LM's ``inputs_embeds``: at visual positions exactly the projected image
features as the LM receives them. Any LM site (``blocks.{i}.hook_resid_pre`` ...) works. Prefill only by default.
"""

from __future__ import annotations

from mech_vtokens.component import Intervention
from mech_vtokens.errors import InputError, check_flag

from ._util import finite
from mech_vtokens.token_sets import as_token_set, fit, resolve


class Rescale(Intervention):
    def __init__(self, tokens="all", factor: float = 0.01, site: str = "hook_embed", every_step: bool = False):
        self.tokens = as_token_set(tokens)
        if isinstance(factor, bool):
            raise InputError(f"Rescale: factor={factor!r}; give the number the tokens are multiplied by (e.g. 0.01)")
        self.factor = finite(factor, "Rescale")
        self.site = site
        self.every_step = check_flag(every_step, "Rescale: every_step")

    def sites(self, vlm):
        return [self.site]

    def check(self, vlm, batch):
        order = vlm.adapter.site(self.site)[0]
        if order < vlm.adapter.site("hook_embed")[0] or self.site == "lm.hook_inputs":
            raise InputError(f"Rescale: site {self.site!r} is not a hidden-state site of the language model; use "
                             f"'hook_embed' (the projected visual embeddings as the LM receives them) or a "
                             f"'blocks.{{i}}.hook_*' site")
        resolve(self.tokens, batch, "Rescale")

    def decode_sites(self, vlm):  # every_step: also each generation step (matters without a KV cache)
        return self.sites(vlm) if self.every_step else []

    def extras(self, vlm, batch):
        return {"mask": resolve(self.tokens, batch, "Rescale")}

    def at(self, site, value, ctx, out):
        if ctx.get("decode") and not self.every_step:
            return None
        import torch

        m = fit(ctx["mine"]["mask"], value, ctx).unsqueeze(-1)
        return torch.where(m, value * self.factor, value)
