"""Activation-patching sweeps over visual tokens (issue 17): many patched variants of a target image in ONE batch.

:func:`patch_sweep` takes (source image, target image, prompt) pairs and a list of variants (site x token set: layers
x regions, layers x tokens) and runs, per pair, the rows ``[source, target, target patched by variant 0, ...]`` --
as many pairs per forward as ``batch_size`` rows allow -- through the ONE batch loop (``loop.batches`` /
``loop.forward``). Every variant is a :class:`~mech_vtokens.interventions.PatchActivations` acting on its own row;
the metric is :class:`~mech_vtokens.probes.LogitDiff` (source answer minus target answer) read in the same forward,
and the greedy next token (``Intervention.report``). The result is a pandas long table with the normalised logit
difference recovered, ``(LD_patched - LD_target) / (LD_source - LD_target)`` (1: the patch carries the whole
difference, 0: none), and heat maps over layers (matplotlib) and over the image (``views.overlay.PatchOverlay``).

:func:`organism_colour_pairs` builds the issue's test on the shipped organism: the same seeded scene drawn twice,
the questioned object RED in one and BLUE in the other, with the object's box and a background box of the same
size (the object's box shifted by whole patches onto empty background, so it covers as many tokens).
"""

from __future__ import annotations

import random

from .errors import InputError
from .loop import batches, forward


class Variant:
    """One patched row: ``site`` (a site name), ``tokens`` (a token set, e.g. ``Region(box)``, or an int j: the j-th
    visual token of the image, for layers x tokens sweeps), a ``label`` for the table (the region's or token's
    name)."""

    def __init__(self, site: str, tokens, label: str):
        self.site, self.tokens, self.label = site, tokens, str(label)

    def __repr__(self) -> str:
        return f"Variant({self.site!r}, {self.label!r})"


class PatchPair:
    """A source and a target image with one question, the two answers, and named regions (boxes in pixels)."""

    def __init__(self, source, target, question, source_answer, target_answer, regions):
        self.source, self.target, self.question = source, target, question  # the prompt: vlm.prompt(question)
        self.source_answer, self.target_answer = source_answer, target_answer
        self.regions = dict(regions)


def grid_variants(sites, regions) -> list[Variant]:
    """Every (site, region) combination, sites outermost: ``regions`` maps a label to a token set."""
    return [Variant(s, ts, label) for s in sites for label, ts in regions.items()]


