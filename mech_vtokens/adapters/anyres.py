"""The anyres geometry of LLaVA-NeXT and LLaVA-OneVision (one geometry, two families; beside ``geometry.py``).

What the processor and ``pack_image_features`` do to one image (transformers 5.24, both families):

1. the BASE image: the whole image stretched to one ViT tile (``image_size`` square);
2. the high-res CANVAS: the grid pinpoint closest to the image (``select_best_resolution``), the image resized into
   it keeping its aspect ratio and centred (zero padding), cut into ``rows x cols`` tiles of ``image_size``;
3. every tile (base first) runs through the ViT (CLS dropped by strategy "default"); the projector maps each row;
4. the tiles' token grids are stitched into ONE canvas grid, the padding rows / columns are cropped (``unpad_image``)
   and, for OneVision above ``anyres_max_N`` (ratio = sqrt(tokens / N tiles' worth) > 1.1), the canvas is resized
   BILINEARLY to floor(side / ratio) per side (``interpolate_key``): such a token mixes up to 4 projector rows,
   from up to 4 tiles;
5. the LM receives: the base tokens, then the canvas ROW BY ROW (not tile by tile), each row followed by the learned
   ``image_newline`` vector (a token of kind "newline", with no region, no vision row and no projector row).

OneVision does not tile images of multi-image prompts (``tiles_multi_image = False``): such an image is its base
tokens plus one newline.

Token table (see ``Geometry``): base tokens ``tile`` 0, kind "thumbnail" (kind "patch" when the image has no canvas),
``row`` / ``col`` in the base grid; canvas tokens ``tile`` = 1 + the tile their centre lies in (row-major over the
canvas tiles), ``row`` / ``col`` in the cropped (and resized) canvas grid, weighted vision / projector rows; newline
tokens ``tile`` -1, ``row`` = the canvas row they end (-1 after a base-only image), ``col`` = the column count, no box.
"""

from __future__ import annotations

import math

import torch

from .geometry import NO_BOX, Geometry


def _linear_weights(n_in: int, n_out: int) -> torch.Tensor:
    """(n_in, n_out): weight of input i in output j of a 1-D linear resize, exactly as torch computes it (the
    bilinear resize of the canvas is this along each axis)."""
    eye = torch.eye(n_in, dtype=torch.float64)[None]
    return torch.nn.functional.interpolate(eye, size=n_out, mode="linear", align_corners=False)[0]


def _sources(weights: torch.Tensor) -> list[list[tuple[int, float]]]:
    """Per output index j: [(input index, weight > 0), ...] of an (n_in, n_out) weight matrix."""
    nz = weights.T.nonzero().tolist()
    out = [[] for _ in range(weights.shape[1])]
    vals = weights.T[weights.T > 0].tolist()
    for (j, i), v in zip(nz, vals):
        out[j].append((i, v))
    return out


