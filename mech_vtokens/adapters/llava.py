"""LLaVA-1.5 (llava-hf ``LlavaForConditionalGeneration``): CLIP ViT-L/14-336 -> 2-layer MLP projector -> Llama."""

from .base import Adapter
from .components import CLIPGridGeometry


class LlavaAdapter(Adapter):
    family = "llava"
    model_types = ("llava",)
    vision_layers = "model.vision_tower.encoder.layers"
    projector = "model.multi_modal_projector"
    geometry = CLIPGridGeometry
    processor_class = "LlavaProcessor"
    max_images_per_prompt = 1  # LLaVA-1.5 was trained on one image per conversation
