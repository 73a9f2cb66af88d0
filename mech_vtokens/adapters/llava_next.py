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
    # the canvas grows with the image (up to the largest grid pinpoint); the pinpoints cap it
    image_size_knob = "image_grid_pinpoints (vlm.processor.image_processor.image_grid_pinpoints = [[h, w], ...])"
