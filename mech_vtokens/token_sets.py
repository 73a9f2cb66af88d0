"""Token sets: WHICH visual tokens an intervention acts on (paper Secs. 4.3, 5.1, 6.2, 7.2; Tables 1-2).

Every intervention takes one. A set is resolved OUTSIDE the trace, against a prepared batch, to a (batch, seq) bool
mask that is shipped into the trace with the intervention's ``extras``:

- ``AllVisual()`` — every visual token (the paper's "-All", "-vMHA", "-vFFN" rows).
- ``Positions.each_image([...])`` / ``Positions.of_image(j, [...])`` / ``Positions.in_batch([...])`` — explicit
  tokens by visual index, the unit named (per image, one image, the whole batch); ``Positions([(row, position)])``
  sequence positions. Bare ints are the batch's index and warn on a multi-image batch.
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
from mech_vtokens.errors import InputError, PositionsUnitWarning, check_int


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
    """Explicit visual tokens, in a unit you name:

    - ``Positions.each_image([0, 5])`` — visual tokens 0 and 5 OF EVERY IMAGE (each image's own tokens counted from
      0, in ``batch.visual_positions`` order): what a run over records (``run_dataset``, ``evaluate``) needs.
    - ``Positions.of_image(j, [0, 5])`` — tokens 0 and 5 of image ``j`` of the batch only.
    - ``Positions.in_batch([0, 5])`` — the BATCH's visual index: tokens counted over the whole batch (image 0's first,
      then image 1's, ...), ``batch.visual_positions`` order.
    - ``Positions([(row, position), ...])`` — sequence positions (each must be a visual position).
    - ``Positions([0, 5])`` — ints with no unit named: the batch's visual index (as ``in_batch``); on a batch of
      several images this warns (:class:`PositionsUnitWarning`) naming the three constructors above, and the record
      loops (``run_dataset`` / ``evaluate`` with ``batch_size`` > 1, whose batches are the loop's choice) refuse it.

    Values must be ints (numpy / torch integer scalars too); floats, bools and strings are refused (a bool mask is a
    ``Group``)."""

    def __init__(self, positions, *, unit: str | None = None, image: int | None = None):
        if unit not in (None, "batch", "image"):
            raise InputError(f"Positions: unit={unit!r}; use Positions.each_image([...]), Positions.of_image(j, "
                             f"[...]) or Positions.in_batch([...])")
        if isinstance(positions, (str, bytes)) or not hasattr(positions, "__iter__"):
            raise InputError(f"Positions({positions!r}): give a list of visual indices (ints) or (row, position) "
                             f"pairs, e.g. Positions.each_image([0, 5])")
        self.positions = [_position(p, unit) for p in positions]
        self.unit = unit
        self.image = image
        if image is not None and (not _is_int(image) or int(image) < 0):
            raise InputError(f"Positions.of_image({image!r}, ...): give the image's index in the batch (an int >= 0)")

    @classmethod
    def each_image(cls, indices) -> "Positions":
        """These visual indices within EVERY image of the batch (each image's tokens counted from 0)."""
        return cls(indices, unit="image")

    @classmethod
    def of_image(cls, image: int, indices) -> "Positions":
        """These visual indices within image ``image`` of the batch (processor order) only."""
        return cls(indices, unit="image", image=image)

    @classmethod
    def in_batch(cls, indices) -> "Positions":
        """These indices of the batch's visual tokens (counted over the whole batch, ``batch.visual_positions``)."""
        return cls(indices, unit="batch")

    def __repr__(self) -> str:
        if self.unit is None:
            return f"Positions(positions={self.positions!r})"
        if self.image is not None:
            return f"Positions.of_image({self.image}, {self.positions!r})"
        return f"Positions.{'each_image' if self.unit == 'image' else 'in_batch'}({self.positions!r})"

    @property
    def batch_unit(self) -> bool:
        """True when ints count the batch's visual tokens (unit "batch" or none named): their meaning depends on
        which images share the batch."""
        return self.unit != "image" and any(not isinstance(p, tuple) for p in self.positions)

    def visual(self, batch):
        if self.unit == "image":
            return self._per_image(batch)
        n = batch.n_visual
        sel = torch.zeros(n, dtype=torch.bool)
        lookup = {tuple(p): i for i, p in enumerate(batch.visual_positions.tolist())}
        n_images = len(batch.image_sizes)
        if self.unit is None and n_images > 1 and self.batch_unit:
            import warnings

            warnings.warn(f"Positions({self.positions[:6]!r}{'...' if len(self.positions) > 6 else ''}) on a batch "
                          f"of {n_images} images: ints count the BATCH's visual tokens (image 0's first), so they "
                          f"are not per-image indices. Name the unit: Positions.each_image([...]) (these tokens of "
                          f"every image), Positions.of_image(j, [...]) or Positions.in_batch([...]) (this meaning; "
                          f"silences this warning)", PositionsUnitWarning, stacklevel=3)
        for p in self.positions:
            if isinstance(p, tuple):
                if p not in lookup:
                    raise InputError(f"Positions: {p!r} is not a visual (row, position) of this batch; "
                                     f"visual positions are batch.visual_positions (rows 0..{len(batch) - 1})")
                sel[lookup[p]] = True
            else:
                if not 0 <= p < n:
                    raise InputError(f"Positions: visual index {p} is outside the visual span 0..{n - 1} of this "
                                     f"batch ({n} visual tokens; these ints count the batch's visual tokens, not one "
                                     f"image's: for per-image indices use Positions.each_image([...]) or "
                                     f"Positions.of_image(j, [...]))")
                sel[p] = True
        return sel

    def _per_image(self, batch):
        image = batch.tokens["image"]
        n_images = len(batch.image_sizes)
        sel = torch.zeros(batch.n_visual, dtype=torch.bool)
        if self.image is not None and self.image >= n_images:
            raise InputError(f"Positions.of_image({self.image}, ...): the batch has {n_images} image(s) (0.."
                             f"{n_images - 1}); give an image index of this batch")
        for j in ([self.image] if self.image is not None else range(n_images)):
            idx = (image == j).nonzero().flatten()
            for p in self.positions:
                if not 0 <= p < len(idx):
                    raise InputError(f"Positions: index {p} is outside image {j}'s visual tokens 0.."
                                     f"{len(idx) - 1} ({len(idx)} tokens: batch.visual_tokens_per_image); give "
                                     f"indices every image has")
                sel[idx[p]] = True
        return sel


def _is_int(x) -> bool:
    import numbers

    if isinstance(x, bool) or type(x).__module__ == "numpy" and type(x).__name__ == "bool_":
        return False
    if isinstance(x, torch.Tensor):
        return x.ndim == 0 and not x.is_floating_point() and x.dtype != torch.bool and not x.is_complex()
    return isinstance(x, numbers.Integral)


def _position(p, unit):
    """One Positions entry as an int or an (int, int) tuple; InputError for a value read with another meaning."""
    if isinstance(p, (tuple, list)) or (isinstance(p, torch.Tensor) and p.ndim == 1):
        p = list(p)
        if unit == "image":
            raise InputError(f"Positions.each_image / of_image take visual indices (ints) within an image, not "
                             f"(row, position) pairs like {tuple(p)!r}; give pairs to Positions([...])")
        if len(p) != 2 or not all(_is_int(x) for x in p):
            raise InputError(f"Positions: {tuple(p)!r} is not a (row, position) pair of ints")
        return (int(p[0]), int(p[1]))
    if not _is_int(p):
        what = "a bool (a mask? give Group(mask))" if isinstance(p, bool) or "bool" in type(p).__name__ else \
            f"a {type(p).__name__}"
        raise InputError(f"Positions: {p!r} is {what}, not a visual index; give ints (a boolean mask over the "
                         f"visual tokens is Group(mask), a score threshold Group(scores > t))")
    return int(p)


class Group(TokenSet):
    def __init__(self, members, name: str = "group"):
        self.members = members
        self.name = name

    def visual(self, batch):
        n = batch.n_visual
        if hasattr(self.members, "__len__") and len(self.members) == 0:
            raise InputError(f"Group {self.name!r} is empty: it selects no token (an empty set would silently do "
                             f"nothing); give a boolean mask over the {n} visual tokens or visual indices")
        members = self.members
        if getattr(getattr(members, "flags", None), "writeable", True) is False:
            members = members.copy()  # a read-only numpy array (pandas' to_numpy): torch warns on it
        m = torch.as_tensor(members)
        if m.dtype == torch.bool:
            if m.shape != (n,):
                raise InputError(f"Group {self.name!r}: a boolean mask must have one entry per visual token "
                                 f"({n}), got shape {tuple(m.shape)}")
            return m.clone()
        return Positions.in_batch(self._indices(m, n)).visual(batch)

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
        self.seed = check_int(seed, "MatchedRandom: seed", fix="the seed of the draw, e.g. seed=0")

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
                                 f"draw the same count from; match a smaller set (at most half of an image's "
                                 f"tokens) or choose the control tokens yourself (Positions.each_image / Group)")
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


def batch_dependent(component) -> list:
    """The token sets of ``component`` (its ``tokens``, through Complement / MatchedRandom) whose ints count a
    batch's visual tokens (``Positions`` without a per-image unit): in a loop whose batches are the loop's choice
    they would pick other tokens of other records depending on ``batch_size``."""
    found, todo = [], [getattr(component, "tokens", None)]
    while todo:
        ts = todo.pop()
        if isinstance(ts, Positions) and ts.batch_unit:
            found.append(ts)
        elif isinstance(ts, (Complement, MatchedRandom)):
            todo.append(ts.of)
    return found


def check_record_loop(interventions, batch_size: int, fn: str, vlm=None, probes=()) -> None:
    """Before a record loop (``run_dataset`` / ``evaluate``): what no batch changes is checked once, up front, not
    per batch (where ``on_error="skip"`` would skip every batch of a long run): each component's sites on this
    model (``sites(vlm)``: layers out of range, unknown site names); and with ``batch_size`` > 1 an InputError for a
    token set whose ints count the batch's visual tokens, naming ``Positions.each_image``."""
    from mech_vtokens.component import Component

    if vlm is not None:
        for c in [*probes, *interventions]:
            if isinstance(c, Component):
                for name in c.sites(vlm):
                    vlm.adapter.canonical(name)
    if batch_size <= 1:
        return
    for iv in interventions:
        for ts in batch_dependent(iv):
            raise InputError(f"{fn}: {iv!r} uses {ts!r}, whose ints count the visual tokens of a whole batch; the "
                             f"loop puts {batch_size} records in a batch, so which record's tokens they pick would "
                             f"depend on batch_size. Use Positions.each_image([...]) (these tokens of every "
                             f"record's image), or batch_size=1")


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
