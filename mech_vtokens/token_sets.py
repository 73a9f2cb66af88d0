"""Token sets: WHICH visual tokens an intervention acts on (paper Secs. 4.3, 5.1, 6.2, 7.2; Tables 1-2).

Every intervention takes one. A set is resolved OUTSIDE the trace, against a prepared batch, to a (batch, seq) bool
mask that is shipped into the trace with the intervention's ``extras``:

- ``AllVisual()`` — every visual token (the paper's "-All", "-vMHA", "-vFFN" rows).
- ``Positions([...])`` — explicit tokens: visual indices (ints, in ``batch.visual_positions`` order) or
  ``(row, position)`` pairs (sequence positions; must be visual positions).
- ``Group(mask_or_indices)`` — a group from a probe / partition result (sinks, dead, alive): a boolean mask over the
  visual tokens (length ``batch.n_visual``) or a list of visual indices.
- ``Kinds("patch", ...)`` — the visual tokens of these kinds (``batch.kinds``: "patch", "thumbnail", "newline",
  "cls"); e.g. ``Complement(Kinds("newline"))`` leaves out LLaVA-NeXT / OneVision's learned row separators.
- ``Complement(set)`` — the visual tokens NOT in ``set``.
- ``MatchedRandom(set, seed=0)`` — the paper's "-Remaining" control: per image, the same number of tokens as ``set``
  has in that image, drawn uniformly from that image's tokens outside ``set``. Seeded (the authors' code is not).

``resolve(tokens, batch)`` returns the mask; an empty set raises ``InputError`` (no silent no-op).
"""

from __future__ import annotations

import torch

from mech_vtokens.component import rows_for
from mech_vtokens.errors import InputError


class TokenSet:
    """Base class: ``visual(batch)`` -> (n_visual,) bool over the batch's visual tokens."""

    def visual(self, batch) -> torch.Tensor:
        raise NotImplementedError

    def mask(self, batch) -> torch.Tensor:
        """(batch, seq) bool mask of the selected visual tokens."""
        sel = self.visual(batch)
        full = torch.zeros_like(batch.visual_mask)
        pos = batch.visual_positions[sel]
        full[pos[:, 0], pos[:, 1]] = True
        return full

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class AllVisual(TokenSet):
    def visual(self, batch):
        return torch.ones(batch.n_visual, dtype=torch.bool)


class Positions(TokenSet):
    """Explicit visual tokens. The unit of an int is the BATCH's visual index: visual tokens counted over the whole
    batch in ``batch.visual_positions`` order (row 0's first), not per image; a ``(row, position)`` pair is a
    sequence position. Per image: ``(batch.tokens["image"] == j).nonzero()`` gives image j's visual indices."""

    def __init__(self, positions):
        self.positions = list(positions)

    def visual(self, batch):
        n = batch.n_visual
        sel = torch.zeros(n, dtype=torch.bool)
        lookup = {tuple(p): i for i, p in enumerate(batch.visual_positions.tolist())}
        for p in self.positions:
            if isinstance(p, (tuple, list)):
                if len(p) != 2 or tuple(int(x) for x in p) not in lookup:
                    raise InputError(f"Positions: {tuple(p)!r} is not a visual (row, position) of this batch; "
                                     f"visual positions are batch.visual_positions (rows 0..{len(batch) - 1})")
                sel[lookup[tuple(int(x) for x in p)]] = True
            else:
                i = int(p)
                if not 0 <= i < n:
                    raise InputError(f"Positions: visual index {i} is outside the visual span 0..{n - 1} of this "
                                     f"batch ({n} visual tokens; ints count the batch's visual tokens, not one "
                                     f"image's: use (row, position) pairs or batch.tokens['image'] for per-image "
                                     f"choices)")
                sel[i] = True
        return sel


class Group(TokenSet):
    def __init__(self, members, name: str = "group"):
        self.members = members
        self.name = name

    def visual(self, batch):
        n = batch.n_visual
        members = self.members
        if getattr(getattr(members, "flags", None), "writeable", True) is False:
            members = members.copy()  # a read-only numpy array (pandas' to_numpy): torch warns on it
        m = torch.as_tensor(members)
        if m.dtype == torch.bool:
            if m.shape != (n,):
                raise InputError(f"Group {self.name!r}: a boolean mask must have one entry per visual token "
                                 f"({n}), got shape {tuple(m.shape)}")
            return m.clone()
        return Positions(self._indices(m, n)).visual(batch)

    def _indices(self, m, n) -> list:
        """Integer members as visual indices; values that would be read with another meaning are refused: floats
        (a score or NaN-holed mask), and int 0/1 arrays one per visual token or with repeats (a mask cast to int:
        read as indices it would pick tokens 0 and 1 only)."""
        fix = "give a boolean mask (e.g. mask.astype(bool) / scores > t) or distinct integer visual indices"
        if m.is_floating_point() or m.is_complex():
            nan = " (it holds NaN)" if bool(torch.isnan(m).any()) else ""
            raise InputError(f"Group {self.name!r}: members are {m.dtype} values{nan}, neither a mask nor "
                             f"indices; {fix}")
        flat = m.reshape(-1)
        if len(flat) == n and n > 0 and bool(((flat == 0) | (flat == 1)).all()):
            raise InputError(f"Group {self.name!r}: an integer 0/1 array with one entry per visual token ({n}) "
                             f"looks like a mask cast to int, which would be read as the indices 0 and 1; {fix}")
        if len(torch.unique(flat)) != len(flat):
            raise InputError(f"Group {self.name!r}: repeated indices {flat.tolist()[:8]}...; {fix}")
        return flat.tolist()


