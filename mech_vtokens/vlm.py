"""Loading a multimodal LLM and preparing its inputs: ``load`` -> :class:`VLM`, ``VLM.prepare`` -> :class:`Batch`."""

from __future__ import annotations

import os
from typing import Any

import torch

from .adapters import adapter_class_for
from .errors import InputError, ManyVisualTokensWarning

_REGISTERED = False


def register_remote() -> None:
    """Ship this package's code by value with remote (NDIF) requests: ``nnsight.register("mech_vtokens")`` (cloudpickle
    ships registered packages' submodules too, so ``mech_vtokens.probes`` / ``mech_vtokens.interventions`` travel)."""
    global _REGISTERED
    if _REGISTERED:
        return
    import nnsight

    nnsight.register("mech_vtokens")
    _REGISTERED = True


class Batch:
    """Processed inputs of one batch plus the facts about its visual tokens (computed once, outside the trace).

    - ``inputs``: the processor output, ready for ``vlm.trace(**batch.inputs)``.
    - ``visual_mask`` (batch, seq) bool; ``visual_positions``: (n_visual, 2) [row, position] in that order.
    - ``tokens``: the geometry of every visual token (see ``Geometry``): image, tile, row, col, kind, box (NaN where
      a token has no region), vision/projector rows and weights; ``kinds``: the kind name of every visual token
      ("patch", "thumbnail", "newline", "cls"); ``grids``: the token grid of each image; ``image_sizes``: (width,
      height) of the original images.
    - ``images``: the original images (RGB), in processor order; ``ctx``: the small dict shipped into the trace.
    - ``visual_tokens_per_image``: how many visual tokens each image became (processor order).
    """

    def __init__(self, inputs, visual_mask, tokens, grids, image_sizes, prompts, image_of_row, images=()):
        self.inputs = inputs
        self.images = list(images)  # the original (RGB) images, in processor order: for views
        self.visual_mask = visual_mask
        self.visual_positions = visual_mask.nonzero()
        self.tokens = tokens
        self.grids = grids
        self.image_sizes = image_sizes
        self.prompts = prompts
        self.image_of_row = image_of_row
        n_images = len(self.image_sizes)
        self.visual_tokens_per_image = (torch.bincount(tokens["image"], minlength=n_images).tolist()
                                        if n_images else [])
        self.ctx = {"visual_mask": visual_mask, "attention_mask": inputs.get("attention_mask"),
                    "input_ids": inputs["input_ids"]}

    @property
    def n_visual(self) -> int:
        return int(self.visual_mask.sum())

    @property
    def kinds(self) -> list[str]:
        """The kind of every visual token (``batch.visual_positions`` order): "patch", "thumbnail", "newline" or
        "cls" (``mech_vtokens.adapters.geometry.KINDS``). Select by kind with ``token_sets.Kinds``."""
        from .adapters.geometry import KINDS

        return [KINDS[k] for k in self.tokens["kind"].tolist()]

    def __len__(self) -> int:
        return int(self.visual_mask.shape[0])

    def __repr__(self) -> str:
        return (f"Batch({len(self)} prompts, {len(self.image_sizes)} images, {self.n_visual} visual tokens, "
                f"seq {self.visual_mask.shape[1]})")


