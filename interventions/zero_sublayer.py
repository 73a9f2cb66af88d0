"""ZeroSublayer: zero the attention and/or MLP output of chosen decoder layers for a token set (paper Sec. 4.3
"sublayer skipping", Sec. 7.2 "Layer Decoupling": the -vMHA / -vFFN rows of Table 3, "MLP-2 for sinks" in Table 1).

Matches the authors' code: the attention output is zeroed AFTER the output projection and BEFORE the residual add
(site ``blocks.{i}.hook_attn_out``), the MLP output before its residual add (``blocks.{i}.hook_mlp_out``), only for the
selected tokens. Their keys/values are still computed and still attended to by other tokens. ``sublayer="injection"``
zeroes what the model adds to the residual stream after layer i outside any sublayer (``Adapter.injection``: Qwen3-VL
DeepStack, site ``blocks.{i}.hook_deepstack``; only the layers it injects after): the mid-stack injection taken out.
The paper's "MLP-2" is the MLP of layer index 1: ``ZeroSublayer(sinks, layers=1, sublayer="mlp")``. Their script's
"n + 0.5" (MLP of layer n) is ``sublayer="mlp"`` at layer n.

Prefill only by default (the paper's setting). ``every_step=True`` also zeroes on generation steps; with a KV cache a
decode step computes only the new (text) token, so this matters only for generation without a cache.
"""

from __future__ import annotations

from mech_vtokens.component import Intervention
from mech_vtokens.errors import InputError, check_flag
from mech_vtokens.results import InterventionResult  # noqa: F401  (its old home; results.py now)

from ._util import layer_list
from mech_vtokens.token_sets import as_token_set, fit, resolve

_SITES = {"attn": ("hook_attn_out",), "mlp": ("hook_mlp_out",), "both": ("hook_attn_out", "hook_mlp_out"),
          "injection": ()}  # the adapter's injection site (Adapter.injection: Qwen3-VL's hook_deepstack)


class ZeroSublayer(Intervention):
    def __init__(self, tokens="all", layers=0, sublayer: str = "attn", every_step: bool = False):
        if sublayer not in _SITES:
            raise InputError(f"ZeroSublayer: sublayer must be 'attn', 'mlp' or 'both' (or 'injection': what the model "
                             f"adds between layers, Qwen3-VL DeepStack), not {sublayer!r}")
        self.tokens = as_token_set(tokens)
        self.layers = layers
        self.sublayer = sublayer
        self.every_step = check_flag(every_step, "ZeroSublayer: every_step")

    def sites(self, vlm):
        hooks = _SITES[self.sublayer]
        if self.sublayer == "injection":
            if not vlm.adapter.injection:
                raise InputError(f"ZeroSublayer(sublayer='injection'): this {vlm.family} model adds nothing to the "
                                 f"residual stream between layers; use 'attn', 'mlp' or 'both'")
            hooks = (vlm.adapter.injection[0],)
        return [f"blocks.{i}.{h}" for i in layer_list(vlm, self.layers, "ZeroSublayer") for h in hooks]

    def check(self, vlm, batch):
        for site in self.sites(vlm):  # a layer without that sublayer (no DeepStack there): named before the forward
            vlm.adapter.site(site)
        resolve(self.tokens, batch, "ZeroSublayer")

    def decode_sites(self, vlm):  # every_step: also each generation step (matters without a KV cache)
        return self.sites(vlm) if self.every_step else []

    def extras(self, vlm, batch):
        return {"mask": resolve(self.tokens, batch, "ZeroSublayer")}

    def at(self, site, value, ctx, out):
        if ctx.get("decode") and not self.every_step:
            return None
        m = fit(ctx["mine"]["mask"], value, ctx)
        return value.masked_fill(m.unsqueeze(-1), 0.0)