def patch_sweep(vlm, pairs, variants, *, batch_size: int = 64, remote=False, progress: bool = False):
    """Patch every variant of every pair (see the module doc); returns a :class:`SweepResult`.

    ``variants``: a list of :class:`Variant` (or a callable ``pair -> list[Variant]``, e.g. regions that depend on the
    pair's object). ``batch_size``: rows per forward (at least one pair's rows: 2 + the number of variants)."""
    from .interventions import PatchActivations
    from .probes import LogitDiff

    pairs = list(pairs)
    if not pairs:
        raise InputError("patch_sweep: give at least one PatchPair")
    per_pair = [list(variants(p)) if callable(variants) else list(variants) for p in pairs]
    n_var = len(per_pair[0])
    if n_var == 0 or any(len(v) != n_var for v in per_pair):
        raise InputError("patch_sweep: every pair needs the same, non-zero number of variants")
    rows = 2 + n_var
    if batch_size < rows:
        raise InputError(f"patch_sweep: batch_size={batch_size} is less than one pair's {rows} rows (source, "
                         f"target, {n_var} variants); give batch_size >= {rows}")
    k = max(1, batch_size // rows)  # pairs per forward
    images, prompts = [], []
    for p in pairs:
        images += [p.source] + [p.target] * (1 + n_var)
        prompts += [vlm.prompt(p.question)] * rows
    records = []
    for start, batch in batches(vlm, images, prompts, batch_size=k * rows, progress=progress, desc="patch sweep"):
        first = start // rows
        ivs, src_ans, tgt_ans = [], [], []
        for j, p in enumerate(pairs[first:first + k]):
            base = j * rows
            for v, var in enumerate(per_pair[first + j]):
                ivs.append(PatchActivations(var.site, _only_image(var.tokens, base + 2 + v), {base + 2 + v: base}))
            src_ans += [p.source_answer] * rows
            tgt_ans += [p.target_answer] * rows
        ivs[0].report()  # the logits of every row (greedy next token), read once
        res = forward(vlm, batch, probes=[LogitDiff(src_ans, tgt_ans)], interventions=ivs, remote=remote)
        ld = res["logit_diff"].values
        top = res[ivs[0]].logits.argmax(-1)
        ids_a, ids_b = res["logit_diff"].columns["a"], res["logit_diff"].columns["b"]
        for j in range(len(pairs[first:first + k])):
            base = j * rows
            ld_s, ld_t = float(ld[base]), float(ld[base + 1])
            for v, var in enumerate(per_pair[first + j]):
                r = base + 2 + v
                records.append({
                    "pair": first + j, "site": var.site, "layer": vlm.adapter.parse_site(var.site).layer,
                    "region": var.label, "ld_source": ld_s, "ld_target": ld_t, "ld_patched": float(ld[r]),
                    "recovered": (float(ld[r]) - ld_t) / (ld_s - ld_t) if ld_s != ld_t else float("nan"),
                    "source_right": int(top[base]) == ids_a[base], "target_right": int(top[base + 1]) == ids_b[base],
                    "flipped": int(top[r]) == ids_a[r]})
    return SweepResult(records, vlm.adapter.forward_order)


def _only_image(tokens, image: int):
    """The token set restricted to one image of the batch (the patched row's); an int j: that image's j-th token."""
    import torch

    from .token_sets import TokenSet, as_token_set

    if isinstance(tokens, int) and not isinstance(tokens, bool):
        j = tokens

        class _Nth(TokenSet):
            def visual(self, batch):
                mine = (batch.tokens["image"] == image).nonzero().flatten()
                if not 0 <= j < len(mine):
                    raise InputError(f"patch_sweep: token {j} of image {image}: the image has {len(mine)} tokens")
                sel = torch.zeros(batch.n_visual, dtype=torch.bool)
                sel[mine[j]] = True
                return sel

            def __repr__(self):
                return f"token {j} of image {image}"

        return _Nth()
    ts = as_token_set(tokens)

    class _OneImage(TokenSet):
        def visual(self, batch):
            return ts.visual(batch) & (batch.tokens["image"] == image)

        def __repr__(self):
            return f"{ts!r} in image {image}"

    return _OneImage()


class SweepResult:
    """What :func:`patch_sweep` returns: ``to_pandas()`` one row per (pair, variant) with ``ld_source``,
    ``ld_target``, ``ld_patched``, ``recovered``, ``source_right`` / ``target_right`` (the clean greedy answers are
    the pair's answers), ``flipped`` (the patched row's greedy next token is the source answer); ``summary()`` per
    (site, region): means over all pairs and over the pairs whose two clean answers are right; ``plot()`` a heat map
    of the mean ``recovered`` over sites (forward order) x regions."""

    def __init__(self, records, order):
        import pandas as pd

        from .site_names import site_column

        self.frame = pd.DataFrame(records)
        self.frame["site"] = site_column(self.frame["site"].astype(str), order)

    def to_pandas(self):
        return self.frame.copy()

    def summary(self):
        df = self.frame.assign(both_right=self.frame["source_right"] & self.frame["target_right"])
        g = df.groupby(["site", "region"], observed=True)
        out = g.agg(pairs=("pair", "nunique"), recovered=("recovered", "mean"), flipped=("flipped", "mean"))
        right = df[df["both_right"]].groupby(["site", "region"], observed=True)
        out["pairs_right"] = right["pair"].nunique()
        out["recovered_right"] = right["recovered"].mean()
        out["flipped_right"] = right["flipped"].mean()
        return out.reset_index()

    def plot(self, value: str = "recovered", ax=None):
        """Heat map of the mean ``value`` per site (rows, forward order) x region (columns); a matplotlib Figure."""
        from .views.figure import figure_of, subplots

        tab = self.frame.pivot_table(index="site", columns="region", values=value, aggfunc="mean", observed=True)
        if ax is None:
            _, ax = subplots(figsize=(1.6 + 1.2 * tab.shape[1], 0.9 + 0.35 * tab.shape[0]))
        im = ax.imshow(tab.to_numpy(dtype=float), aspect="auto", cmap="viridis")
        ax.set_xticks(range(tab.shape[1]), [str(c) for c in tab.columns], rotation=30, ha="right")
        ax.set_yticks(range(tab.shape[0]), [str(i) for i in tab.index])
        for (i, j), v in __import__("numpy").ndenumerate(tab.to_numpy(dtype=float)):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="w" if v < 0.5 else "k", fontsize=7)
        ax.figure.colorbar(im, ax=ax, label=f"mean {value}")
        ax.set_title(f"activation patching: {value}")
        return figure_of(ax)


