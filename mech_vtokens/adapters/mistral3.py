"""Mistral 3 (``Mistral3ForConditionalGeneration``, model_type ``mistral3``: Mistral-Small-3.1 / 3.2, Magistral-Small
vision): the Pixtral encoder over ALL images of a batch as ONE sequence -> RMSNorm -> 2 x 2 patch merger -> 2-layer
MLP -> Mistral decoder.

What transformers 5.25's ``modeling_mistral3`` / ``modeling_pixtral`` / ``processing_pixtral`` and
``image_processing_pil_pixtral`` do, as far as the visual tokens go:

1. resize (``get_resize_output_image_size``): an image larger than ``size["longest_edge"]`` is scaled down keeping
   its aspect (``floor(side / ratio)``); then each side is rounded UP to a multiple of ``patch_size x
   spatial_merge_size`` (the processor passes that product as the image processor's ``patch_size``: 14 x 2 = 28 px);
   small images are not upscaled. The images of a call are padded (bottom / right, zeros) to the largest and
   ``image_sizes`` holds each one's resized (height, width);
2. Pixtral: ``patch_conv`` per image, cropped to its own ``image_sizes // patch`` grid, flattened row-major and
   CONCATENATED into one sequence (batch 1) with a block-diagonal attention mask (one block per image) and 2-D
   RoPE per image: vision block ``i`` outputs (1, sum of patches, d);
3. the projector RMS-normalises, then ``Mistral3PatchMerger`` splits the sequence per image, ``unfold``s each (h, w)
   grid with a 2 x 2 kernel (token (R, C) concatenates patches (2R + a, 2C + b), channel-major) in row-major token
   order and mixes them linearly; ``linear_1 -> GELU -> linear_2``: (sum of tokens, d_lm), images in order;
4. the prompt: per image ``rows x ([IMG] * cols + [IMG_BREAK])`` with the LAST ``[IMG_BREAK]`` replaced by
   ``[IMG_END]``. Only ``[IMG]`` is in the image-token mask (``config.image_token_id``): ``[IMG_BREAK]`` /
   ``[IMG_END]`` are TEXT tokens (ordinary embeddings, not visual tokens; unlike LLaVA-NeXT's learned newline, which
   is a projector row inside the mask), so every visual token is of kind "patch".

Token table (see ``Geometry``): ``row`` / ``col`` in the image's merged grid, ``box`` in ORIGINAL-image pixels
through the resize (each axis scaled on its own: the rounding up stretches slightly), ``vision_rows`` the 2 x 2
patches of the merge (equal weights: the merger is linear in their concatenation, no single patch is the token's).

The processor: ``PixtralProcessor`` needs torchvision today only because its module imports
``get_resize_output_image_size`` from the torchvision image processor (for ``_get_num_multimodal_tokens``, unused on
the image + text path); :func:`pixtral_processor_class` imports HF's own class with that one name taken from the PIL
image processor module (the same function, line for line) and pairs it with ``PixtralImageProcessorPil``.

LLaVA with a Pixtral tower (``mistral-community/pixtral-12b``, model_type ``llava``) is a different layout (no patch
merger: one token per 16-px patch, ``LlavaMultiModalProjector``) served by no adapter here: adapters are chosen by
``model_type``, and ``llava``'s declarations (``vision_tower.encoder.layers``, ``CLIPGridGeometry``'s fixed square
grid with a CLS row) do not fit it; the load refuses it (``Adapter._require_declared_modules``).
"""

from __future__ import annotations

from .base import Adapter
from .geometry import Geometry


