"""LLaVA-OneVision (llava-hf ``LlavaOnevisionForConditionalGeneration``): SigLIP-so400m over the base image and the
anyres tiles (up to 6x6 of 384 px) -> MLP projector -> unpadded canvas, BILINEARLY resized down to ``anyres_max_9``
(9 tiles' worth of tokens) when larger, row by row with an ``image_newline`` token per row -> Qwen2 decoder. Images
of a multi-image prompt are not tiled (base image + one newline)."""

from .anyres import AnyresGeometry
from .base import Adapter


class OnevisionGeometry(AnyresGeometry):
    interpolate_key = "vision_aspect_ratio"  # "anyres_max_9"
    tiles_multi_image = False


class LlavaOnevisionAdapter(Adapter):
    family = "llava_onevision"
    model_types = ("llava_onevision",)
    vision_layers = "model.vision_tower.encoder.layers"
    projector = "model.multi_modal_projector"
    geometry = OnevisionGeometry
    processor_class = "LlavaOnevisionProcessor"
    images_nested = True  # the image processor tiles only images alone in their prompt
    # settings the processor's token count must share with the model (a mismatch would be refused by HF only
    # after the vision tower ran)
    processor_kwargs_from_config = {"vision_aspect_ratio": "vision_aspect_ratio",
                                    "vision_feature_select_strategy": "vision_feature_select_strategy"}
    image_size_knob = ("vision_aspect_ratio ('anyres_max_N' on vlm.processor and vlm.hf.config alike) or "
                       "image_grid_pinpoints (the same list on vlm.processor.image_processor and vlm.hf.config)")
