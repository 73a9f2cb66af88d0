"""Idefics3 (``Idefics3ForConditionalGeneration``, e.g. HuggingFaceM4/Idefics3-8B-Llama3) and SmolVLM
(``SmolVLMForConditionalGeneration``, e.g. HuggingFaceTB/SmolVLM-256M-Instruct): one architecture, two model types.

What transformers 5.25's ``modeling_idefics3`` / ``modeling_smolvlm`` and their image processors do to one image:

1. resize: the longest edge to ``size["longest_edge"]`` (the other rounded down, then up to even), both capped at
   4096; then up to multiples of the tile side ``M = max_image_size["longest_edge"]`` (``resize_for_vision_encoder``);
2. split: ``rows x cols`` tiles of M x M cut from that canvas (row-major), then the GLOBAL image (the whole canvas
   resized to M x M) LAST; a canvas no larger than one tile is not split (one M x M frame, the whole image); with
   ``do_image_splitting=False`` every image is that one frame;
3. the prompt gets per tile ``<fake_token_around_image><row_i_col_j>`` + ``image_seq_len`` image tokens (a newline
   after each tile row), then ``<fake_token_around_image><global-img>`` + image tokens + ``<fake_token_around_image>``:
   only ``<image>`` is in the image-token mask; the fake / row / global tokens are TEXT;
4. frames are padded per prompt to the batch's most frames with ALL-ZERO frames, which the model drops before the
   SigLIP encoder (``real_images_inds``): the vision output holds the real frames only, in prompt order;
5. ``model.connector`` pixel-shuffles each frame's g x g patch grid by ``scale_factor`` s (token (R, C) concatenates
   the s x s patches of rows sR..sR+s-1, cols sC..sC+s-1) and projects it linearly: one visual token per s x s patch
   block, in raster order; the LM (``model.text_model``, Llama / SmolLM) receives them where ``<image>`` stands.

Token table (see ``Geometry``): ``tile`` = the frame (tiles 0..rows*cols-1 row-major, the global image last; 0 for an
unsplit image), kind "patch" for tile tokens and for an unsplit image's, "thumbnail" for the global image's;
``row`` / ``col`` in the frame's (g/s) x (g/s) token grid; ``box`` in ORIGINAL-image pixels through the processor's
integer resize sizes; ``vision_rows`` the s*s patch rows (equal weights) of the real frame.
"""

from __future__ import annotations

import math

from .base import Adapter
from .geometry import Geometry


