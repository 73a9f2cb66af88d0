"""Interventions on visual tokens (paper Secs. 4.3, 5.1, 6.2, 7.2): one file each, composable with every probe in
one forward (``mech_vtokens.run(..., interventions=[...])``) and usable on a plain HF model / HF ``generate`` through
``applied(...)``."""

from .prune import Prune
from .rescale import Rescale
from mech_vtokens.token_sets import (AllVisual, Complement, Group, Kinds, MatchedRandom, Positions, TokenSet,
                                     resolve)
from .zero_sublayer import ZeroSublayer

__all__ = ["AllVisual", "Complement", "Group", "Kinds", "MatchedRandom", "Positions", "Prune", "Rescale", "TokenSet",
           "ZeroSublayer", "resolve"]

from mech_vtokens.harness import applied  # noqa: E402  (the plain-hook backend lives in the core)

__all__ += ["applied"]

from .attention_knockout import AttentionKnockout  # noqa: E402
from .entry_exit import VisualEntry, VisualExit  # noqa: E402

__all__ += ["AttentionKnockout", "VisualEntry", "VisualExit"]

from .patch import PatchActivations  # noqa: E402
from .patch_region import Region  # noqa: E402

__all__ += ["PatchActivations", "Region"]

from .head_knockout import HeadKnockout  # noqa: E402

__all__ += ["HeadKnockout"]
