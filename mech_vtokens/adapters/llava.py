"""LLaVA-1.5 (llava-hf ``LlavaForConditionalGeneration``): CLIP ViT-L/14-336 -> 2-layer MLP projector -> Llama."""

from .base import Adapter
from .geometry import CLIPGridGeometry


class LlavaAdapter(Adapter):
    family = "llava"
    model_types = ("llava",)
    vision_layers = "model.vision_tower.encoder.layers"
    projector = "model.multi_modal_projector"
    geometry = CLIPGridGeometry
    processor_class = "LlavaProcessor"
    max_images_per_prompt = 1  # LLaVA-1.5 was trained on one image per conversation
    # LLaVA-1.5-7b / -13b sit on Vicuna (LLaMA-2 7B / 13B); paper Sec. 4.2 quotes {1415, 2533} for a LLaMA-2 7B backbone
    sink_dims = {"llava-hf/llava-1.5-7b-hf": (1415, 2533), "llava-hf/llava-1.5-13b-hf": (2100, 4743),
                 "llama2-7b": (1415, 2533), "llama2-13b": (2100, 4743)}
