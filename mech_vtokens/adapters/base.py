"""The adapter contract: what a model family declares, and the behaviour every family shares.

A family file (``llava.py``, ``qwen2_vl.py``, ...) is a subclass of :class:`Adapter` that is mostly declarations:
module paths, how the image features reach the LM, its patch geometry. Everything computed from those declarations
(the site table in forward order, visual positions, the layout check, processor loading) lives here, once.
See ``docs/DESIGN.md``.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from ..errors import InputError
from .geometry import Geometry

# Per decoder layer, in forward order: (site suffix, module path relative to the layer, accessor kind, index).
# "input" = the module's first input; "output" with an index = that element of a tuple output; "kwarg" = one keyword
# input; "inputs" = the whole (args, kwargs) pair (sites ``lm.hook_inputs``, ``blocks.{i}.hook_inputs``).
_BLOCK_SITES = (
    ("hook_inputs", "", "inputs", None),
    ("hook_resid_pre", "", "input", None),
    ("attn.hook_pattern", "{attn}.{pattern}", "output", None),
    ("hook_attn_out", "{attn}", "output", 0),
    ("hook_resid_mid", "{ln2}", "input", None),
    ("hook_mlp_out", "{mlp}", "output", None),
    ("hook_resid_post", "", "output", None),
)
BLOCK_SITE_NAMES = tuple(s[0] for s in _BLOCK_SITES)
# Block sites for interventions only, resolvable by name but NOT listed in ``site_names`` / ``vlm.sites`` (so code that
# reads every listed site still gets residual-stream tensors): ``hook_inputs`` is a decoder layer's (args, kwargs)
# (hidden_states + attention_mask / position_embeddings / position_ids ...: what VisualEntry / VisualExit change);
# ``attn.hook_pattern`` is the post-softmax attention weights (batch, heads, query, key) inside eager attention,
# reachable only in an nnsight trace (``.source``) of a model loaded with ``attn_implementation="eager"``.
HIDDEN_BLOCK_SITES = ("hook_inputs", "attn.hook_pattern")
# The accessor kind of a site between two decoder layers whose value is a vector ADDED to the residual stream there
# (Qwen3-VL's DeepStack): see ``Adapter.injection`` and ``mech_vtokens.sites``.
ADDEND = "addend"


class Adapter:
    """What one model family declares. Subclasses set the class attributes; nothing else in the project branches
    on the family.

    Declarations (all paths are attribute paths from the ``*ForConditionalGeneration`` root):

    - ``family``: short name; ``model_types``: the ``config.model_type`` values it serves.
    - ``vision_layers``: the ModuleList of vision-encoder blocks; ``vision_layer_output_index``: tuple index of a
      block's output (None when it returns a tensor).
    - ``projector``: the module whose output is the projected image features (native order).
    - ``language_model``: the decoder stack that receives ``inputs_embeds``; ``decoder_layers``: its ModuleList;
      ``attn`` / ``mlp`` / ``ln2``: paths inside a decoder layer; ``final_norm``; ``lm_head``.
    - ``geometry``: a :class:`~mech_vtokens.adapters.geometry.Geometry` subclass (patch grid, tiles, merge).
    - ``processor_class``: the processor class to build when ``AutoProcessor`` cannot (video parts need
      torchvision); ``processor_kwargs_from_config``: processor settings taken from the model config.
    - ``block_sites``: the sites of one decoder layer; ``injection`` / ``injection_layers``: vectors the model adds
      to the residual stream between layers (site ``blocks.{i}.<suffix>``); ``lm_token_kwargs``: per-token LM inputs
      sequence-changing interventions slice. Defaults: the four-site layer, no injection, none.
    """

    family: str = ""
    model_types: tuple = ()
    vision_layers: str = ""
    vision_layer_output_index: int | None = None
    projector: str = ""
    language_model: str = "model.language_model"
    decoder_layers: str = "model.language_model.layers"
    attn: str = "self_attn"
    mlp: str = "mlp"
    ln2: str = "post_attention_layernorm"
    final_norm: str = "model.language_model.norm"
    lm_head: str = "lm_head"
    # The LM's rotary embedding module; the softmax inside eager attention as an nnsight ``.source`` path from the
    # attention module (site ``blocks.{i}.attn.hook_pattern``).
    rotary_emb: str = "model.language_model.rotary_emb"
    # The LM's position ids: "rope" = (batch, seq); "mrope" = multimodal RoPE, one id per axis (t, h, w) stacked in
    # front: (3, batch, seq) (Qwen). Interventions that change the sequence read this, never the tensor's shape.
    rope: str = "rope"
    attn_pattern: str = "source.attention_interface_1.source.nn_functional_softmax_0"
    # The sites of one decoder layer, in forward order (suffix, module path relative to the layer with the
    # placeholders {attn} {mlp} {ln2} {pattern}, accessor kind, index): every layer of the family has these.
    block_sites: tuple = _BLOCK_SITES
    # Decoder layers of another kind (the text config's ``layer_types`` entry of the layer): kind -> the sites of a
    # layer of that kind, in the format of ``block_sites`` (Qwen3.5's "linear_attention" layers mix tokens with a gated
    # delta net: no attention pattern, the mixer's output a tensor). A kind not listed has ``block_sites``. Default:
    # every layer alike.
    block_sites_by_kind: dict = {}
    # Vectors ADDED to the residual stream between decoder layers, outside any module (Qwen3-VL DeepStack:
    # ``hidden[visual_pos_masks] += deepstack_visual_embeds[i]`` after layer i, for the first few layers): None, or
    # (site suffix, the LM kwarg holding one packed (positions, d) tensor per layer, the LM kwarg holding the
    # (batch, seq) bool mask of the positions they are added at). ``injection_layers`` says after which layers.
    injection: tuple | None = None
    # Per-token inputs of the LM call besides inputs_embeds / attention_mask / position_ids, which an intervention
    # that changes the sequence (Prune, VisualEntry / VisualExit) must change with it: kwarg -> "seq" (a (batch, seq,
    # ...) tensor, gathered along the sequence) or ("rows", mask kwarg) (packed rows at the True positions of that
    # mask, row-major; one tensor or a list of them). Qwen3-VL: its DeepStack mask and vectors.
    lm_token_kwargs: dict = {}
    geometry: type[Geometry] = Geometry
    processor_class: str = ""
    # The processor attribute (dotted path) holding the model's image token id (the visual positions): Gemma 3's
    # ``processor.image_token_id`` is its START-of-image token, the soft image token is ``tokenizer.image_token_id``.
    processor_image_token: str = "image_token_id"
    # How the visual tokens of one image attend to each other: "causal" (like text), or "bidirectional" (every
    # token of an image sees every other token of that image, text stays causal: Gemma 3). Sequence-changing
    # interventions rebuild the masks of that kind (``mech_vtokens.sequence``).
    image_attention: str = "causal"
    # The LM's rotary module takes the layer's attention kind as a third argument (Gemma 3: one rope per kind).
    rotary_takes_kind: bool = False
    # Path (from the root) of the factor the input embedding module multiplies its rows by (Gemma: sqrt(d)), or
    # None: ``vlm.embedding_scale`` / ``vlm.input_embedding_norms()`` (norm comparisons with the LM's text inputs).
    embed_scale: str | None = None
    # The chat template prints a system message's content as is (GLM-4.1V: ``{{ msg.content }}``), so ``vlm.prompt``
    # hands it the system text as a string; False: as a list of content parts (what most templates index into).
    system_content_is_text: bool = False
    # ---- Gemma 4 declarations (defaults: what every other family does) ----------------------------------------
    # Config path of a cap the model applies to its logits after ``lm_head`` (``cap * tanh(logits / cap)``, outside
    # any module: Gemma 4's ``final_logit_softcapping``), or None. Every computation of logits from a hidden state
    # (LogitLens, ``attribution.logit_diff_of``) applies it: ``logit_softcap_value()``.
    logit_softcap: str | None = None
    # Where ``unembed.hook_out`` is read: (module path, accessor kind, index); None = the ``lm_head`` output. Gemma 4:
    # the root output's ``logits`` (after the cap), so the site IS the model's logits.
    unembed_site: tuple | None = None
    # The attention kinds whose mask is bidirectional within an image when ``image_attention == "bidirectional"``
    # (Gemma 3: both; Gemma 4: sliding layers only).
    image_attention_kinds: tuple = ("full_attention", "sliding_attention")
    # Why this model cannot change the sequence BETWEEN decoder layers (VisualEntry / VisualExit refuse, naming it),
    # or None (they can).
    sequence_change_refusal: str | None = None
    # HF ``generate`` kwargs ``mech_vtokens.generate`` sets (unless given) so its prefill runs every layer on the
    # whole prompt, as the one traced forward its probes stand for: Gemma 4 {"logits_to_keep": 0} (with 1, HF's
    # default, its KV-shared layers compute the last position only).
    generate_defaults: dict = {}

    @classmethod
    def check_config(cls, config) -> None:
        """Raise a clear ``InputError`` for a config of this model type that the family cannot serve (e.g. a variant
        without a vision encoder); ``mech_vtokens.load`` calls it before any weight is read. Default: every config."""

    def logit_softcap_value(self) -> float | None:
        """The logit cap of this model (``logit_softcap``), or None."""
        return None if self.logit_softcap is None else _resolve_or_none(self.config, self.logit_softcap)

    def __init__(self, hf_model: torch.nn.Module):
        self.config = hf_model.config
        self._require_declared_modules(hf_model)
        self.n_layers = len(_resolve(hf_model, self.decoder_layers))
        self.n_vision_layers = len(_resolve(hf_model, self.vision_layers))
        self.d_model = _resolve(hf_model, self.lm_head).in_features
        self.image_token_id = int(self.image_token_id_of(self.config))
        self._sites = self._site_table()

    def _require_declared_modules(self, hf_model) -> None:
        """InputError, before any work, when a module the adapter counts or reads is not where it declares it: a
        checkpoint of a served model_type with another layout (LLaVA with a Pixtral tower keeps its blocks at
        ``vision_tower.transformer.layers``, not CLIP's ``encoder.layers``), or a module transformers moved."""
        for what, path in (("vision blocks", self.vision_layers), ("decoder layers", self.decoder_layers),
                           ("projector", self.projector), ("unembedding", self.lm_head)):
            if _resolve_or_none(hf_model, path) is None:
                vision = getattr(getattr(self.config, "vision_config", None), "model_type", None)
                raise InputError(
                    f"this {type(hf_model).__name__} (model_type {self.config.model_type!r}, vision tower "
                    f"{vision!r}) has no {what} at {path!r}, where the {self.family} adapter declares them: a layout "
                    f"no adapter serves (or a module transformers moved: then update "
                    f"mech_vtokens/adapters/{self.family}.py)")

    def injection_layers(self) -> range:
        """The decoder layers after which ``injection`` adds its vectors (none by default)."""
        return range(0)

    # ---- declarations with a default -------------------------------------------------------------------------
    @staticmethod
    def image_token_id_of(config) -> int:
        """The id that marks visual positions in ``input_ids``."""
        return config.image_token_id

    # ---- sites ----------------------------------------------------------------------------------------------
    def _site_table(self) -> dict:
        """name -> (order, module path, accessor kind, index), in forward order."""
        rows = []
        vidx = self.vision_layer_output_index
        for i in range(self.n_vision_layers):
            rows.append((f"vision.blocks.{i}.hook_resid_post", f"{self.vision_layers}.{i}", "output", vidx))
        rows.append(("vision_projector.hook_out", self.projector, "output", None))
        rows.append(("hook_embed", self.language_model, "kwarg", "inputs_embeds"))
        # The LM call's whole (args, kwargs): for interventions that change the sequence itself (pruning, entry).
        rows.append(("lm.hook_inputs", self.language_model, "inputs", None))
        for i in range(self.n_layers):
            layer = f"{self.decoder_layers}.{i}"
            for name, rel, kind, index in self.block_sites_of(i):
                rel = rel.format(attn=self.attn, ln2=self.ln2, mlp=self.mlp, pattern=self.attn_pattern)
                rows.append((f"blocks.{i}.{name}", f"{layer}.{rel}" if rel else layer, kind, index))
            if i in self.injection_layers():
                rows.append(self._injection_row(i))
        rows.append(("ln_final.hook_normalized", self.final_norm, "output", None))
        rows.append(("unembed.hook_out", *(self.unembed_site or (self.lm_head, "output", None))))
        return {name: (order, path, kind, index) for order, (name, path, kind, index) in enumerate(rows)}

    def _injection_row(self, i: int) -> tuple:
        """The site of the vector injected after decoder layer ``i``: it READS the next module's input (layer i + 1,
        or the final norm after the last layer) and is a (batch, seq, d) addend, zero away from the injected
        positions: ``resid_pre[i + 1] = resid_post[i] + addend`` exactly (the same elementwise add the model does).
        The packed vectors and their mask are taken from the LM call's kwargs (site ``lm.hook_inputs``), the
        residual it is added to from ``blocks.{i}.hook_resid_post``; writing it replaces what the model adds."""
        suffix, rows_kwarg, mask_kwarg = self.injection
        nxt = f"{self.decoder_layers}.{i + 1}" if i + 1 < self.n_layers else self.final_norm
        index = (f"blocks.{i}.hook_resid_post", "lm.hook_inputs", rows_kwarg, i, mask_kwarg)
        return (f"blocks.{i}.{suffix}", nxt, ADDEND, index)

    @property
    def block_site_names(self) -> tuple:
        """Every block-site suffix of this family (intervention-only ones included; of every layer kind), the
        injection's last."""
        names = [s[0] for s in self.block_sites]
        names += [s[0] for sites in self.block_sites_by_kind.values() for s in sites if s[0] not in names]
        return tuple(dict.fromkeys(names)) + ((self.injection[0],) if self.injection else ())

    # ---- layer kinds (block_sites_by_kind) -------------------------------------------------------------------
    def layer_kind(self, i: int) -> str:
        """Decoder layer ``i``'s kind: the text config's ``layer_types[i]`` ("full_attention" where it has none)."""
        kinds = getattr(self.config.get_text_config(), "layer_types", None)
        return kinds[i] if kinds else "full_attention"

    def block_sites_of(self, i: int) -> tuple:
        """The sites of decoder layer ``i`` (``block_sites_by_kind`` of its kind, else ``block_sites``)."""
        return self.block_sites_by_kind.get(self.layer_kind(i), self.block_sites)

    def layers_with(self, hook: str) -> list[int]:
        """The decoder layers that have the block site ``hook`` (e.g. "attn.hook_pattern")."""
        return [i for i in range(self.n_layers) if any(s[0] == hook for s in self.block_sites_of(i))]

    @property
    def site_names(self) -> list[str]:
        """Every site of this model, in forward order (TransformerLens-style names); without the intervention-only
        block sites (``HIDDEN_BLOCK_SITES``), which ``site()`` still resolves."""
        return [n for n in self._sites if n.split(".", 2)[-1] not in HIDDEN_BLOCK_SITES or not n.startswith("blocks.")]

    def site(self, name: str) -> tuple:
        """(order, module path, accessor kind, index) of a site; a clear error for unknown names."""
        if name in self._sites:
            return self._sites[name]
        m = re.fullmatch(r"(vision\.)?blocks\.(-?\d+)\.([\w.]+)", name)
        if m:
            vision, layer, hook = m.group(1), int(m.group(2)), m.group(3)
            n = self.n_vision_layers if vision else self.n_layers
            if layer < 0 and -n <= layer:
                return self.site(name.replace(f"blocks.{layer}.", f"blocks.{layer + n}.", 1))
            if not 0 <= layer < n:
                raise InputError(
                    f"site {name!r}: layer {layer} is out of range; this {self.family} model has {n} "
                    f"{'vision' if vision else 'decoder'} layers (use 0..{n - 1}, or a negative index from the end)")
            if not vision and self.layers_with(hook) and 0 <= layer < n:  # another kind of decoder layer has it
                raise InputError(
                    f"site {name!r}: decoder layer {layer} of this {self.family} model is a "
                    f"{self.layer_kind(layer)!r} layer, which has no {hook!r}; the layers that have it: "
                    f"{self.layers_with(hook)}")
            if not vision and self.injection and hook == self.injection[0]:
                raise InputError(f"site {name!r}: the {self.family} model adds {hook!r} vectors only after decoder "
                                 f"layers {list(self.injection_layers())} (blocks.{{i}}.{hook} for those i)")
            valid = ["hook_resid_post"] if vision else [h for h in self.block_site_names
                                                         if h not in HIDDEN_BLOCK_SITES]
            extra = "" if vision else f" (for interventions also: {', '.join(HIDDEN_BLOCK_SITES)})"
            raise InputError(f"site {name!r}: the {self.family} adapter has no hook {hook!r} per "
                             f"{'vision ' if vision else ''}block; valid hooks: {', '.join(valid)}{extra}")
        raise InputError(
            f"unknown site {name!r} for a {self.family} model. Valid sites: 'vision.blocks.{{i}}.hook_resid_post', "
            f"'vision_projector.hook_out', 'hook_embed', 'blocks.{{i}}.{{{','.join(self.block_site_names)}}}', "
            f"'ln_final.hook_normalized', 'unembed.hook_out' (vlm.sites lists them all)")

    def canonical(self, name: str) -> str:
        """The site's name with negative layer indices resolved."""
        order = self.site(name)[0]
        return next(n for n, row in self._sites.items() if row[0] == order)

    def parse_site(self, name: str):
        """The site's (name, tower, kind, layer, hook) after resolving negative indices: the one parser
        (:func:`mech_vtokens.site_names.parse_site`, which documents the ``layer`` convention)."""
        from ..site_names import parse_site

        return parse_site(self.canonical(name), self.n_layers)

    @property
    def forward_order(self) -> list[str]:
        """Every site name, intervention-only block sites included, in forward order: what orders a table's
        ``site`` column (:func:`mech_vtokens.site_names.site_column`)."""
        return list(self._sites)

    # ---- visual tokens --------------------------------------------------------------------------------------
    def visual_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(batch, seq) bool: True at visual positions (``input_ids == image_token_id``; padding-aware by
        construction)."""
        return input_ids == self.image_token_id

    # ---- processor ------------------------------------------------------------------------------------------
    # Processor settings that must agree with the model config: processor kwarg -> config attribute.
    processor_kwargs_from_config: dict = {}

    @classmethod
    def load_processor(cls, source: str, config=None, **kwargs):
        """``AutoProcessor`` when it works; else this family's processor without its video part. Settings listed
        in ``processor_kwargs_from_config`` are then taken from the model config."""
        from transformers import AutoProcessor

        try:
            processor = AutoProcessor.from_pretrained(source, **kwargs)
        except (OSError, ValueError, ImportError, AttributeError) as err:
            if not cls.processor_class:
                raise
            import transformers

            from .components import videoless

            try:
                processor = videoless(getattr(transformers, cls.processor_class)).from_pretrained(source, **kwargs)
            except Exception:
                raise err from None
        for attr, config_attr in cls.processor_kwargs_from_config.items():
            if config is not None and getattr(config, config_attr, None) is not None:
                setattr(processor, attr, getattr(config, config_attr))
        return processor

    def check_processor(self, processor) -> None:
        """Raise if ``processor`` does not belong to this model (its image token is not the model's)."""
        tok = getattr(processor, "tokenizer", None)
        if tok is None or not hasattr(processor, "image_processor"):
            raise InputError(f"the processor {type(processor).__name__} has no tokenizer or image processor; pass "
                             f"the multimodal processor of this checkpoint (AutoProcessor.from_pretrained(<same id>))")
        pid = _resolve_or_none(processor, self.processor_image_token)
        if pid is not None and int(pid) != self.image_token_id:
            raise InputError(
                f"the processor does not match the model: its image token id (processor.{self.processor_image_token})"
                f" is {pid} but the model's config.image_token_id is {self.image_token_id}; load the processor from "
                f"the same checkpoint")
        # Tokens beyond the vocabulary are refused unless neither the image nor the text path can emit them. The
        # one known case: a named VIDEO token the processor needs to exist (InternVLProcessor reads
        # ``tokenizer.video_token``; transformers 5 adds ``<video>`` to InternVL3-hf tokenizers, one past the
        # vocabulary). ``prepare`` never passes videos, so the image/text path never emits it. Any other id past the
        # vocabulary (or an image token past it) means the processor belongs to another checkpoint.
        vocab = self.config.get_text_config().vocab_size
        unused = {getattr(processor, a, None) for a in ("video_token", "video_token_id")} - {None}
        unused = {tok.convert_tokens_to_ids(t) if isinstance(t, str) else int(t) for t in unused}
        beyond = [i for i in range(vocab, len(tok)) if i not in unused]
        if beyond or self.image_token_id >= vocab:
            raise InputError(f"the processor does not match the model: its tokenizer has {len(tok)} tokens (ids "
                             f"{beyond[:5]}{'...' if len(beyond) > 5 else ''} past the end) but the model's "
                             f"vocabulary has {vocab}; load the processor from the same checkpoint")

    def image_token(self, processor) -> str:
        """The text of the token that marks visual positions (what the processor expands per image)."""
        return getattr(processor, "image_token", None) or processor.tokenizer.decode([self.image_token_id])

    def image_placeholder(self, processor) -> str:
        """The WHOLE span a user writes in a prompt where one image goes (``image_span`` around the image token)."""
        return self.image_span.format(image=self.image_token(processor))

    def lm_vision_layer(self) -> int:
        """The vision block (index into ``vision_layers``) whose output the LM receives: the config's
        ``vision_feature_layer_key`` (an ``output_hidden_states`` index: entry 0 is the embeddings, so a
        non-negative ``i`` is block ``i - 1``), or the last block when the family declares no key."""
        if self.vision_feature_layer_key is None:
            return self.n_vision_layers - 1
        layer = getattr(self.config, self.vision_feature_layer_key, None)
        if not isinstance(layer, int) or layer == 0 or not -self.n_vision_layers <= layer <= self.n_vision_layers:
            raise InputError(f"config.{self.vision_feature_layer_key} = {layer!r} names no single vision block of "
                             f"this {self.family} model; give the vision layer explicitly (e.g. ViTSinks(layer=-1))")
        return layer - 1 if layer > 0 else layer + self.n_vision_layers

    # The span of one image in a prompt, ``{image}`` = the image token (Qwen wraps it in vision start/end tokens).
    image_span: str = "{image}"
    # The processor setting that caps the visual tokens of one image, as a user would write it (None: fixed count).
    image_size_knob: str | None = None
    # The config key naming the vision layer the LM receives (an output_hidden_states index); None: the last block.
    vision_feature_layer_key: str | None = "vision_feature_layer"

    max_images_per_prompt: int | None = None
    # The processor takes the images nested per prompt (a list of lists), e.g. OneVision, whose image processor
    # decides from it whether an image is tiled (single-image prompts) or not (multi-image prompts).
    images_nested: bool = False
    # BOS sink channels (``SinkChannels(dims=<preset>)``): preset name -> the LM channels that carry the massive
    # activations, per checkpoint (or the LM it was trained from) of this family. Probes only look presets up here.
    sink_dims: dict = {}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(family={self.family!r}, decoder_layers={self.n_layers}, "
                f"vision_layers={self.n_vision_layers}, d_model={self.d_model})")


def _resolve_or_none(root: Any, path: str) -> Any:
    """``_resolve`` that returns None where an attribute on the path is missing (or None)."""
    try:
        return _resolve(root, path)
    except (AttributeError, IndexError):
        return None


def _resolve(root: Any, path: str) -> Any:
    """Follow a dotted attribute path; integer parts index into ModuleLists."""
    obj = root
    for part in path.split(".") if path else []:
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj
