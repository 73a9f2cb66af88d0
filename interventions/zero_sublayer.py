"""ZeroSublayer: zero the attention and/or MLP output of chosen decoder layers for a token set (paper Sec. 4.3
"sublayer skipping", Sec. 7.2 "Layer Decoupling": the -vMHA / -vFFN rows of Table 3, "MLP-2 for sinks" in Table 1).

Matches the authors' code: the attention output is zeroed AFTER the output projection and BEFORE the residual add
(site ``blocks.{i}.hook_attn_out``), the MLP output before its residual add (``blocks.{i}.hook_mlp_out``), only for the
selected tokens. Their keys/values are still computed and still attended to by other tokens. The paper's "MLP-2" is
the MLP of layer index 1: ``ZeroSublayer(sinks, layers=1, sublayer="mlp")``. Their script's "n + 0.5" (MLP of layer n)
is ``sublayer="mlp"`` at layer n.

Prefill only by default (the paper's setting). ``every_step=True`` also zeroes on generation steps; with a KV cache a
decode step computes only the new (text) token, so this matters only for generation without a cache.
"""

from __future__ import annotations

from mech_vtokens.component import Intervention
from mech_vtokens.errors import InputError
from mech_vtokens.results import InterventionResult  # noqa: F401  (its old home; results.py now)

from ._util import layer_list
from mech_vtokens.token_sets import as_token_set, fit, resolve

_SITES = {"attn": ("hook_attn_out",), "mlp": ("hook_mlp_out",), "both": ("hook_attn_out", "hook_mlp_out")}


class ZeroSublayer(Intervention):
    def __init__(self, tokens="all", layers=0, sublayer: str = "attn", every_step: bool = False):
        if sublayer not in _SITES:
            raise InputError(f"ZeroSublayer: sublayer must be 'attn', 'mlp' or 'both', not {sublayer!r}")
        self.tokens = as_token_set(tokens)
        self.layers = layers
        self.sublayer = sublayer
        self.every_step = bool(every_step)

    def sites(self, vlm):
        return [f"blocks.{i}.{h}" for i in layer_list(vlm, self.layers, "ZeroSublayer") for h in _SITES[self.sublayer]]

    def check(self, vlm, batch):
        layer_list(vlm, self.layers, "ZeroSublayer")
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