class VLM:
    """A loaded multimodal LLM: the nnsight model (``.model``), its HF module (``.hf``), processor and adapter.

    nnsight's API stays reachable: ``vlm.trace``, ``vlm.generate``, ``vlm.session`` and attribute access to envoys
    (``vlm.model.language_model.layers[3]``) delegate to the nnsight ``TransformersModel``.

    ``visual_token_warning`` (default 4096, settable; None turns it off): ``prepare`` warns
    (:class:`~mech_vtokens.errors.ManyVisualTokensWarning`) when one image becomes more visual tokens than this
    (Qwen's real ``max_pixels`` lets a phone photo become ~15k tokens, InternVL up to 3328 per image).
    """

    visual_token_warning: int | None = 4096

    def __init__(self, model, processor, adapter, source: str | None = None):
        self.model = model
        self.hf = model._module
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.adapter = adapter
        self.source = source
        self.geometry = adapter.geometry(adapter, self.hf, processor)

    # ---- nnsight passthrough --------------------------------------------------------------------------------
    # ``vlm.trace`` / ``vlm.generate`` / ``vlm.session`` / envoys resolve to the nnsight model through __getattr__,
    # so nnsight sees the user's own frame (a wrapper frame in between breaks ``with vlm.generate(...)``).

    def __getattr__(self, name):
        if name.startswith("__") or name in ("model", "adapter"):
            raise AttributeError(name)
        return getattr(self.model, name)

    # ---- facts ----------------------------------------------------------------------------------------------
    @property
    def family(self) -> str:
        return self.adapter.family

    @property
    def sites(self) -> list[str]:
        """Every site, in forward order."""
        return self.adapter.site_names

    @property
    def n_layers(self) -> int:
        return self.adapter.n_layers

    @property
    def n_vision_layers(self) -> int:
        return self.adapter.n_vision_layers

    @property
    def embedding_matrix(self) -> torch.Tensor:
        """The LM's INPUT embedding matrix (vocab, d): what EmbedLens compares against."""
        from .component import weight_of

        return weight_of(self.hf.get_input_embeddings())  # real values, also when offloaded (device_map "disk")

    @property
    def embedding_scale(self) -> float:
        """The factor the LM's input embedding module multiplies its rows by (Gemma 3: sqrt(d) in the weights' dtype,
        the adapter's ``embed_scale``; 1.0 for the others): a text token reaches the LM as
        ``embedding_scale * embedding_matrix[id]``. Cosines (EmbedLens, the partition) do not depend on it; norm
        comparisons with text tokens do (:meth:`input_embedding_norms`)."""
        from .adapters.base import _resolve

        path = self.adapter.embed_scale
        if path is None:
            return 1.0
        scale = _resolve(self.hf, path)
        dtype = self.embedding_matrix.dtype
        return float(torch.as_tensor(scale).to(dtype)) if isinstance(scale, torch.Tensor) else float(scale)

    def input_embedding_norms(self) -> torch.Tensor:
        """(vocab,) float32: the L2 norm of every text token's row AS THE LM RECEIVES IT (``embedding_scale`` applied):
        what a visual token's norm at ``hook_embed`` compares with."""
        E = self.embedding_matrix.detach()
        norms = torch.cat([E[s:s + 8192].float().norm(dim=1) for s in range(0, E.shape[0], 8192)])
        return (norms * self.embedding_scale).cpu()

    @property
    def final_norm(self) -> torch.nn.Module:
        from .adapters.base import _resolve

        return _resolve(self.hf, self.adapter.final_norm)

    @property
    def unembed(self) -> torch.nn.Module:
        from .adapters.base import _resolve

        return _resolve(self.hf, self.adapter.lm_head)

    @property
    def image_placeholder(self) -> str:
        """The whole text span a prompt holds per image (LLaVA ``<image>``; Qwen
        ``<|vision_start|><|image_pad|><|vision_end|>``; InternVL ``<IMG_CONTEXT>``, wrapped in ``<img>..</img>`` by
        its processor). :meth:`prompt` writes it for you."""
        return self.adapter.image_placeholder(self.processor)

    def prompt(self, question: str, n_images: int = 1, system: str | None = None) -> str:
        """A prompt for this model asking ``question`` about ``n_images`` images (``system``: optional system text).

        Built by the processor's chat template (one user turn: the images, then the question; the assistant turn
        opened), so it is what the checkpoint was trained on. A checkpoint without a template gets the plain format
        ``"[system ]<span> ... <span> question"`` (``<span>`` = :attr:`image_placeholder`).
        """
        if not isinstance(question, str):
            raise InputError(f"question is a {type(question).__name__}, not a string; pass the question text")
        if not isinstance(n_images, int) or isinstance(n_images, bool) or n_images < 0:
            raise InputError(f"n_images={n_images!r}: give the number of images (0 or more) the prompt is about")
        if system is not None and not isinstance(system, str):
            raise InputError(f"system={system!r}: give the system text as a string (or None for none)")
        if getattr(self.processor, "chat_template", None):
            parts = system if self.adapter.system_content_is_text else [{"type": "text", "text": system}]
            messages = [{"role": "system", "content": parts}] if system else []
            content = [{"type": "image"}] * n_images + [{"type": "text", "text": question}]
            messages.append({"role": "user", "content": content})
            return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return " ".join(([system] if system else []) + [self.image_placeholder] * n_images + [question])

    def check_remote(self, remote) -> None:
        """Raise before any work if ``remote`` is not a backend, or ``remote=True`` cannot work for this model."""
        from .placement import check_remote_value

        check_remote_value(remote)
        if remote is True:
            if self.source is None or os.path.isdir(str(self.source)):
                raise InputError(
                    "remote=True needs a model that NDIF can load by its hub id, but this model was loaded "
                    f"{'from a local directory' if self.source else 'from an in-memory module'}; load it with "
                    "mech_vtokens.load('<org>/<name>') or use remote='local' to simulate the remote path here")

    # ---- inputs ---------------------------------------------------------------------------------------------
    def _check_prompt_row(self, row, ims, text, ph, token):
        """prepare's checks of one prompt and its images (raise InputError)."""
        from PIL import Image

        if not isinstance(text, str):
            raise InputError(f"prompt {row} is a {type(text).__name__}, not a string")
        n_ph = text.count(ph)
        bare = text.count(token) - n_ph * ph.count(token)
        if bare:
            raise InputError(f"prompt {row} holds the image token {token!r} {bare} time(s) outside the whole "
                             f"image span {ph!r}: write the span once per image, or build the prompt with "
                             f"vlm.prompt(question, n_images=...)")
        for im in ims:
            if not isinstance(im, Image.Image):
                raise InputError(f"prompt {row}: images must be PIL images, got {type(im).__name__}; open files "
                                 f"with PIL.Image.open(path).convert('RGB')")
        if n_ph != len(ims):
            if n_ph == 0 and ims:
                fix = (f"put the image placeholder {ph!r} in the prompt where the image goes, or build it with "
                       f"vlm.prompt(question, n_images={len(ims)})")
            elif not ims:
                fix = f"pass an image for each of its {n_ph} placeholder(s), or remove them"
            else:
                fix = "use exactly one placeholder per image"
            raise InputError(f"prompt {row} has {n_ph} image placeholder(s) {ph!r} but {len(ims)} image(s): {fix}")
        limit = self.adapter.max_images_per_prompt
        if limit is not None and len(ims) > limit:
            raise InputError(f"prompt {row} has {len(ims)} images but the {self.family} family takes at most "
                             f"{limit} per prompt; split them over several prompts")

    def prepare(self, images, prompts, **processor_kwargs) -> Batch:
        """Validate and process images + prompts into a :class:`Batch` (one processor call for the whole batch).

        ``images``: a PIL image, a list with one image per prompt, or a list of lists (several images per prompt;
        each prompt holds one placeholder per image). ``prompts``: a string or a list of strings; each must contain
        the image placeholder (the whole span ``vlm.image_placeholder``) once per image: ``vlm.prompt(question,
        n_images)`` builds such prompts. ``batch.visual_tokens_per_image`` reports what each image became; above
        ``vlm.visual_token_warning`` tokens it warns, naming the processor setting that caps it.
        """
        from .data import image_lists

        prompts = _prompt_list(prompts)
        self._check_processor_kwargs(processor_kwargs)
        images = image_lists(images, len(prompts))  # the ONE conversion (mech_vtokens.data.to_rgb)
        if len(images) != len(prompts):
            raise InputError(f"got {len(images)} image entries for {len(prompts)} prompts; pass one image (or one "
                             f"list of images) per prompt")
        ph = self.image_placeholder
        token = self.adapter.image_token(self.processor)
        flat, image_of_row = [], []
        for row, (ims, text) in enumerate(zip(images, prompts)):
            self._check_prompt_row(row, ims, text, ph, token)
            flat.extend(ims)  # already RGB: image_lists converted each one (data.to_rgb)
            image_of_row.extend([row] * len(ims))
        kwargs = {"padding": True, **processor_kwargs, "text": list(prompts), "return_tensors": "pt"}
        tok = self.tokenizer
        bos = getattr(tok, "bos_token", None)
        if ("add_special_tokens" not in kwargs and bos and all(p.startswith(bos) for p in prompts)
                and tok("")["input_ids"][:1] == [tok.bos_token_id]):  # the chat template wrote the BOS (Gemma 3):
            kwargs["add_special_tokens"] = False  # not twice, as HF's own apply_chat_template(tokenize=True) does
        if flat:  # nested per prompt where the family's processor wants it: one list per prompt, empty for a prompt
            # without images (Idefics3 / SmolVLM match the lists to the prompts one to one; OneVision skips empties)
            kwargs["images"] = flat if not self.adapter.images_nested else [
                [im for im, r in zip(flat, image_of_row) if r == row] for row in range(len(prompts))]
        try:
            inputs = dict(self.processor(**kwargs))
        except (ValueError, TypeError, KeyError) as err:  # the processor refused an option or an input
            opts = f" with processor options {processor_kwargs}" if processor_kwargs else ""
            raise InputError(f"the processor ({type(self.processor).__name__}) refused these inputs{opts}: "
                             f"{type(err).__name__}: {err}; fix the option (see the processor's documentation) or "
                             f"the image / prompt it names") from None
        dtype = self.hf.dtype
        if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
            inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        mask = self.adapter.visual_mask(inputs["input_ids"])
        sizes = [im.size for im in flat]
        tokens = self.geometry.tokens(inputs, sizes, processor_kwargs) if flat else self.geometry.empty()
        if len(tokens["image"]) != int(mask.sum()):
            raise InputError(f"the processor produced {int(mask.sum())} image-token positions but the geometry of "
                             f"the {self.family} adapter expects {len(tokens['image'])}; the processor does not "
                             f"match the model (load both from the same checkpoint)")
        grids = self.geometry.grids(inputs, sizes, processor_kwargs) if flat else []
        batch = Batch(inputs, mask, tokens, grids, sizes, list(prompts), image_of_row, flat)
        limit = self.visual_token_warning
        big = [(i, n) for i, n in enumerate(batch.visual_tokens_per_image) if limit is not None and n > limit]
        if big:
            knob = self.adapter.image_size_knob
            import warnings

            warnings.warn(
                f"{len(big)} image(s) became more than vlm.visual_token_warning = {limit} visual tokens each "
                f"({', '.join(f'image {i} ({sizes[i][0]}x{sizes[i][1]} px): {n}' for i, n in big)}); every probe and "
                f"forward pays for each token. "
                + (f"Cap it with the processor setting {knob}, or resize the image." if knob
                   else "Resize the image.")
                + " Raise vlm.visual_token_warning (None: off) to silence this.", ManyVisualTokensWarning,
                stacklevel=2)
        return batch

    _RESERVED = {"text": "prompts", "images": "images", "return_tensors": None}

    def _check_processor_kwargs(self, processor_kwargs) -> None:
        """prepare's processor options: not the ones prepare sets itself, and each one this processor takes (it
        would ignore an unknown one, a typo such as ``max_pixel=``, with only a log line)."""
        for key, arg in self._RESERVED.items():
            if key in processor_kwargs:
                raise InputError(f"processor option {key}= is set by prepare itself"
                                 + (f"; pass it as prepare's {arg} argument" if arg else " (PyTorch tensors)"))
        valid = _processor_keywords(self.processor)
        unknown = [k for k in processor_kwargs if valid is not None and k not in valid]
        if unknown:
            import difflib

            close = difflib.get_close_matches(unknown[0], sorted(valid), n=1)
            raise InputError(f"processor option {unknown[0]}= is not one {type(self.processor).__name__} takes (it "
                             f"would be ignored)" + (f"; did you mean {close[0]}=?" if close else "")
                             + f" Its options: {', '.join(sorted(valid)[:40])}")

    def experiment(self, batch: Batch, probes=(), interventions=()):
        from .experiment import Experiment

        return Experiment(self, batch, probes, interventions)

    def __repr__(self) -> str:
        return f"VLM({self.source or type(self.hf).__name__}, {self.adapter!r})"