# ---- the organism's red -> blue test ------------------------------------------------------------------------------

def organism_colour_pairs(n: int, seed: int = 0, source: str = "red", target: str = "blue"):
    """``n`` seeded :class:`PatchPair` of the organism's world: a scene whose colour question names a unique shape,
    drawn with that object ``source``-coloured (source image) and ``target``-coloured (target image); regions
    ``"object"`` (the object's box) and ``"background"`` (the same box shifted by whole 16-px patches onto empty
    background: as many tokens, no object pixel)."""
    from PIL import Image, ImageDraw

    from .organism import world

    out, i = [], 0
    while len(out) < n:
        rng = random.Random(f"patch:{seed}:{i}")
        i += 1
        s = world._scene(rng)
        q = [qa for qa in s.qa if qa[0] == "colour"]
        if not q:
            continue
        shape = q[0][1].split()[-2]
        obj = next(o for o in s.objects if o.shape == shape)
        others = [o for o in s.objects if o is not obj]
        if s.background in (source, target) or any(o.colour in (source, target) for o in others):
            continue
        box = (obj.cx - obj.r * 1.1, obj.cy - obj.r * 1.1, obj.cx + obj.r * 1.1, obj.cy + obj.r * 1.1)
        bg_box = _empty_shift(box, s.objects, world.IMAGE_SIZE, world.PATCH, rng)
        if bg_box is None:
            continue
        ims = []
        for colour in (source, target):
            im = Image.new("RGB", (world.IMAGE_SIZE, world.IMAGE_SIZE), world.BACKGROUNDS[s.background])
            d = ImageDraw.Draw(im)
            for o in s.objects:
                world._draw_obj(d, o, world.COLOURS[colour if o is obj else o.colour])
            ims.append(im)
        out.append(PatchPair(ims[0], ims[1], q[0][1], source, target,
                             {"object": box, "background": bg_box}))
    return out


def _empty_shift(box, objects, size, patch, rng):
    """``box`` moved by whole patches to where the patches it touches touch no object's box (None if nowhere)."""
    import math

    def cover(b):  # the patches a box touches, as a box on the patch grid
        return (math.floor(b[0] / patch), math.floor(b[1] / patch), math.ceil(b[2] / patch), math.ceil(b[3] / patch))

    def apart(a, b):
        return a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]

    taken = [cover((o.cx - o.r * 1.1, o.cy - o.r * 1.1, o.cx + o.r * 1.1, o.cy + o.r * 1.1)) for o in objects]
    x0, y0, x1, y1 = box
    shifts = [(dx * patch, dy * patch) for dx in range(-6, 7) for dy in range(-6, 7) if dx or dy]
    rng.shuffle(shifts)
    for dx, dy in shifts:
        b = (x0 + dx, y0 + dy, x1 + dx, y1 + dy)
        if b[0] >= 0 and b[1] >= 0 and b[2] <= size and b[3] <= size and all(apart(cover(b), t) for t in taken):
            return b
    return None