class PixtralMergedGeometry(Geometry):
    """Pixtral + Mistral 3 patch merger: one variable (h, w) patch grid per image (``enc["image_sizes"] // patch``),
    all images concatenated into one vision sequence, merged ``m x m`` in raster order (``unfold``)."""

    def _grids(self, enc) -> list[tuple[int, int, int, int]]:
        """Per image (patch rows, patch cols, token rows, token cols), checked against the model's merge."""
        from ..errors import InputError

        cfg = self.adapter.config
        p, m = cfg.vision_config.patch_size, cfg.spatial_merge_size
        out = []
        for h, w in enc["image_sizes"].tolist():
            gh, gw = h // p, w // p
            if h % p or w % p or gh % m or gw % m:
                raise InputError(f"the processor gave an image of {h} x {w} px, no multiple of patch_size x "
                                 f"spatial_merge_size = {p * m} px: the model cannot merge its patches. Keep "
                                 f"do_resize=True (it rounds each side up to {p * m} px; with do_resize=False pass "
                                 f"images whose sides are multiples of {p * m} px) and the processor's patch_size / "
                                 f"spatial_merge_size equal to the model's: vlm.processor.patch_size = {p}, "
                                 f"vlm.processor.spatial_merge_size = {m}")
            out.append((gh, gw, gh // m, gw // m))
        return out

    def tokens(self, enc, image_sizes, call_kwargs=None):
        m = self.adapter.config.spatial_merge_size
        items, patch0, token0 = [], 0, 0
        for i, ((gh, gw, rows, cols), (w, h)) in enumerate(zip(self._grids(enc), image_sizes)):
            fx, fy = w / cols, h / rows  # one token's cell in original pixels
            for j in range(rows * cols):
                r, c = divmod(j, cols)
                box = (c * fx, r * fy, (c + 1) * fx, (r + 1) * fy)
                vrows = [patch0 + (r * m + a) * gw + c * m + b for a in range(m) for b in range(m)]
                items.append((i, -1, r, c, box, vrows, token0 + j))
            patch0 += gh * gw
            token0 += rows * cols
        return self._pack(items)

    def grids(self, enc, image_sizes, call_kwargs=None):
        return [{"rows": rows, "cols": cols, "tiles": 1} for _, _, rows, cols in self._grids(enc)]


_PIXTRAL: list = []


def pixtral_processor_class():
    """HF's ``PixtralProcessor`` class, importable without torchvision: its module's one torchvision-only import
    (``get_resize_output_image_size``, used by ``_get_num_multimodal_tokens`` only) is served for that import by the
    PIL image processor module's identical function. Saved and loaded as ``PixtralProcessor``."""
    if not _PIXTRAL:
        import importlib
        import sys
        import types

        name = "transformers.models.pixtral.image_processing_pixtral"
        try:
            module = importlib.import_module("transformers.models.pixtral.processing_pixtral")
        except ImportError:
            from transformers.models.pixtral import image_processing_pil_pixtral as pil

            stand_in = types.ModuleType(name)
            stand_in.get_resize_output_image_size = pil.get_resize_output_image_size
            sys.modules[name] = stand_in
            try:
                module = importlib.import_module("transformers.models.pixtral.processing_pixtral")
            finally:
                if sys.modules.get(name) is stand_in:
                    del sys.modules[name]
        _PIXTRAL.append(module.PixtralProcessor)
    return _PIXTRAL[0]


class Mistral3Adapter(Adapter):
    family = "mistral3"
    model_types = ("mistral3",)
    vision_layers = "model.vision_tower.transformer.layers"
    projector = "model.multi_modal_projector"
    geometry = PixtralMergedGeometry
    processor_class = "PixtralProcessor"
    # the processor writes [IMG] rows from its own merge size: it must be the model's (hub processor configs that
    # lack it would default to 1 and write 4x the tokens)
    processor_kwargs_from_config = {"spatial_merge_size": "spatial_merge_size"}
    image_size_knob = 'size={"longest_edge": N} (pixels; vlm.prepare(..., size=...)): tokens grow with the image'

    @classmethod
    def load_processor(cls, source: str, config=None, **kwargs):
        """``AutoProcessor`` when it builds (torchvision installed); else :func:`pixtral_processor_class` with the
        PIL image processor (``PixtralImageProcessorPil``, the same resize / normalise / pad as the torchvision one).
        The merge size is taken from the model config (``processor_kwargs_from_config``)."""
        from transformers import AutoProcessor

        try:
            processor = AutoProcessor.from_pretrained(source, **kwargs)
        except (OSError, ValueError, ImportError, AttributeError) as err:
            try:
                from transformers import PixtralImageProcessorPil

                ip = PixtralImageProcessorPil.from_pretrained(source)
                processor = pixtral_processor_class().from_pretrained(source, image_processor=ip, **kwargs)
            except Exception:
                raise err from None
        for attr, config_attr in cls.processor_kwargs_from_config.items():
            if config is not None and getattr(config, config_attr, None) is not None:
                setattr(processor, attr, getattr(config, config_attr))
        return processor
