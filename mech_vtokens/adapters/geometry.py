"""Patch geometry: where each visual token of a processed batch comes from (one place for every family's layout).

A family's adapter names its ``Geometry`` subclass (``Adapter.geometry``); ``vlm.prepare`` calls it once per batch
and ships the table as ``batch.tokens``. The anyres geometry of LLaVA-NeXT / OneVision is in ``anyres.py``, beside
this module. See docs/DESIGN.md ("Geometry").
"""

from __future__ import annotations

import math

import torch

# Token kinds: what a visual token IS (``batch.tokens["kind"]`` holds indices into this tuple; ``batch.kinds`` the
# names). "patch": an image region at the model's working resolution; "thumbnail": a region of a low-resolution view
# of the WHOLE image (InternVL's thumbnail tile, LLaVA-NeXT's base image); "newline": a learned row separator inside
# the image-token mask (no region, no vision row, no projector row); "cls": a vision CLS token fed to the LM.
KINDS = ("patch", "thumbnail", "newline", "cls")


class Geometry:
    """Maps every visual token of a processed batch to its image, tile, grid cell and box in the ORIGINAL image,
    and to the rows of the vision-encoder and projector outputs it is computed from.

    ``tokens(enc, image_sizes)`` returns a dict of tensors, one entry per visual token in the order of
    ``visual_mask.nonzero()`` (batch row, then position):

    - ``image`` index of the image in the batch (in processor order); ``tile`` (-1 = no tiling; InternVL tiles
      count from 0, the thumbnail is the last tile); ``row`` / ``col`` in that image's (or tile's) token grid;
    - ``kind``: index into :data:`KINDS` (patch, thumbnail, newline, cls);
    - ``box`` (x0, y0, x1, y1) in original-image pixels, NaN for a token without a region (a newline);
    - ``vision_rows`` (n, m): the flat rows of a vision-block output (flattened to (-1, d)) the token is computed
      from, padded with -1; ``vision_weights`` (n, m) float32: their weights (summing to 1 per token; 0 on padding;
      a token without a vision row has none > 0). Merges give m equal weights; interpolation unequal ones;
    - ``projector_rows`` (n,): the flat projector-output row of the token (-1: none; a mixed token: its heaviest);
      ``projector_mix`` / ``projector_mix_weights`` (n, m'): every projector row it mixes and the weights, so
      ``sum_j w_j * projector[rows_j]`` IS the token's LM input (:func:`mix_rows`).

    ``grids(enc, image_sizes)`` gives per image the token-grid shape: a list of dicts (rows, cols, tiles).
    """

    # The processor resizes any image into a pixel range (``size`` = {shortest_edge, longest_edge} in pixels, an
    # AREA) and the grid follows the image (Qwen-style packed ViTs): a vision config's ``image_size`` (GLM-4V: the
    # position-embedding table it interpolates) is then no input size. False: a fixed input size / tile.
    variable_resolution: bool = False

    def __init__(self, adapter, hf_model, processor):
        self.adapter = adapter
        self.model = hf_model
        self.processor = processor
        self.ip = processor.image_processor

    def tokens(self, enc: dict, image_sizes: list[tuple[int, int]], call_kwargs: dict | None = None) -> dict:
        raise NotImplementedError

    def applied(self, name: str, call_kwargs: dict | None = None):
        """The image setting ``name`` the processor APPLIES in a call with ``call_kwargs``: the call's value, else
        the processor class's call-time default (e.g. InternVLProcessor turns ``crop_to_patches`` on although the
        hub saves it off), else the image processor's saved attribute. Resolved by the processor's own merge."""
        merged = self.processor._merge_kwargs(tokenizer_init_kwargs=self.processor.tokenizer.init_kwargs,
                                              **(call_kwargs or {}))["images_kwargs"]
        return merged[name] if name in merged else getattr(self.ip, name, None)

    def native_size(self):
        """(w, h) of an image this processor takes unresized and uncropped, for benchmarks that draw on a canvas
        (``single_patch``); None: derived from the vision config there."""
        return None

    def empty(self) -> dict:
        """The token table of a batch without images (no visual token)."""
        return self._pack([])

    @staticmethod
    def _pack(items: list[tuple]) -> dict:
        """items: (image, tile, row, col, (x0, y0, x1, y1), vision_rows list, projector_row[, kind[, vision_weights
        list[, projector_mix list of (row, weight)]]]): kind defaults to "patch", vision weights to equal ones, the
        projector mix to the one projector row."""
        if not items:
            return {"image": torch.zeros(0, dtype=torch.long), "kind": torch.zeros(0, dtype=torch.long)}
        full = [_complete(t) for t in items]
        return {
            "image": torch.tensor([t[0] for t in full]),
            "tile": torch.tensor([t[1] for t in full]),
            "row": torch.tensor([t[2] for t in full]),
            "col": torch.tensor([t[3] for t in full]),
            "kind": torch.tensor([KINDS.index(t[7]) for t in full]),
            "box": torch.tensor([t[4] for t in full], dtype=torch.float64),
            "vision_rows": _padded([t[5] for t in full], -1, torch.long),
            "vision_weights": _padded([t[8] for t in full], 0.0, torch.float32),
            "projector_rows": torch.tensor([t[6] for t in full]),
            "projector_mix": _padded([[r for r, _ in t[9]] for t in full], -1, torch.long),
            "projector_mix_weights": _padded([[w for _, w in t[9]] for t in full], 0.0, torch.float32),
        }


