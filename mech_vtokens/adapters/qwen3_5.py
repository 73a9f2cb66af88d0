"""Qwen3.5 (dense ``qwen3_5`` and MoE ``qwen3_5_moe``): Qwen3-VL's vision side, a HYBRID decoder.

What transformers 5.25's ``modeling_qwen3_5`` / ``modeling_qwen3_5_moe`` do, as far as the visual tokens go:

- Vision: Qwen3-VL's packed ViT (16-px patches on the hub checkpoints, learned position embeddings interpolated to
  each grid, full attention in every block, 2x2 merger) WITHOUT DeepStack (no ``deepstack_visual_indexes``, no
  injection after the first layers): the geometry is :class:`~mech_vtokens.adapters.components.QwenMergedGeometry`.
  The processor is ``Qwen3VLProcessor`` (its ``mm_token_type_ids`` feed the wrapper's M-RoPE ids).
- Decoder: most layers are LINEAR attention (``layer.linear_attn``, a gated delta net: causal conv + recurrent
  state, no attention weights, its output a tensor), every ``full_attention_interval``-th one (hub: 1 in 4) is
  gated softmax attention (``layer.self_attn``, output ``(out, weights)``): ``config.text_config.layer_types``.
  Declared per layer kind (``block_sites_by_kind``): ``hook_attn_out`` is the mixer's output on every layer,
  ``attn.hook_pattern`` exists on full-attention layers only (AttentionKnockout / HeadKnockout elsewhere are
  refused naming the layers that have it).
- Masks: the LM builds ``{"full_attention": causal, "linear_attention": the 2-D padding mask or None}``
  (``create_recurrent_attention_mask``) from the 2-D mask it receives; sequence changes rebuild both kinds
  (``mech_vtokens.sequence``). Left padding leaves the recurrent state zero (zeroed inputs add nothing to it).
- Cache: one hybrid layer per decoder layer (conv + recurrent state on linear layers, keys / values on full ones);
  its length is that of the full-attention layers. A sequence change at the prefill makes the linear layers' state
  the one of the changed sequence, so decode steps continue it (tests compare with re-running the whole forward).
- M-RoPE: 3-D interleaved sections on a quarter of the head dim (``partial_rotary_factor``); the wrapper computes
  the (3, batch, seq) ids, generate prepends the text ids ((4, batch, seq)): ``rope = "mrope"``.
- MoE (``qwen3_5_moe``): the MLP is a sparse block (router + experts + a gated shared expert), a tensor in and out.
"""

from .base import Adapter
from .components import QwenMergedGeometry

# A linear-attention layer: the gated delta net's output (a tensor) is what is added to the residual; no pattern.
_LINEAR_BLOCK_SITES = (
    ("hook_inputs", "", "inputs", None),
    ("hook_resid_pre", "", "input", None),
    ("hook_attn_out", "linear_attn", "output", None),
    ("hook_resid_mid", "{ln2}", "input", None),
    ("hook_mlp_out", "{mlp}", "output", None),
    ("hook_resid_post", "", "output", None),
)


class Qwen3_5Adapter(Adapter):
    family = "qwen3_5"
    model_types = ("qwen3_5",)
    vision_layers = "model.visual.blocks"
    projector = "model.visual.merger"
    geometry = QwenMergedGeometry
    processor_class = "Qwen3VLProcessor"
    image_span = "<|vision_start|>{image}<|vision_end|>"
    image_size_knob = ('size={"shortest_edge": M, "longest_edge": N} (pixels; vlm.prepare(..., size=...) / '
                       'processor_kwargs={"size": {...}})')
    vision_feature_layer_key = None  # the merger reads the last vision block
    rope = "mrope"
    block_sites_by_kind = {"linear_attention": _LINEAR_BLOCK_SITES}


class Qwen3_5MoeAdapter(Qwen3_5Adapter):
    """The MoE checkpoints (``Qwen3_5MoeForConditionalGeneration``): the same declarations; ``mlp`` is the sparse
    block on every layer."""

    family = "qwen3_5_moe"
    model_types = ("qwen3_5_moe",)