def _prompt_list(prompts) -> list:
    """prepare's ``prompts`` as a non-empty list of strings (InputError naming the fix otherwise)."""
    if isinstance(prompts, str):
        return [prompts]
    if prompts is None or isinstance(prompts, (bytes, int, float)) or not hasattr(prompts, "__iter__"):
        raise InputError(f"prompts={prompts!r}: give a prompt string or a list of them (vlm.prompt(question) builds "
                         f"one)")
    prompts = list(prompts)
    if not prompts:
        raise InputError("prompts=[]: give at least one prompt (vlm.prompt(question) builds one)")
    return prompts


def _processor_keywords(processor):
    """Every keyword ``processor(...)`` takes (its ProcessingKwargs, per modality and flat, and its sub-processors'
    ``valid_kwargs``), as transformers' ``_merge_kwargs`` reads them; None where that cannot be told."""
    try:
        typed = processor.valid_processor_kwargs
        valid = {"text", "images", "videos", "audio", "common_kwargs"}
        for key, sub in typed.__annotations__.items():
            valid.add(key)
            valid.update(getattr(sub, "__annotations__", {}))
        for attr in ("tokenizer", "image_processor", "feature_extractor", "video_processor"):
            valid.update(getattr(getattr(getattr(processor, attr, None), "valid_kwargs", None), "__annotations__",
                                 {}))
        return valid
    except Exception:  # noqa: BLE001 - a processor of another shape: no check rather than a wrong one
        return None


