"""Activations: the hidden states at chosen sites, kept whole or at the visual positions only.

The plain "read a site" probe: what a hand-written hook would save, and the independent handle tests compare
against. For large runs prefer a reducing probe (EmbedLens, NormTracker): this one hauls tensors back.

Its table is one row per site (shape, dtype), not per token; with ``visual_only=True`` the result's ``kinds`` is the
kind of each kept row (``batch.kinds``), so ``res[site][np.array(res.kinds) == "patch"]`` drops newline tokens.
"""

from __future__ import annotations

from mech_vtokens.component import Probe
from mech_vtokens.errors import InputError
from mech_vtokens.results import Result
from mech_vtokens.site_names import site_column


class Activations(Probe):
    """Save the value at each of ``sites``. ``visual_only=True`` keeps (n_visual, d) rows of LM sites (in
    ``batch.visual_positions`` order); otherwise the full tensor is kept."""

    def __init__(self, sites, visual_only: bool = False):
        if isinstance(sites, str):
            sites = [sites]
        if not sites:
            raise InputError("Activations needs at least one site name (see vlm.sites)")
        self.site_names = list(sites)
        self.visual_only = visual_only

    def sites(self, vlm):
        return self.site_names

    def check(self, vlm, batch):
        if self.visual_only:
            for s in self.site_names:
                if vlm.adapter.site(s)[0] < vlm.adapter.site("hook_embed")[0]:
                    raise InputError(f"Activations(visual_only=True) reads LM sites only; {s!r} is a vision site "
                                     f"(use visual_only=False)")
            if batch.n_visual == 0:
                raise InputError("Activations(visual_only=True) needs visual tokens, but the batch has none")

    def at(self, site, value, ctx, out):
        if self.visual_only:
            value = value[ctx["visual_mask"]]
        out[site] = value.detach().clone()

    def collect(self, raw, batch, vlm):
        return ActivationsResult({vlm.adapter.canonical(s): raw[vlm.adapter.canonical(s)]
                                  for s in self.site_names}, self.visual_only, vlm.adapter.forward_order,
                                 batch.kinds if self.visual_only else None)


class ActivationsResult(Result):
    """``values[site]``: the tensor read there; ``kinds``: with ``visual_only``, the kind of each row (else None)."""

    name = "activations"

    def __init__(self, values: dict, visual_only: bool, order, kinds=None):
        self.values = values
        self.visual_only, self.kinds = visual_only, kinds
        self._order = order  # every site name in forward order: orders the table's ``site`` column

    def __getitem__(self, site):
        return self.values[site]

    def to_pandas(self):
        import pandas as pd

        df = pd.DataFrame([{"site": s, "shape": tuple(v.shape), "dtype": str(v.dtype)}
                           for s, v in self.values.items()])
        df["site"] = site_column(df["site"], self._order)
        return df
