"""GLM-4.1V / GLM-4.6V-Flash (dense ``glm4v``; GLM-4.6V's ``glm46v`` wrapper) and GLM-4.5V / GLM-4.6V (MoE
``glm4v_moe``): a Qwen2-VL-like packed ViT with 3-D M-RoPE in front of a GLM-4 decoder.

What transformers 5.25's ``modeling_glm4v`` / ``modeling_glm4v_moe`` / ``processing_glm4v`` do, as far as the visual
tokens go:

- Vision: 14-px patches, temporal patch 2 (a still image is duplicated), packed into one sequence; the image
  processor writes each 2 x 2 merge block's patches consecutively (``patchify``: (gh/2, gw/2, 2, 2) order, the
  Qwen2-VL merge-block order). Learned position embeddings (a 24 x 24 table) bicubically interpolated to each grid
  plus a 2-D rotary; full attention in every block (no windows: token order throughout). After the last block:
  ``post_layernorm`` -> ``view(-1, 2, 2, C)`` -> a 2 x 2 stride-2 ``downsample`` conv (one merge block -> one
  vector) -> ``merger`` (the projector, its output the LM's visual rows). So the geometry is Qwen2-VL's
  :class:`~mech_vtokens.adapters.geometry.QwenMergedGeometry` unchanged; ``vision.blocks.{i}`` rows are patches.
- Prompt: ``<|begin_of_image|><|image|><|end_of_image|>`` per image; the processor repeats ``<|image|>`` (the
  model's ``config.image_token_id``, 151343 on 4.1V / 4.6V-Flash, 151363 on 4.5V / 4.6V) once per merged cell.
- M-RoPE: the wrapper computes position ids (3, batch, seq) from ``input_ids``, ``image_grid_thw`` and the
  processor's ``mm_token_type_ids`` (``get_rope_index``: an image's cells at (t, row, col) offsets, the text after
  it at max(rows, cols) further on) and hands them to the LM: ``rope`` = "mrope" as for Qwen2-VL. The rotary acts on
  ``partial_rotary_factor`` (0.5) of each head, sections [8, 12, 12] interleaved per frequency inside the rotary
  module, never in the ids.
- Dense decoder (GLM-4-0414 layout): sandwich norms ``input_layernorm -> self_attn -> post_self_attn_layernorm ->
  + residual -> post_attention_layernorm (the PRE-MLP norm) -> mlp -> post_mlp_layernorm -> + residual``: what is
  ADDED to the residual is the post-norms' output, so ``hook_attn_out`` / ``hook_mlp_out`` are read there
  (``block_sites``) and ``ln2`` stays ``post_attention_layernorm``: ``resid_pre + attn_out == resid_mid`` bit for bit.
- MoE decoder (GLM-4.5-Air layout): NO post-sublayer norms (``Glm4vMoeTextDecoderLayer`` has only
  ``input_layernorm`` / ``post_attention_layernorm``), so the plain four-site layer; ``mlp`` is a dense MLP on the
  first ``first_k_dense_replace`` layers, else a sparse block (router + routed experts + shared experts, summed
  inside the module) with the same call shape (a tensor in, a tensor out): every site is where it is on a dense
  pre-norm model.
- Processor: the video processor needs torchvision; images + text do not (``processor_class`` without its video
  part). GLM-4.6V checkpoints name ``Glm46VProcessor``, which differs only in how it writes video frames.
"""

from .base import Adapter
from .geometry import QwenMergedGeometry

# Sandwich norms: the sublayer outputs are read after their post-norms (what is added to the residual stream).
_GLM4_BLOCK_SITES = (
    ("hook_inputs", "", "inputs", None),
    ("hook_resid_pre", "", "input", None),
    ("attn.hook_pattern", "{attn}.{pattern}", "output", None),
    ("hook_attn_out", "post_self_attn_layernorm", "output", None),
    ("hook_resid_mid", "{ln2}", "input", None),
    ("hook_mlp_out", "post_mlp_layernorm", "output", None),
    ("hook_resid_post", "", "output", None),
)


class Glm4vAdapter(Adapter):
    family = "glm4v"
    model_types = ("glm4v", "glm46v")
    vision_layers = "model.visual.blocks"
    projector = "model.visual.merger"
    ln2 = "post_attention_layernorm"  # the pre-MLP norm (GLM-4 naming)
    block_sites = _GLM4_BLOCK_SITES
    geometry = QwenMergedGeometry
    processor_class = "Glm4vProcessor"
    image_span = "<|begin_of_image|>{image}<|end_of_image|>"
    image_size_knob = ('size={"shortest_edge": M, "longest_edge": N} (pixels; vlm.prepare(..., size=...) / '
                       'processor_kwargs={"size": {...}}; the hub default longest_edge is 9633792)')
    vision_feature_layer_key = None  # the downsample conv + merger read the last vision block (after post_layernorm)
    rope = "mrope"  # position ids (3, batch, seq): temporal, height, width
    system_content_is_text = True  # GLM-4.1V's template prints the system content as is (GLM-4.5V's takes both)


class Glm4vMoeAdapter(Glm4vAdapter):
    """GLM-4.5V / GLM-4.6V (``Glm4vMoeForConditionalGeneration``): the same vision side and prompt; the decoder
    layers have no post-sublayer norms, so the default block sites."""

    family = "glm4v_moe"
    model_types = ("glm4v_moe",)
    block_sites = Adapter.block_sites
