"""Qwen3-VL (dense ``qwen3_vl`` and MoE ``qwen3_vl_moe``): the Qwen2-VL token layout with DeepStack.

What transformers 5.24's ``modeling_qwen3_vl`` / ``modeling_qwen3_vl_moe`` do, as far as the visual tokens go:

- Vision: packed ViT over a variable patch grid (16-px patches on the hub checkpoints), learned position embeddings
  interpolated to each grid, full attention in every block (no windows: the blocks and the merger work in token
  order, the merge-block order of Qwen2-VL), a 2x2 merger -> one visual token per merged cell. So the geometry is
  Qwen2-VL's :class:`~mech_vtokens.adapters.components.QwenMergedGeometry` unchanged.
- DeepStack: the outputs of vision blocks ``vision_config.deepstack_visual_indexes`` (e.g. [5, 11, 17]) go through
  their own mergers (``model.visual.deepstack_merger_list``) and are ADDED to the residual stream at the visual
  positions after decoder layers 0, 1, ... (one per listed block), outside any module (``_deepstack_process``):
  ``resid_pre[i + 1] = resid_post[i] + deepstack[i]``. Declared as ``injection``: site ``blocks.{i}.hook_deepstack``,
  a (batch, seq, d) addend (zero at text positions) read at the next layer's input; the packed vectors and their mask
  are the LM kwargs ``deepstack_visual_embeds`` / ``visual_pos_masks``, which sequence-changing interventions slice.
- M-RoPE: 3-D (t, h, w) interleaved rotary sections; the wrapper computes position ids (3, batch, seq) from
  ``input_ids``, ``image_grid_thw`` and the processor's ``mm_token_type_ids`` and hands them to the LM: ``rope`` =
  "mrope" as for Qwen2-VL (the interleaving lives in the rotary module, never in the ids).
- MoE (``qwen3_vl_moe``): the MLP of a decoder layer is a sparse block (router + experts) with the same call shape
  (a tensor in, a tensor out), so every site is where it is on the dense model.
"""

from .base import Adapter
from .components import QwenMergedGeometry


class Qwen3VLAdapter(Adapter):
    family = "qwen3_vl"
    model_types = ("qwen3_vl",)
    vision_layers = "model.visual.blocks"
    projector = "model.visual.merger"
    geometry = QwenMergedGeometry
    processor_class = "Qwen3VLProcessor"
    image_span = "<|vision_start|>{image}<|vision_end|>"
    image_size_knob = ('size={"shortest_edge": M, "longest_edge": N} (pixels; vlm.prepare(..., size=...) / '
                       'processor_kwargs={"size": {...}}; the hub default longest_edge is 16777216 = 4096 x 4096)')
    vision_feature_layer_key = None  # the merger reads the last vision block
    rope = "mrope"  # position ids (3, batch, seq): temporal, height, width (interleaved sections inside the rotary)
    injection = ("hook_deepstack", "deepstack_visual_embeds", "visual_pos_masks")
    # what Prune / VisualEntry / VisualExit slice with the sequence (the processor's mm_token_type_ids is consumed by
    # the wrapper, which computes the M-RoPE ids before the LM call: the interventions see the ids, not it)
    lm_token_kwargs = {"visual_pos_masks": "seq", "deepstack_visual_embeds": ("rows", "visual_pos_masks")}

    def injection_layers(self) -> range:
        return range(len(self.config.vision_config.deepstack_visual_indexes))


class Qwen3VLMoeAdapter(Qwen3VLAdapter):
    """The MoE checkpoints (``Qwen3VLMoeForConditionalGeneration``): the same declarations; ``mlp`` is the sparse
    block (router + experts) on most layers, a dense MLP on ``mlp_only_layers``."""

    family = "qwen3_vl_moe"
    model_types = ("qwen3_vl_moe",)
