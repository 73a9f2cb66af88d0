"""The one site parser: a site name -> (tower, kind, layer, hook), and the ordered ``site`` column of every table
(reading and writing a site's VALUE is ``mech_vtokens.sites``).

Every probe table, ``SparsityResult`` and the plots read ``layer`` from here, so one site has one layer number
everywhere. The convention (``n_layers`` = decoder layers of the model):

==================================== ======== ============== ==============================
site                                 tower    kind           layer
==================================== ======== ============== ==============================
``vision.blocks.{i}.<hook>``         vision   vision_block   ``i`` (its own vision index)
``vision_projector.hook_out``        lm       projector      -1 (what the LM receives)
``hook_embed``                       lm       embed          -1 (the LM input)
``lm.hook_inputs``                   lm       lm_inputs      -1
``blocks.{i}.<hook>``                lm       block          ``i``
``ln_final.hook_normalized``         lm       final_norm     ``n_layers`` (after the last block)
``unembed.hook_out``                 lm       unembed        ``n_layers``
==================================== ======== ============== ==============================

``tower`` separates the two index spaces (vision layer 3 is not decoder layer 3). The projector output counts as the
LM's input (layer -1 of tower ``lm``): the lenses read it in the LM's token space, next to ``hook_embed``.

Names must be canonical (negative block indices resolved: ``Adapter.canonical``; ``Adapter.parse_site`` does both).
Forward order comes from the adapter's site table (``vlm.sites``), never from sorting names: ``site_column`` makes
the ``site`` column an ordered ``pandas.Categorical`` in that order, so sorting, ``groupby`` and plots follow the
forward pass (``hook_embed`` before ``blocks.0.*``, ``blocks.2`` before ``blocks.10``).
"""

from __future__ import annotations

import re
from typing import NamedTuple

from .errors import InputError


class SiteInfo(NamedTuple):
    name: str
    tower: str  # "vision" | "lm"
    kind: str  # vision_block | projector | embed | lm_inputs | block | final_norm | unembed
    layer: int  # see the module docstring
    hook: str  # the part after the block prefix: "hook_resid_post", "attn.hook_pattern", "hook_embed", ...


_FIXED = {
    "vision_projector.hook_out": ("lm", "projector", -1, "hook_out"),
    "hook_embed": ("lm", "embed", -1, "hook_embed"),
    "lm.hook_inputs": ("lm", "lm_inputs", -1, "hook_inputs"),
}
_AFTER = {
    "ln_final.hook_normalized": ("final_norm", "hook_normalized"),
    "unembed.hook_out": ("unembed", "hook_out"),
}
_BLOCK = re.compile(r"(vision\.)?blocks\.(\d+)\.([\w.]+)")


def parse_site(name: str, n_layers: int) -> SiteInfo:
    """(name, tower, kind, layer, hook) of a CANONICAL site name; ``n_layers``: the model's decoder layers."""
    if name in _FIXED:
        return SiteInfo(name, *_FIXED[name])
    if name in _AFTER:
        kind, hook = _AFTER[name]
        return SiteInfo(name, "lm", kind, int(n_layers), hook)
    m = _BLOCK.fullmatch(name)
    if m:
        vision = m.group(1) is not None
        return SiteInfo(name, "vision" if vision else "lm", "vision_block" if vision else "block", int(m.group(2)),
                        m.group(3))
    raise InputError(f"site {name!r} is not a canonical site name; resolve it first with vlm.adapter.canonical(name) "
                     f"(negative block indices) or use one of vlm.sites")


def site_layer(name: str, n_layers: int) -> int:
    """The ``layer`` number of a canonical site (module docstring)."""
    return parse_site(name, n_layers).layer


def site_column(values, order):
    """``values`` (site names) as an ordered ``pandas.Categorical`` whose categories are the sites of ``order``
    (forward order: ``Adapter.forward_order``) that occur in ``values``."""
    import pandas as pd

    present = set(values)
    missing = present.difference(order)
    if missing:
        raise ValueError(f"sites {sorted(missing)} are not in the forward order given")
    return pd.Categorical(values, categories=[s for s in order if s in present], ordered=True)


__all__ = ["SiteInfo", "parse_site", "site_column", "site_layer"]
