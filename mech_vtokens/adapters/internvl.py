"""InternVL (HF ``InternVLForConditionalGeneration``): InternViT over 448-px tiles + thumbnail, pixel shuffle
(2x2 -> 1), MLP projector, Qwen2/Llama decoder. The ViT scales each sublayer by a learned lambda (layer scale)."""

from .base import Adapter
from .geometry import TiledGeometry


class InternVLAdapter(Adapter):
    family = "internvl"
    model_types = ("internvl",)
    vision_layers = "model.vision_tower.encoder.layer"
    projector = "model.multi_modal_projector"
    geometry = TiledGeometry
    processor_class = "InternVLProcessor"
    processor_kwargs_from_config = {"image_seq_length": "image_seq_length"}  # not saved in processor_config
    # the processor wraps each <IMG_CONTEXT> in <img>..</img> itself; tiles cap the tokens (256 per 448-px tile)
    image_size_knob = "max_patches (vlm.processor.image_processor.max_patches = N tiles)"