class AnyresGeometry(Geometry):
    """LLaVA-NeXT anyres: base image + unpadded high-res canvas row by row + a newline token per row."""

    # The config key of OneVision's "anyres_max_N" (the canvas is resized above N tiles' worth); None: never.
    interpolate_key: str | None = None
    # Whether images of a multi-image prompt are tiled (LLaVA-NeXT: yes; OneVision: base image only).
    tiles_multi_image: bool = True
    # The vision embeddings module (its ``num_positions - num_patches`` = CLS rows per tile in the ViT output).
    vision_embeddings: str = "model.vision_tower.embeddings"

    # ---- the facts, per batch -------------------------------------------------------------------------------
    def _side(self) -> tuple[int, int]:
        """(tile side in pixels, tokens per tile side)."""
        vc = self.adapter.config.vision_config
        return vc.image_size, vc.image_size // vc.patch_size

    def _cls(self) -> int:
        from .base import _resolve

        emb = _resolve(self.model, self.vision_embeddings)
        return int(emb.num_positions - emb.num_patches)

    def _tiled(self, enc) -> list[bool]:
        """Per image: does it get a high-res canvas."""
        n = len(enc["image_sizes"])
        if self.tiles_multi_image or "batch_num_images" not in enc:
            return [True] * n
        return [int(k) == 1 for k in enc["batch_num_images"] for _ in range(int(k))]

    def _canvas(self, hw: tuple[int, int]) -> dict:
        """The canvas of an image of (height, width) ``hw``: tile grid, crop and resize, in token units."""
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

        side, g = self._side()
        n_rows, n_cols = get_anyres_image_grid_shape(list(hw), self.adapter.config.image_grid_pinpoints, side)
        R, C = n_rows * g, n_cols * g
        idx = torch.arange(R * C).view(1, R, C)
        kept = unpad_image(idx, list(hw))[0]  # the model's own crop, applied to token indices
        r0, c0 = int(kept[0, 0]) // C, int(kept[0, 0]) % C
        h, w = kept.shape
        out_h, out_w = h, w
        if self.interpolate_key is not None:
            max_tiles = int(str(getattr(self.adapter.config, self.interpolate_key)).strip("anyres_max_"))
            ratio = math.sqrt(h * w / (max_tiles * g ** 2))
            if ratio > 1.1:
                out_h, out_w = int(h // ratio), int(w // ratio)
        return {"tiles": (n_rows, n_cols), "R": R, "C": C, "r0": r0, "c0": c0, "h": h, "w": w,
                "out_h": out_h, "out_w": out_w}

    def _to_original(self, hw, cv) -> tuple[float, float, float, float]:
        """(sx, sy, ox, oy): canvas pixel u maps to original pixel (u - ox) / sx (same for y): the processor's
        aspect-preserving resize (``get_patch_output_size``) and centred paste (``_get_padding_size``)."""
        side, _ = self._side()
        H, W = cv["tiles"][0] * side, cv["tiles"][1] * side
        h, w = hw
        if W / w < H / h:
            nw, nh = W, min(math.ceil(h * W / w), H)
        else:
            nh, nw = H, min(math.ceil(w * H / h), W)
        return nw / w, nh / h, float((W - nw) // 2), float((H - nh) // 2)

    def _check_settings(self, call_kwargs) -> None:
        """The processor tiles and counts tokens with ITS settings, the model unpads / resizes with its config's:
        a mismatch would fail (or silently differ) only inside the forward."""
        from ..errors import InputError

        cfg = self.adapter.config
        pins = self.applied("image_grid_pinpoints", call_kwargs)
        if [list(p) for p in pins or []] != [list(p) for p in cfg.image_grid_pinpoints]:
            raise InputError(f"the processor tiles with image_grid_pinpoints={pins} but the model unpads with "
                             f"config.image_grid_pinpoints={cfg.image_grid_pinpoints}; set the same list on "
                             f"vlm.processor.image_processor and vlm.hf.config")
        key = self.interpolate_key
        if key is not None and getattr(self.processor, key, None) != getattr(cfg, key):
            raise InputError(f"the processor counts tokens with {key}={getattr(self.processor, key, None)!r} but "
                             f"the model resizes with config.{key}={getattr(cfg, key)!r}; set the same value on "
                             f"vlm.processor and vlm.hf.config")

    # ---- the token table ------------------------------------------------------------------------------------
    def tokens(self, enc, image_sizes, call_kwargs=None):
        self._check_settings(call_kwargs)
        side, g = self._side()
        cls = self._cls()
        items, tile0 = [], 0
        for i, (hw, tiled) in enumerate(zip(enc["image_sizes"].tolist(), self._tiled(enc))):
            hw = (int(hw[0]), int(hw[1]))
            h, w = hw
            base_kind = "thumbnail" if tiled else "patch"
            for j in range(g * g):
                r, c = divmod(j, g)
                box = (c * w / g, r * h / g, (c + 1) * w / g, (r + 1) * h / g)
                items.append((i, 0, r, c, box, [tile0 * (g * g + cls) + cls + j], tile0 * g * g + j, base_kind))
            if not tiled:
                items.append((i, -1, -1, -1, NO_BOX, [], -1, "newline", []))
                tile0 += 1
                continue
            cv = self._canvas(hw)
            items.extend(self._canvas_tokens(i, hw, cv, tile0, cls))
            tile0 += 1 + cv["tiles"][0] * cv["tiles"][1]
        return self._pack(items)

    def _canvas_tokens(self, i, hw, cv, tile0, cls) -> list[tuple]:
        side, g = self._side()
        p = side // g  # canvas pixels per token
        sx, sy, ox, oy = self._to_original(hw, cv)
        h, w = hw
        # per output row / column: the input rows / columns it mixes and their weights (1-D linear resize)
        rows_in = _sources(_linear_weights(cv["h"], cv["out_h"]))
        cols_in = _sources(_linear_weights(cv["w"], cv["out_w"]))
        n_cols = cv["tiles"][1]

        def source(rr, cc):  # a cropped-canvas token -> (tile index, vision row, projector row)
            R, C = rr + cv["r0"], cc + cv["c0"]
            t = (R // g) * n_cols + C // g
            local = (R % g) * g + C % g
            patch = tile0 + 1 + t
            return t, patch * (g * g + cls) + cls + local, patch * g * g + local

        items = []
        fy, fx = cv["h"] / cv["out_h"], cv["w"] / cv["out_w"]  # input tokens per output token
        for r in range(cv["out_h"]):
            for c in range(cv["out_w"]):
                mix = [(source(a, b), wa * wb) for a, wa in rows_in[r] for b, wb in cols_in[c]]
                heavy = max(mix, key=lambda m: m[1])[0]
                u0, u1 = (c * fx + cv["c0"]) * p, ((c + 1) * fx + cv["c0"]) * p  # canvas pixels of the footprint
                v0, v1 = (r * fy + cv["r0"]) * p, ((r + 1) * fy + cv["r0"]) * p
                box = (max(0.0, (u0 - ox) / sx), max(0.0, (v0 - oy) / sy), min(float(w), (u1 - ox) / sx),
                       min(float(h), (v1 - oy) / sy))
                cy, cx = int((r + 0.5) * fy) + cv["r0"], int((c + 0.5) * fx) + cv["c0"]
                tile = 1 + (cy // g) * n_cols + cx // g
                items.append((i, tile, r, c, box, [s[1] for s, _ in mix], heavy[2], "patch", [x for _, x in mix],
                              [(s[2], x) for s, x in mix]))
            items.append((i, -1, r, cv["out_w"], NO_BOX, [], -1, "newline", [], []))
        return items

    def grids(self, enc, image_sizes, call_kwargs=None):
        """Per image: ``rows`` / ``cols`` of the canvas grid the LM receives (after crop and resize; 0 without a
        canvas), ``tiles`` (ViT tiles: the canvas tiles + the base image, as InternVL counts its thumbnail),
        ``tile_rows`` / ``tile_cols``, ``base`` (the base grid side), ``newlines`` and ``tokens`` (all of the image's
        visual tokens)."""
        _, g = self._side()
        out = []
        for hw, tiled in zip(enc["image_sizes"].tolist(), self._tiled(enc)):
            if not tiled:
                out.append({"rows": 0, "cols": 0, "tiles": 1, "tile_rows": 0, "tile_cols": 0, "base": g,
                            "newlines": 1, "tokens": g * g + 1})
                continue
            cv = self._canvas((int(hw[0]), int(hw[1])))
            out.append({"rows": cv["out_h"], "cols": cv["out_w"], "tiles": cv["tiles"][0] * cv["tiles"][1] + 1,
                        "tile_rows": cv["tiles"][0], "tile_cols": cv["tiles"][1], "base": g,
                        "newlines": cv["out_h"], "tokens": g * g + cv["out_h"] * (cv["out_w"] + 1)})
        return out
