"""Gemma 3 (``Gemma3ForConditionalGeneration``, model_type ``gemma3``): SigLIP-so400m at 896 px (64 x 64 patches of
14 px) -> average pool 4 x 4 -> RMSNorm -> one matrix -> 256 soft tokens per image -> Gemma 3 decoder.

What transformers 5.25's ``modeling_gemma3`` / ``processing_gemma3`` do, as far as the visual tokens go:

- Prompt: a user writes ``<start_of_image>`` where an image goes (the chat template writes it for ``{"type":
  "image"}``); the processor expands it to ``\\n\\n<start_of_image>`` + 256 x ``<image_soft_token>`` +
  ``<end_of_image>\\n\\n``. ``processor.image_token_id`` is the START-of-image token, the model's image token (the
  visual positions, ``config.image_token_id``) is ``tokenizer.image_token_id``: declared as ``processor_image_token``.
- Attention: BIDIRECTIONAL within each image (the processor's ``token_type_ids`` are 1 at the soft tokens; the wrapper
  builds ``{"full_attention": OR(causal, same image), "sliding_attention": AND(OR(causal, same image), window)}``
  and hands the LM that dict): declared as ``image_attention = "bidirectional"``; sequence changes rebuild both
  kinds (``mech_vtokens.sequence``). 5 sliding-window (local, rope base 10k) layers : 1 global (rope base 1M): the
  rotary module takes the layer kind (``rotary_takes_kind``).
- Sandwich norms: ``input_layernorm -> self_attn -> post_attention_layernorm -> + residual ->
  pre_feedforward_layernorm -> mlp -> post_feedforward_layernorm -> + residual``: what is ADDED to the residual is
  the post-norms' output, so ``hook_attn_out`` / ``hook_mlp_out`` are read there (``block_sites``) and ``ln2`` is
  the pre-feedforward norm: ``resid_pre + attn_out == resid_mid`` bit for bit.
- Embeddings: ``Gemma3TextScaledWordEmbedding`` multiplies the rows by sqrt(d) (``embed_scale``, in the weights'
  dtype): declared as ``embed_scale``; ``vlm.embedding_scale`` / ``vlm.input_embedding_norms()`` give the norms the
  LM receives (what a norm comparison of visual with text tokens needs; cosines are unaffected).
- Logits: ``Gemma3ForConditionalGeneration`` applies no ``final_logit_softcapping`` after ``lm_head`` (only the
  text-only ``Gemma3ForCausalLM`` does; gemma-3-4b-it sets it to null anyway), so LogitLens is ``lm_head(norm(h))``.
- Geometry: the image is resized to 896 x 896 without keeping the aspect ratio, so token (r, c) of the 16 x 16 grid
  is the box (c, r, c + 1, r + 1) * (w / 16, h / 16) of the original image and the mean of the 4 x 4 patches of its
  pool (equal weights). Pan-and-scan (``do_pan_and_scan``, off by default) is refused.
"""

from .base import Adapter
from .geometry import PooledGridGeometry

# Sandwich norms: the sublayer outputs are read after their post-norms (what is added to the residual stream).
_GEMMA_BLOCK_SITES = (
    ("hook_inputs", "", "inputs", None),
    ("hook_resid_pre", "", "input", None),
    ("attn.hook_pattern", "{attn}.{pattern}", "output", None),
    ("hook_attn_out", "post_attention_layernorm", "output", None),
    ("hook_resid_mid", "{ln2}", "input", None),
    ("hook_mlp_out", "post_feedforward_layernorm", "output", None),
    ("hook_resid_post", "", "output", None),
)


class Gemma3Adapter(Adapter):
    family = "gemma3"
    model_types = ("gemma3",)
    vision_layers = "model.vision_tower.encoder.layers"
    projector = "model.multi_modal_projector"
    ln2 = "pre_feedforward_layernorm"
    block_sites = _GEMMA_BLOCK_SITES
    geometry = PooledGridGeometry
    processor_class = "Gemma3Processor"
    processor_image_token = "tokenizer.image_token_id"  # processor.image_token_id is <start_of_image>
    images_nested = True  # the processor counts images per prompt (a list per prompt)
    image_attention = "bidirectional"  # within each image (token_type_ids); text causal
    rotary_takes_kind = True  # Gemma3RotaryEmbedding.forward(x, position_ids, layer_type)
    embed_scale = "model.language_model.embed_tokens.embed_scale"  # sqrt(d), applied in the weights' dtype
    vision_feature_layer_key = None  # the projector reads the last vision block (after post_layernorm)
