"""Gemma 4 (``Gemma4ForConditionalGeneration``, model_type ``gemma4``: google/gemma-4-E2B-it, -E4B-it, -31B-it,
-26B-A4B-it): a Gemma-4 ViT over 16-px patches of an aspect-preserving resize -> 3 x 3 average pool -> RMSNorm ->
one matrix (``model.embed_vision``) -> a VARIABLE number of soft tokens per image -> the Gemma 4 decoder.

What transformers 5.25's ``modeling_gemma4`` / ``processing_gemma4`` do, as far as the visual tokens go:

- Prompt: a user writes ``<|image|>`` where an image goes; the processor expands it to ``<|image>`` + n x
  ``<|image|>`` + ``<image|>``, n = the image's pooled cells (``num_soft_tokens_per_image``, at most
  ``max_soft_tokens``, one of 70 / 140 / 280 / 560 / 1120). ``processor.image_token_id`` is the soft token.
- Geometry (:class:`Gemma4Geometry`): the image is resized to the largest (h, w), both multiples of 3 x 16 px,
  within ``max_soft_tokens * 9`` patches, the aspect ratio kept up to that rounding; patches come in raster order,
  padded to the budget with position (-1, -1); the pooler averages the 3 x 3 patches of each cell with equal
  weights, cells in raster order (``floor(x / 3) + (W / 3) * floor(y / 3)``). Rows, columns and vision rows are read
  from the processor's ``image_position_ids``, boxes are the cells of the ORIGINAL image (each axis stretched on
  its own). The projector output is already packed: row j of ``model.embed_vision`` is the j-th visual token.
- Sandwich norms as Gemma 3 (sites after the post-norms), then two more steps per decoder layer: per-layer
  embeddings (PLE: ``h += norm(proj(gelu(gate(h)) * per_layer_input))``, site ``hook_ple_out``) and a learned
  scalar on the WHOLE residual (``layer_scalar``): ``resid_pre + attn_out == resid_mid`` and
  ``(resid_mid + mlp_out + ple_out) * layer_scalar == resid_post`` bit for bit (the model's own ops).
- PLE inputs: the LM call gets ``per_layer_inputs`` (batch, seq, layers, 256) = the per-layer token embedding of
  each id (image positions: of the PAD token), the LM adds a projection of ``inputs_embeds``: a per-token LM input
  that sequence changes slice (``lm_token_kwargs``).
- KV sharing (E2B / E4B: ``num_kv_shared_layers`` = 20 / 18): the last layers reuse the keys / values of the last
  earlier layer of their kind, computed on the sequence THAT layer saw; in a generate prefill they compute the last
  position only. A sequence change BETWEEN decoder layers (VisualEntry / VisualExit) would leave those layers' keys
  and their per-layer inputs on another sequence: refused (``sequence_change_refusal``); Prune, before the LM, is
  exact (every layer sees the pruned sequence).
- Attention: E2B / E4B (``use_bidirectional_attention`` unset) are causal over images; the large models
  (``"vision"``) see each image bidirectionally in their SLIDING layers only (full layers stay causal):
  ``image_attention`` / ``image_attention_kinds`` from the config. One rope per layer kind (``rotary_takes_kind``).
- Logits: ``final_logit_softcapping`` (30) after ``lm_head``: ``logits = cap * tanh(lm_head(h) / cap)``, outside any
  module: ``unembed.hook_out`` reads the model's logits (the root output's ``logits``) and every lens / metric that
  computes logits from a hidden state applies the same cap (``logit_softcap``).
- Embeddings: scaled by sqrt(d) like Gemma 3 (``embed_scale``). Audio and video inputs are not used.
- Processor: ``Gemma4Processor.__init__`` needs an audio feature extractor and a video processor (torchvision),
  by keyword: :func:`gemma4_image_processor_class` builds it for images + text.
- Without a vision encoder: Gemma 4 unified (``gemma4_unified``: raw patches projected straight into the LM) and a
  text-only config (``vision_config`` null) are refused by ``mv.load`` before any weight is read (``check_config``).
"""

from __future__ import annotations

from .base import Adapter
from .geometry import Geometry