def load(model: Any, processor: Any = None, *, dtype: Any = None, device_map: Any = None,
         attn_implementation: str | None = None, **hf_kwargs) -> VLM:
    """Load a supported multimodal LLM as a :class:`VLM`.

    ``model``: an HF hub id, a local directory (``save_pretrained`` output), or an in-memory
    ``*ForConditionalGeneration`` (then pass its ``processor`` too). ``dtype`` / ``device_map`` (e.g. ``"auto"``
    for several GPUs) / ``attn_implementation`` and any other keyword pass through to ``from_pretrained``.
    A layout check runs at load and proves every declared site exists.
    """
    from nnsight import TransformersModel
    from transformers import AutoConfig, PreTrainedModel

    from .placement import check_hf_kwargs, check_load_args, check_processor_arg

    dtype = check_load_args(dtype, device_map, attn_implementation, hf_kwargs)  # before any weight is read
    kwargs = dict(hf_kwargs)
    if dtype is not None:
        kwargs["dtype"] = dtype
    if device_map is not None:
        kwargs["device_map"] = device_map
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if isinstance(model, PreTrainedModel):
        adapter_cls = adapter_class_for(model.config)
        adapter_cls.check_config(model.config)
        check_processor_arg(processor)
        if processor is None:
            raise InputError("an in-memory model needs its processor: mech_vtokens.load(model, processor)")
        if attn_implementation is not None:
            model.set_attn_implementation(attn_implementation)
        hf, source = model, None
        nn_model = None
    elif isinstance(model, (str, os.PathLike)):
        source = str(model)
        try:
            config = AutoConfig.from_pretrained(source)
        except OSError as err:
            raise InputError(f"cannot load a config from {source!r}: give a hub id that is reachable or a local "
                             f"directory written by save_pretrained ({err})") from None
        adapter_cls = adapter_class_for(config)
        adapter_cls.check_config(config)  # a variant the family cannot serve: refused before any weight is read
        check_processor_arg(processor)
        check_hf_kwargs(hf_kwargs, config)
        if processor is None:
            from .placement import load_processor

            processor = load_processor(adapter_cls, source, config)  # missing / broken files: InputError naming them
        # nnsight loads the weights itself from the id, so remote runs get the right model key.
        nn_model = TransformersModel(source, task="image-text-to-text", processor=processor, dispatch=True,
                                     **kwargs)
        hf = nn_model._module.eval()
    else:
        raise InputError(f"load() takes a hub id, a local directory or a *ForConditionalGeneration module, not "
                         f"{type(model).__name__}")
    adapter = adapter_cls(hf)
    adapter.check_processor(processor)
    if nn_model is None:
        nn_model = TransformersModel(hf, task="image-text-to-text", processor=processor)
    register_remote()  # harmless locally; lets any trace of this model run with remote=True / "local"
    vlm = VLM(nn_model, processor, adapter, source)
    from .layout import check_layout

    check_layout(vlm)
    return vlm