class Kinds(TokenSet):
    """The visual tokens whose kind (``batch.kinds``) is one of ``kinds``."""

    def __init__(self, *kinds: str):
        from mech_vtokens.adapters.geometry import KINDS

        bad = [k for k in kinds if k not in KINDS]
        if not kinds or bad:
            raise InputError(f"Kinds{kinds!r}: name one or more token kinds of {KINDS}"
                             + (f" ({', '.join(map(repr, bad))} is none)" if bad else ""))
        self.kinds = tuple(kinds)

    def visual(self, batch):
        from mech_vtokens.adapters.geometry import KINDS

        codes = torch.tensor([KINDS.index(k) for k in self.kinds])
        return torch.isin(batch.tokens["kind"], codes)


class Complement(TokenSet):
    def __init__(self, of: TokenSet):
        self.of = as_token_set(of)

    def visual(self, batch):
        return ~self.of.visual(batch)


class MatchedRandom(TokenSet):
    def __init__(self, of: TokenSet, seed: int = 0):
        self.of = as_token_set(of)
        self.seed = int(seed)

    def visual(self, batch):
        target = self.of.visual(batch)
        image = batch.tokens["image"]
        gen = torch.Generator().manual_seed(self.seed)
        sel = torch.zeros_like(target)
        for img in torch.unique(image).tolist():
            idx = (image == img).nonzero().flatten()
            k = int(target[idx].sum())
            pool = idx[~target[idx]]
            if k > len(pool):
                raise InputError(f"MatchedRandom: image {img} has {k} target tokens but only {len(pool)} others to "
                                 f"draw the same count from")
            sel[pool[torch.randperm(len(pool), generator=gen)[:k]]] = True
        return sel


def as_token_set(tokens) -> TokenSet:
    """``"all"`` / None -> AllVisual; a TokenSet as is; a bool tensor -> Group; a list of ints/pairs -> Positions."""
    if tokens is None or (isinstance(tokens, str) and tokens == "all"):
        return AllVisual()
    if isinstance(tokens, TokenSet):
        return tokens
    if isinstance(tokens, torch.Tensor) and tokens.dtype == torch.bool:
        return Group(tokens)
    if isinstance(tokens, (list, tuple, torch.Tensor)):
        return Positions(tokens.tolist() if isinstance(tokens, torch.Tensor) else tokens)
    raise InputError(f"cannot use {tokens!r} as a token set: pass 'all', a TokenSet, a bool mask over visual "
                     f"tokens or a list of visual indices / (row, position) pairs")


def resolve(tokens, batch, who: str = "intervention") -> torch.Tensor:
    """(batch, seq) bool mask of ``tokens`` in ``batch``; raises for an empty set."""
    ts = as_token_set(tokens)
    if batch.n_visual == 0:
        raise InputError(f"{who}: the batch has no visual tokens to act on")
    mask = ts.mask(batch)
    if not bool(mask.any()):
        raise InputError(f"{who}: the token set {ts!r} selects no token in this batch (an empty set would silently "
                         f"do nothing)")
    return mask


def packed_layout(keep: torch.Tensor) -> dict:
    """The shortened, LEFT-padded layout that keeps ``keep`` (batch, seq) bool: ``index`` (batch, seq') gather index
    into the old sequence (padding slots point at 0), ``valid`` (batch, seq') bool, ``keep``."""
    counts = keep.sum(1)
    width = int(counts.max())
    b, n = keep.shape
    index = torch.zeros(b, width, dtype=torch.long)
    valid = torch.zeros(b, width, dtype=torch.bool)
    for r in range(b):
        kept = keep[r].nonzero().flatten()
        index[r, width - len(kept):] = kept
        valid[r, width - len(kept):] = True
    return {"keep": keep, "index": index, "valid": valid}


# ---- used INSIDE the trace (torch only) ------------------------------------------------------------------------

def fit(mask, value, ctx):
    """A (batch, seq) mask in the batch's ORIGINAL coordinates, fitted to ``value``'s sequence length: gathered into
    the shortened layout after a Prune / VisualExit, padded with False for tokens appended by generation without a
    cache, and all False on a cached decode step (only new text tokens are in the forward then)."""
    if ctx.get("shortened"):
        lay = ctx["layout"]
        mask = mask.gather(1, lay["index"].to(mask.device)) & lay["valid"].to(mask.device)
    mask = rows_for(mask, value.shape[0])  # beams / several sequences per prompt: each copy as its prompt
    n = value.shape[1]
    if n < mask.shape[1]:
        return torch.zeros(mask.shape[0], n, dtype=torch.bool, device=value.device)
    if n > mask.shape[1]:
        pad = torch.zeros(mask.shape[0], n - mask.shape[1], dtype=torch.bool, device=mask.device)
        mask = torch.cat([mask, pad], 1)
    return mask.to(value.device)
