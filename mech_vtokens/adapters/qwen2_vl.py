"""Qwen2-VL: packed ViT over a variable patch grid, 2x2 merger (token order), Qwen2 decoder with M-RoPE."""

from .base import Adapter
from .geometry import QwenMergedGeometry


class Qwen2VLAdapter(Adapter):
    family = "qwen2_vl"
    model_types = ("qwen2_vl",)
    vision_layers = "model.visual.blocks"
    projector = "model.visual.merger"
    geometry = QwenMergedGeometry
    processor_class = "Qwen2VLProcessor"
    image_span = "<|vision_start|>{image}<|vision_end|>"
    image_size_knob = 'max_pixels (vlm.prepare(..., max_pixels=N) / processor_kwargs={"max_pixels": N})'
    vision_feature_layer_key = None  # the merger reads the last vision block
    rope = "mrope"  # position ids (3, batch, seq): temporal, height, width