NO_BOX = (math.nan, math.nan, math.nan, math.nan)


def _complete(t: tuple) -> tuple:
    kind = t[7] if len(t) > 7 else "patch"
    vrows = list(t[5])
    vw = list(t[8]) if len(t) > 8 else [1.0 / len(vrows)] * len(vrows)
    mix = list(t[9]) if len(t) > 9 else ([(t[6], 1.0)] if t[6] >= 0 else [])
    return (*t[:7], kind, vw, mix)


def _padded(rows: list[list], fill, dtype) -> torch.Tensor:
    m = max(1, max(len(r) for r in rows))
    return torch.tensor([list(r) + [fill] * (m - len(r)) for r in rows], dtype=dtype)


# ---- used INSIDE the trace (torch only) ------------------------------------------------------------------------

def mix_rows(flat: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor):
    """``(h, present)``: per token the weighted sum of the rows ``rows`` (n, m) of ``flat`` (N, d) with
    ``weights`` (n, m) (padding: row -1, weight 0), computed in fp32 and returned in ``flat``'s dtype; ``present``
    (n,) bool: the token has a row at all. A token of ONE row with weight 1 gets that row bit for bit."""
    rows = rows.to(flat.device)
    w = weights.to(flat.device)
    if rows.shape[1] == 1 and bool((w == 1).all()):
        return flat[rows[:, 0]], torch.ones(rows.shape[0], dtype=torch.bool, device=flat.device)
    h = (flat[rows.clamp(min=0)].float() * w[..., None]).sum(1).to(flat.dtype)
    return h, (w > 0).any(-1)


