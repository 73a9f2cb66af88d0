"""Qwen2.5-VL: like Qwen2-VL, but the ViT attends in windows and its blocks and merger work in WINDOW order; the LM
receives the features re-ordered to token order (``model.visual`` output ``pooler_output``)."""

import torch

from .base import Adapter
from .geometry import QwenMergedGeometry


class Qwen25WindowGeometry(QwenMergedGeometry):
    def window_order(self, grid_thw: torch.Tensor) -> torch.Tensor:
        from transformers.vision_utils import get_vision_window_index

        visual = self.model.model.visual
        window_index, _ = get_vision_window_index(grid_thw, spatial_merge_size=visual.spatial_merge_size,
                                                  window_size=visual.window_size, patch_size=visual.patch_size)
        return torch.as_tensor(window_index)


class Qwen25VLAdapter(Adapter):
    family = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)
    vision_layers = "model.visual.blocks"
    projector = "model.visual.merger"
    geometry = Qwen25WindowGeometry
    processor_class = "Qwen2_5_VLProcessor"
    image_span = "<|vision_start|>{image}<|vision_end|>"
    image_size_knob = 'max_pixels (vlm.prepare(..., max_pixels=N) / processor_kwargs={"max_pixels": N})'
    vision_feature_layer_key = None  # the merger reads the last vision block
    rope = "mrope"  # position ids (3, batch, seq): temporal, height, width
