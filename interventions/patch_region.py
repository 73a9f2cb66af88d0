"""Region: the visual tokens whose patch overlaps a box of the ORIGINAL image (through the adapter's geometry,
``batch.tokens["box"]``), the token set activation patching uses for "patch the object's region" (issue 17).

``Region((x0, y0, x1, y1))`` selects, in every image of the batch (or only ``images=[...]``), the tokens whose box
intersects the given box by more than ``min_overlap`` of the TOKEN's area (default 0: any overlap). Tokens without a
region (newline tokens: NaN box) are never selected. The same box therefore means the same pixels on LLaVA's square
grid, Qwen's merged cells, InternVL's tiles and thumbnail, and LLaVA-NeXT's base image + canvas.
"""

from __future__ import annotations

import math

import torch

from mech_vtokens.errors import InputError
from mech_vtokens.token_sets import TokenSet


class Region(TokenSet):
    """The visual tokens whose patch overlaps ``box`` = (x0, y0, x1, y1) in original-image pixels."""

    def __init__(self, box, images=None, min_overlap: float = 0.0):
        try:
            box = tuple(float(v) for v in box)
        except (TypeError, ValueError):
            raise InputError(f"Region: box={box!r}: give (x0, y0, x1, y1) in pixels of the original image") from None
        if len(box) != 4 or not all(math.isfinite(v) for v in box) or box[2] <= box[0] or box[3] <= box[1]:
            raise InputError(f"Region: box={box!r}: give (x0, y0, x1, y1) with x1 > x0 and y1 > y0, finite pixels")
        if not 0.0 <= float(min_overlap) < 1.0:
            raise InputError(f"Region: min_overlap={min_overlap!r}: a fraction of a token's area in [0, 1)")
        self.box = box
        self.images = None if images is None else [int(i) for i in images]
        self.min_overlap = float(min_overlap)

    def visual(self, batch):
        b = batch.tokens["box"].double()
        x0, y0, x1, y1 = self.box
        w = (torch.minimum(b[:, 2], torch.tensor(x1)) - torch.maximum(b[:, 0], torch.tensor(x0))).clamp(min=0)
        h = (torch.minimum(b[:, 3], torch.tensor(y1)) - torch.maximum(b[:, 1], torch.tensor(y0))).clamp(min=0)
        area = ((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])).clamp(min=1e-12)
        frac = (w * h) / area
        sel = (frac > self.min_overlap) & (w * h > 0) & ~torch.isnan(b).any(1)
        if self.images is not None:
            n_img = int(batch.tokens["image"].max()) + 1 if batch.n_visual else 0
            bad = [i for i in self.images if not 0 <= i < n_img]
            if bad:
                raise InputError(f"Region: image {bad[0]} is not in this batch (images 0..{n_img - 1})")
            sel &= torch.isin(batch.tokens["image"], torch.tensor(self.images))
        return sel