class TiledGlobalGeometry(Geometry):
    """Idefics3 / SmolVLM: image split into M x M tiles + a global image, each a SigLIP grid, pixel-shuffled."""

    def _settings(self, call_kwargs) -> dict:
        """The image settings this processor call applies (``Geometry.applied``), checked against the model."""
        from ..errors import InputError

        vc = self.adapter.config.vision_config
        s = self.adapter.config.scale_factor
        side = dict(self.applied("max_image_size", call_kwargs) or {}).get("longest_edge")
        if not side or side % (vc.patch_size * s):
            raise InputError(f"the processor's max_image_size={self.applied('max_image_size', call_kwargs)} is no "
                             f"multiple of patch_size x scale_factor = {vc.patch_size * s}: the model cannot "
                             f"pixel-shuffle such tiles; use max_image_size={{'longest_edge': {vc.image_size}}}")
        g = side // vc.patch_size
        per = (g // s) ** 2
        if per != self.processor.image_seq_len:
            raise InputError(f"the processor writes image_seq_len={self.processor.image_seq_len} tokens per tile but "
                             f"tiles of {side} px give the model ({g} // {s})^2 = {per}; set max_image_size="
                             f"{{'longest_edge': {vc.image_size}}} (the model's image_size) or the matching "
                             f"image_seq_len on vlm.processor")
        size = dict(self.applied("size", call_kwargs) or {})
        return {"M": side, "g": g, "s": s, "p": vc.patch_size, "size": size.get("longest_edge"),
                "resize": bool(self.applied("do_resize", call_kwargs)),
                "split": bool(self.applied("do_image_splitting", call_kwargs))}

    @staticmethod
    def _split(w: int, h: int, st: dict) -> tuple[int, int, int, int]:
        """(rows, cols, canvas width, canvas height) of an image of w x h px: the processor's integer arithmetic
        (``resize`` by the longest edge, ``resize_for_vision_encoder``, ``split_images``); rows = cols = 0: one
        frame."""
        from transformers.models.idefics3.image_processing_pil_idefics3 import get_resize_output_image_size

        if not st["split"]:
            return 0, 0, st["M"], st["M"]
        if st["resize"] and st["size"]:
            import numpy as np

            h, w = get_resize_output_image_size(np.empty((1, h, w), np.uint8), resolution_max_side=st["size"])
        M, aspect = st["M"], w / h
        if w >= h:
            w = math.ceil(w / M) * M
            h = math.ceil(int(w / aspect) / M) * M
        else:
            h = math.ceil(h / M) * M
            w = math.ceil(int(h * aspect) / M) * M
        if h > M or w > M:
            return (h - M) // M + 1, (w - M) // M + 1, w, h
        return 0, 0, w, h

    def _real_frames(self, enc) -> list[int]:
        """Per prompt: the frames the model keeps (not all-zero), as it decides."""
        pv = enc["pixel_values"]
        real = (pv != 0).flatten(2).any(-1)
        return real.sum(1).tolist()

    def tokens(self, enc, image_sizes, call_kwargs=None):
        from ..errors import InputError

        st = self._settings(call_kwargs)
        g, s = st["g"], st["s"]
        gt, P = g // s, g * g
        items, frame = [], 0
        for i, (w, h) in enumerate(image_sizes):
            rows, cols, cw, ch = self._split(w, h, st)
            n = rows * cols
            for t in range(n + 1):
                if t < n:
                    tr, tc = divmod(t, cols)
                    x0, y0, fx, fy = tc * st["M"] * w / cw, tr * st["M"] * h / ch, st["M"] * w / cw, st["M"] * h / ch
                else:  # the global image (or the one frame): the whole image
                    x0, y0, fx, fy = 0.0, 0.0, float(w), float(h)
                kind = "thumbnail" if n and t == n else "patch"
                for j in range(gt * gt):
                    r, c = divmod(j, gt)
                    box = (x0 + c * fx / gt, y0 + r * fy / gt, x0 + (c + 1) * fx / gt, y0 + (r + 1) * fy / gt)
                    vrows = [frame * P + (r * s + a) * g + c * s + b for a in range(s) for b in range(s)]
                    items.append((i, t, r, c, box, vrows, frame * gt * gt + j, kind))
                frame += 1
        kept = sum(self._real_frames(enc))
        if kept != frame:
            raise InputError(f"the images make {frame} frames (tiles + global images) but the model would keep "
                             f"{kept}: it drops every frame whose pixel values are all 0.0 as padding. An image that "
                             f"normalises to exactly 0 everywhere (uniform mid grey) cannot be passed; change it")
        return self._pack(items)

    def grids(self, enc, image_sizes, call_kwargs=None):
        """Per image: ``rows`` / ``cols`` of one frame's token grid, ``tiles`` (frames: tiles + the global image),
        ``tile_rows`` / ``tile_cols`` (0 for an unsplit image)."""
        st = self._settings(call_kwargs)
        gt = st["g"] // st["s"]
        out = []
        for w, h in image_sizes:
            rows, cols, _, _ = self._split(w, h, st)
            out.append({"rows": gt, "cols": gt, "tiles": rows * cols + 1, "tile_rows": rows, "tile_cols": cols})
        return out


class Idefics3Adapter(Adapter):
    family = "idefics3"
    model_types = ("idefics3",)
    vision_layers = "model.vision_model.encoder.layers"
    projector = "model.connector"
    language_model = "model.text_model"
    decoder_layers = "model.text_model.layers"
    final_norm = "model.text_model.norm"
    rotary_emb = "model.text_model.rotary_emb"
    geometry = TiledGlobalGeometry
    processor_class = "Idefics3Processor"
    images_nested = True  # the processor splits a flat image list by the prompts' <image> counts; nest explicitly
    vision_feature_layer_key = None  # the connector reads the last encoder block (through post_layernorm)
    image_size_knob = ('size={"longest_edge": N} (pixels, a multiple of max_image_size; vlm.prepare(..., size=...)) '
                       'or do_image_splitting=False (one tile per image)')


_SMOLVLM: list = []


def smolvlm_image_processor_class():
    """``SmolVLMProcessor`` without its video part (its video processor needs torchvision): the video-less subclass
    (``components.videoless``) whose ``apply_chat_template`` is ProcessorMixin's, as SmolVLM's own does for prompts
    without a video (its override only reads the video processor's frame settings and swaps the template for videos).
    Saved and loaded as ``SmolVLMProcessor``, every init setting kept."""
    if not _SMOLVLM:
        import transformers

        from .components import videoless

        parent = transformers.SmolVLMProcessor

        class SmolVLMProcessor(videoless(parent)):
            def apply_chat_template(self, conversation, chat_template=None, **kwargs):
                return super(parent, self).apply_chat_template(conversation, chat_template, **kwargs)

        _SMOLVLM.append(SmolVLMProcessor)
    return _SMOLVLM[0]


class SmolVLMAdapter(Idefics3Adapter):
    """SmolVLM: the Idefics3 modules and geometry; its processor also has a video part (built without it here,
    the video processor needs torchvision) and needs the ``num2words`` package."""

    family = "smolvlm"
    model_types = ("smolvlm",)
    processor_class = "SmolVLMProcessor"

    @classmethod
    def load_processor(cls, source: str, config=None, **kwargs):
        """``AutoProcessor`` when it builds (torchvision installed); else :func:`smolvlm_image_processor_class`."""
        from transformers import AutoProcessor

        try:
            return AutoProcessor.from_pretrained(source, **kwargs)
        except (OSError, ValueError, ImportError, AttributeError) as err:
            try:
                return smolvlm_image_processor_class().from_pretrained(source, **kwargs)
            except Exception:
                raise err from None