# Sandwich norms (read after the post-norms, as Gemma 3), then the per-layer-embedding step added to the residual.
_GEMMA4_BLOCK_SITES = (
    ("hook_inputs", "", "inputs", None),
    ("hook_resid_pre", "", "input", None),
    ("attn.hook_pattern", "{attn}.{pattern}", "output", None),
    ("hook_attn_out", "post_attention_layernorm", "output", None),
    ("hook_resid_mid", "{ln2}", "input", None),
    ("hook_mlp_out", "post_feedforward_layernorm", "output", None),
    ("hook_ple_out", "post_per_layer_input_norm", "output", None),
    ("hook_resid_post", "", "output", None),
)


class Gemma4Geometry(Geometry):
    """Per image, the pooled grid the processor made (``image_position_ids``: (x, y) per patch, (-1, -1) padding):
    ``rows x cols`` = (H / 16 / k) x (W / 16 / k) cells, k = ``pooling_kernel_size``; a token's vision rows are the
    k * k patches of its cell (flat rows of a vision block output, ``image * max_patches + patch``), equal weights;
    its box is its cell of the original image."""

    def _grids(self, enc):
        import torch

        k = int(self.adapter.config.vision_config.pooling_kernel_size)
        pos = enc["image_position_ids"]
        out = []
        for i in range(pos.shape[0]):
            p = pos[i]
            valid = (p >= 0).all(-1)
            w, h = int(p[valid][:, 0].max()) + 1, int(p[valid][:, 1].max()) + 1
            cell = torch.where(valid, p[:, 0] // k + (w // k) * (p[:, 1] // k), torch.full_like(p[:, 0], -1))
            out.append((h // k, w // k, cell, pos.shape[1]))
        return out

    def tokens(self, enc, image_sizes, call_kwargs=None):
        items, row0 = [], 0
        for i, ((w, h), (rows, cols, cell, m)) in enumerate(zip(image_sizes, self._grids(enc))):
            for j in range(rows * cols):
                r, c = divmod(j, cols)
                box = (c * w / cols, r * h / rows, (c + 1) * w / cols, (r + 1) * h / rows)
                vrows = [i * m + int(q) for q in (cell == j).nonzero()[:, 0]]
                items.append((i, -1, r, c, box, vrows, row0 + j))
            row0 += rows * cols
        return self._pack(items)

    def grids(self, enc, image_sizes, call_kwargs=None):
        return [{"rows": rows, "cols": cols, "tiles": 1} for rows, cols, _, _ in self._grids(enc)]

    def native_size(self):
        """A square of n x n cells, n^2 within ``max_soft_tokens``: the processor's resize leaves it as it is."""
        side = self.ip.pooling_kernel_size * self.ip.patch_size * int(self.ip.max_soft_tokens ** 0.5)
        return side, side


class Gemma4Adapter(Adapter):
    family = "gemma4"
    model_types = ("gemma4", "gemma4_unified")  # the unified one only to refuse it clearly (check_config)
    vision_layers = "model.vision_tower.encoder.layers"
    projector = "model.embed_vision"
    ln2 = "pre_feedforward_layernorm"
    block_sites = _GEMMA4_BLOCK_SITES
    geometry = Gemma4Geometry
    processor_class = "Gemma4Processor"
    images_nested = True  # the processor counts images per prompt
    rotary_takes_kind = True  # Gemma4TextRotaryEmbedding.forward(x, position_ids, layer_type)
    embed_scale = "model.language_model.embed_tokens.embed_scale"
    vision_feature_layer_key = None  # the pooler reads the last vision block
    image_size_knob = "max_soft_tokens (70, 140, 280, 560 or 1120; vlm.prepare(..., max_soft_tokens=N))"
    lm_token_kwargs = {"per_layer_inputs": "seq"}  # PLE token embeddings (batch, seq, layers, d_ple)
    logit_softcap = "text_config.final_logit_softcapping"
    unembed_site = ("", "output", "logits")  # the capped logits, the root output's field
    generate_defaults = {"logits_to_keep": 0}  # else the KV-shared layers see the prompt's last position only

    @classmethod
    def check_config(cls, config) -> None:
        from ..errors import InputError

        if config.model_type == "gemma4_unified":
            raise InputError("Gemma 4 unified (model_type gemma4_unified, Gemma4UnifiedForConditionalGeneration) has "
                             "no vision encoder: model.embed_vision projects raw pixel patches straight into the "
                             "language model, so there are no vision blocks / pooled soft tokens this adapter maps; "
                             "it is not supported. Use a Gemma 4 with a vision tower (google/gemma-4-E2B-it, -E4B-it, "
                             "-31B-it, -26B-A4B-it)")
        if getattr(config, "vision_config", None) is None:
            raise InputError("this gemma4 checkpoint has no vision encoder (config.vision_config is null: a text-only "
                             "Gemma 4), so it has no visual tokens to study; load a Gemma 4 checkpoint with a vision "
                             "tower (e.g. google/gemma-4-E2B-it)")

    @property
    def image_attention(self):
        return "bidirectional" if self.config.get_text_config().use_bidirectional_attention else "causal"

    image_attention_kinds = ("sliding_attention",)  # Gemma 4: full-attention layers stay causal over images

    @property
    def sequence_change_refusal(self):
        cfg = self.config.get_text_config()
        why = []
        if cfg.hidden_size_per_layer_input:
            why.append("every decoder layer adds a per-layer embedding of its token (PLE, a positional input of "
                       "the layer computed for the full sequence)")
        if cfg.num_kv_shared_layers:
            why.append(f"its last {cfg.num_kv_shared_layers} layers reuse the keys / values of earlier layers "
                       f"(computed on the sequence those layers saw)")
        if cfg.use_bidirectional_attention:  # the window's rebuilt masks would make FULL layers bidirectional too
            why.append("its images attend bidirectionally in the sliding layers only, which the masks rebuilt between "
                       "layers do not model")
        return "; ".join(why) or None

    @classmethod
    def load_processor(cls, source: str, config=None, **kwargs):
        """``AutoProcessor`` when it builds (torchvision + the audio feature extractor); else
        :func:`gemma4_image_processor_class`."""
        from transformers import AutoProcessor

        try:
            return AutoProcessor.from_pretrained(source, **kwargs)
        except (OSError, ValueError, ImportError, AttributeError, TypeError) as err:
            try:
                return gemma4_image_processor_class().from_pretrained(source, **kwargs)
            except Exception:
                raise err from None

_IMAGE_ONLY: list = []


def gemma4_image_processor_class():
    """``Gemma4Processor`` for images + text only: its ``__init__`` requires a feature extractor (audio) and a video
    processor (which needs torchvision) and passes everything by keyword, so neither can simply be left out. This
    subclass takes ``image_processor`` / ``tokenizer`` (plus the processor's own settings) by keyword and builds the
    parent with no audio / video part. Saved and loaded as ``Gemma4Processor``."""
    if not _IMAGE_ONLY:
        from transformers import Gemma4Processor
        from transformers.processing_utils import ProcessorMixin

        class _WithoutAudioVideo(ProcessorMixin):  # between Gemma4Processor and ProcessorMixin in the MRO
            def __init__(self, *args, **kwargs):
                for name in ("feature_extractor", "video_processor"):
                    if kwargs.get(name, 0) is None:
                        kwargs.pop(name)
                super().__init__(*args, **kwargs)

        class ImageOnlyGemma4Processor(Gemma4Processor, _WithoutAudioVideo):
            def __init__(self, image_processor=None, tokenizer=None, chat_template=None, image_seq_length: int = 280,
                         audio_seq_length: int = 750, audio_ms_per_token: int = 40, **kwargs):
                Gemma4Processor.__init__(self, feature_extractor=None, image_processor=image_processor,
                                         tokenizer=tokenizer, video_processor=None, chat_template=chat_template,
                                         image_seq_length=image_seq_length, audio_seq_length=audio_seq_length,
                                         audio_ms_per_token=audio_ms_per_token, **kwargs)

        ImageOnlyGemma4Processor.__name__ = ImageOnlyGemma4Processor.__qualname__ = "Gemma4Processor"
        _IMAGE_ONLY.append(ImageOnlyGemma4Processor)
    return _IMAGE_ONLY[0]