def row_max(values: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(n,) per token the max of ``values`` (N,) over its rows (those with weight > 0); NaN for a token without
    one (a newline token has no vision row)."""
    rows, weights = rows.to(values.device), weights.to(values.device)
    per = values[rows.clamp(min=0)]
    used = weights > 0
    if bool(used.all()):
        return per.amax(-1)
    out = per.masked_fill(~used, float("-inf")).amax(-1)
    return out.masked_fill(~used.any(-1), float("nan"))


def row_mean(values: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(n,) per token the weighted mean of ``values`` (N,) over its rows; NaN for a token without one. Equal
    weights over m real rows give ``values[rows].mean(-1)`` (the same op, so the same bits)."""
    rows, weights = rows.to(values.device), weights.to(values.device)
    per = values[rows.clamp(min=0)]
    if bool((weights > 0).all()) and bool((weights == weights[:, :1]).all()):
        return per.mean(-1)
    w = weights.to(per.dtype)
    total = w.sum(-1)
    return (per * w).sum(-1) / total.masked_fill(total == 0, float("nan"))


def row_owner(n_rows: int, rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(n_rows,) the visual token each row belongs to (the last one listing it with weight > 0), -1 for rows no
    token uses (CLS, padding tiles)."""
    owner = torch.full((n_rows,), -1, dtype=torch.long)
    for j in range(rows.shape[1]):
        used = weights[:, j] > 0
        owner[rows[used, j]] = torch.arange(rows.shape[0])[used]
    return owner


class CLIPGridGeometry(Geometry):
    """A square ViT grid after resize (+ centre crop or square pad), CLS first (LLaVA-1.5).

    Vision-block output: (images, 1 + P, d); with ``vision_feature_select_strategy == "default"`` the CLS row is
    dropped and token j is patch j in raster order; projector output: (images, P, d).
    """

    def _to_original(self, w: int, h: int):
        """(sx, sy, ox, oy): model-input pixel u maps to original pixel (u - ox) / sx (same for y), with the integer
        sizes the processor computes (resize the shortest edge with ``get_resize_output_image_size``, then centre
        crop at ``(resized - crop) // 2``)."""
        import numpy as np
        from transformers.image_transforms import get_resize_output_image_size

        ip, side = self.ip, self.adapter.config.vision_config.image_size
        if getattr(ip, "do_pad", False):  # pad to a square (centred), then resize to side x side
            s = max(w, h)
            scale = side / s
            return scale, scale, (s - w) / 2 * scale, (s - h) / 2 * scale
        size = dict(ip.size) if ip.size else {}
        short = size.get("shortest_edge")
        if short:
            rh, rw = get_resize_output_image_size(np.empty((1, h, w), np.uint8), size=short, default_to_square=False,
                                                  input_data_format="channels_first")
        else:
            rh, rw = size.get("height", side), size.get("width", side)
        sx, sy = rw / w, rh / h
        if getattr(ip, "do_center_crop", False):
            crop = dict(ip.crop_size)
            return sx, sy, -float((rw - crop["width"]) // 2), -float((rh - crop["height"]) // 2)
        return sx, sy, 0.0, 0.0

    def tokens(self, enc, image_sizes, call_kwargs=None):
        cfg = self.adapter.config
        p = cfg.vision_config.patch_size
        n = cfg.vision_config.image_size // p
        full = getattr(cfg, "vision_feature_select_strategy", "default") == "full"
        items = []
        for i, (w, h) in enumerate(image_sizes):
            sx, sy, ox, oy = self._to_original(w, h)
            if full:
                items.append((i, -1, -1, -1, (0.0, 0.0, float(w), float(h)), [i * (n * n + 1)], i * (n * n + 1),
                              "cls"))
            for j in range(n * n):
                r, c = divmod(j, n)
                box = ((c * p - ox) / sx, (r * p - oy) / sy, ((c + 1) * p - ox) / sx, ((r + 1) * p - oy) / sy)
                box = (max(0.0, box[0]), max(0.0, box[1]), min(float(w), box[2]), min(float(h), box[3]))
                prow = i * (n * n + full) + j + full
                items.append((i, -1, r, c, box, [i * (n * n + 1) + 1 + j], prow))
        return self._pack(items)

    def grids(self, enc, image_sizes, call_kwargs=None):
        n = self.adapter.config.vision_config.image_size // self.adapter.config.vision_config.patch_size
        return [{"rows": n, "cols": n, "tiles": 1} for _ in image_sizes]


class QwenMergedGeometry(Geometry):
    """Qwen2-VL / Qwen2.5-VL: a variable grid (``image_grid_thw``) of patches, 2x2 merged into one token.

    All images of a batch are packed into one vision sequence; each token's ``merge**2`` patches are consecutive
    (merge-block order). Qwen2.5-VL's vision blocks and merger work in WINDOW order: ``window_order`` returns the
    permutation (for Qwen2-VL the identity), so a token's vision/projector rows are looked up through it.
    """

    variable_resolution = True

    def window_order(self, grid_thw: torch.Tensor) -> torch.Tensor:
        """For each merged unit in processing order, the token (raster) index it holds."""
        n = int((grid_thw.prod(-1) // self.merge ** 2).sum())
        return torch.arange(n)

    @property
    def merge(self) -> int:
        return self.adapter.config.vision_config.spatial_merge_size

    def tokens(self, enc, image_sizes, call_kwargs=None):
        grid = enc["image_grid_thw"]
        p = self.adapter.config.vision_config.patch_size
        m = self.merge
        order = self.window_order(grid)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(len(order))
        items, start = [], 0
        for i, ((t, gh, gw), (w, h)) in enumerate(zip(grid.tolist(), image_sizes)):
            rows, cols = gh // m, gw // m
            sx, sy = w / (gw * p), h / (gh * p)
            for j in range(t * rows * cols):
                r, c = divmod(j % (rows * cols), cols)
                k = int(inverse[start + j])
                box = (c * m * p * sx, r * m * p * sy, (c + 1) * m * p * sx, (r + 1) * m * p * sy)
                items.append((i, -1, r, c, box, list(range(k * m * m, (k + 1) * m * m)), k))
            start += t * rows * cols
        return self._pack(items)

    def grids(self, enc, image_sizes, call_kwargs=None):
        m = self.merge
        return [{"rows": gh // m, "cols": gw // m, "tiles": 1} for _, gh, gw in enc["image_grid_thw"].tolist()]


class TiledGeometry(Geometry):
    """InternVL: the image is resized onto a canvas of ``cols x rows`` square tiles (closest aspect ratio, within
    ``min_patches..max_patches``), plus a thumbnail of the whole image when there is more than one tile. Each tile is
    a ViT grid of g x g patches (CLS first, dropped), pixel-shuffled to (g/2) x (g/2) tokens in raster order.
    """

    def _canvas(self, w: int, h: int, call_kwargs=None) -> tuple[int, int]:
        """(cols, rows) of tiles, with the settings the processor applies in this call (see ``applied``)."""
        if not self.applied("crop_to_patches", call_kwargs):
            return 1, 1
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

        size = dict(self.applied("size", call_kwargs))
        return get_optimal_tiled_canvas((h, w), (size["height"], size["width"]),
                                        self.applied("min_patches", call_kwargs),
                                        self.applied("max_patches", call_kwargs))

    def tokens(self, enc, image_sizes, call_kwargs=None):
        vc = self.adapter.config.vision_config
        side, p = vc.image_size[0], vc.patch_size[0]
        g = side // p
        k = int(round(1 / self.adapter.config.downsample_ratio))
        gt = g // k
        items, tile0 = [], 0
        for i, (w, h) in enumerate(image_sizes):
            cols, rows = self._canvas(w, h, call_kwargs)
            tiles = cols * rows + (1 if cols * rows > 1 else 0)
            for t in range(tiles):
                if t < cols * rows:
                    tr, tc = divmod(t, cols)
                    x0, y0, tw, th = tc * w / cols, tr * h / rows, w / cols, h / rows
                else:  # thumbnail
                    x0, y0, tw, th = 0.0, 0.0, float(w), float(h)
                for j in range(gt * gt):
                    r, c = divmod(j, gt)
                    box = (x0 + c * tw / gt, y0 + r * th / gt, x0 + (c + 1) * tw / gt, y0 + (r + 1) * th / gt)
                    vrows = [(tile0 + t) * (g * g + 1) + 1 + (r * k + a) * g + (c * k + b)
                             for a in range(k) for b in range(k)]
                    kind = "patch" if t < cols * rows else "thumbnail"
                    items.append((i, t, r, c, box, vrows, (tile0 + t) * gt * gt + j, kind))
            tile0 += tiles
        return self._pack(items)

    def grids(self, enc, image_sizes, call_kwargs=None):
        vc = self.adapter.config.vision_config
        gt = vc.image_size[0] // vc.patch_size[0] // int(round(1 / self.adapter.config.downsample_ratio))
        out = []
        for w, h in image_sizes:
            cols, rows = self._canvas(w, h, call_kwargs)
            out.append({"rows": gt, "cols": gt, "tiles": cols * rows + (1 if cols * rows > 1 else 0),
                        "tile_rows": rows, "tile_cols": cols})
        return out


class PooledGridGeometry(Geometry):
    """A square ViT grid (no CLS) resized to ``image_size`` x ``image_size`` WITHOUT keeping the aspect ratio, then
    average-pooled ``k x k`` into ``mm_tokens_per_image`` tokens in raster order (Gemma 3: 64 x 64 patches -> 16 x
    16 tokens). A token's vision rows are the ``k * k`` patches of its pool, equal weights (the pool's mean); its box
    is its cell of the original image (the resize stretches each axis on its own). Pan-and-scan crops
    (``do_pan_and_scan``) are refused."""

    def _sizes(self):
        cfg = self.adapter.config
        g = cfg.vision_config.image_size // cfg.vision_config.patch_size  # patches per side
        t = int(round(cfg.mm_tokens_per_image ** 0.5))  # tokens per side
        return g, t, g // t

    def _check(self, call_kwargs):
        if self.applied("do_pan_and_scan", call_kwargs):
            from ..errors import InputError

            raise InputError("do_pan_and_scan=True adds crops of each image whose layout this geometry does not map "
                             "(boxes, vision rows); process with do_pan_and_scan=False (the default)")

    def tokens(self, enc, image_sizes, call_kwargs=None):
        self._check(call_kwargs)
        g, t, k = self._sizes()
        items = []
        for i, (w, h) in enumerate(image_sizes):
            for j in range(t * t):
                r, c = divmod(j, t)
                box = (c * w / t, r * h / t, (c + 1) * w / t, (r + 1) * h / t)
                vrows = [i * g * g + (r * k + a) * g + (c * k + b) for a in range(k) for b in range(k)]
                items.append((i, -1, r, c, box, vrows, i * t * t + j))
        return self._pack(items)

    def grids(self, enc, image_sizes, call_kwargs=None):
        self._check(call_kwargs)
        _, t, _ = self._sizes()
        return [{"rows": t, "cols": t, "tiles": 1} for _ in image_sizes]
