"""LLaVA-NeXT (llava-hf ``LlavaNextForConditionalGeneration``, "LLaVA-1.6"): CLIP ViT-L/14-336 over the base image
and the anyres high-res tiles -> 2-layer MLP projector -> unpadded canvas row by row with a learned
``image_newline`` token per row -> Mistral / Vicuna / Llama-3 decoder."""

from .anyres import AnyresGeometry
from .base import Adapter


class LlavaNextAdapter(Adapter):
    family = "llava_next"
    model_types = ("llava_next",)
    vision_layers = "model.vision_tower.encoder.layers"
    projector = "model.multi_modal_projector"
    geometry = AnyresGeometry
    processor_class = "LlavaNextProcessor"
    # the canvas grows with the image (up to the largest grid pinpoint); the pinpoints cap it. The model unpads with
    # its config's list, the processor tiles with its own: they must stay equal (prepare refuses a mismatch)
    image_size_knob = ("image_grid_pinpoints (the same [[h, w], ...] on vlm.processor.image_processor and "
                       "vlm.hf.config)")
