"""The contract every probe and intervention implements.

A component is a small object that says which sites it needs and what it does there. The runner collects the sites
of every component, sorts them in forward order, and at each site hands the current value to the components that
asked for it — interventions first (in the order listed), then probes — so a probe at a site sees the value the
forward continues with. This is what lets any list of components share ONE forward without nnsight's out-of-order
error.

Subclass :class:`Probe` or :class:`Intervention` and implement:

- ``sites(vlm) -> list[str]``: the site names it needs (``vlm.sites`` lists them; negative layers allowed).
- ``check(vlm, batch)``: raise :class:`~mech_vtokens.errors.InputError` for bad input (called before the forward).
- ``at(site, value, ctx, out)``: runs INSIDE the trace when the forward reaches ``site``. ``value`` is the tensor
  there; ``ctx`` a dict of batch facts (``visual_mask``, ``attention_mask``, ``model``: the nnsight root envoy, or
  the HF model under plain hooks; ``decode``; ``extras``: every component's ``extras``; ``mine``: this one's);
  ``out`` this component's dict for reduced results. A probe stores small reduced tensors in ``out``; an
  intervention returns the replacement value (or None to leave it).
- ``extras(vlm, batch) -> dict``: optional small tensors computed outside the trace and shipped into it; inside
  ``at`` they are ``ctx["mine"]`` (this component's own extras).
- ``collect(raw, batch, vlm) -> Result``: turns ``out`` into a result object (outside the trace).
- optional ``decode_sites(vlm) -> list[str]``: the sites it must also act at on every generation step after the
  prefill (default none: probes and prefill-only interventions act on the prompt's forward alone). ``ctx["decode"]``
  is True on those steps.
- optional ``conflicts(other, vlm, batch) -> str | None``: a message when this component contradicts ``other``
  (e.g. pruning a token another intervention zeroes); the Experiment raises it as an ``InputError``. Default None.
- optional ``layout(vlm, batch) -> dict | None``: for an intervention that changes the sequence length (Prune,
  VisualEntry / VisualExit), the new layout (see ``Experiment._layout_window``). Default None: length unchanged.

Every component has a ``name`` (the snake_case of its class: ``EmbedLens`` -> ``"embed_lens"``, ``ViTSinks`` ->
``"vit_sinks"``; ``.named("early")`` gives one its own): the key of its result in the ``Results`` that ``run``
returns. An intervention asked with ``.report(...)`` also returns what the forward produced under it (the logits at
each row's last position, the log-probs of given answer ids), reduced inside the trace by a reader the Experiment
adds at ``unembed.hook_out``; without it nothing is added to the forward.

Code in ``at`` may import only torch / numpy / transformers / einops / nnsight / the stdlib (it is shipped by value
to NDIF for remote runs), must not rely on dataclass methods, and must keep no state on ``self``.
"""

from __future__ import annotations


def snake_name(cls_name: str) -> str:
    """``EmbedLens`` -> ``embed_lens``, ``ViTSinks`` -> ``vit_sinks``, ``AttentionKnockout`` -> ``attention_knockout``
    (a word starts at a capital followed by a lower-case letter; runs of capitals stay one word)."""
    import re

    return re.sub(r"(?<!^)(?<!_)(?=[A-Z][a-z])", "_", cls_name.lstrip("_")).lower()


class Component:
    kind = "component"
    name = "component"  # every subclass: snake_name of its class unless it sets its own (see __init_subclass__)

    def __init_subclass__(cls, **kwargs):  # no super(): a class rebuilt by value (remote) has no __class__ cell
        if "name" not in cls.__dict__:
            cls.name = snake_name(cls.__name__)

    def named(self, name: str):
        """Give this component its own ``name`` (the key of its result in ``run``'s Results); returns it."""
        from .errors import InputError

        if not isinstance(name, str) or not name:
            raise InputError(f"{type(self).__name__}.named({name!r}): give a non-empty string")
        self.name = name
        return self

    def sites(self, vlm) -> list[str]:
        raise NotImplementedError

    def check(self, vlm, batch) -> None:
        return None

    def extras(self, vlm, batch) -> dict:
        return {}

    def decode_sites(self, vlm) -> list[str]:
        return []

    def conflicts(self, other, vlm, batch) -> str | None:
        return None

    def layout(self, vlm, batch) -> dict | None:
        return None

    def at(self, site, value, ctx, out):
        raise NotImplementedError

    def collect(self, raw, batch, vlm):
        return raw

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


class Probe(Component):
    """Reads sites and reduces what it reads inside the trace; never changes the forward."""

    kind = "probe"

    def record_rows(self, result):
        """The rows of ``result`` that a resumable store keeps per record (``run_dataset``): rows with a ``row`` or
        ``image`` column. Default: ``result.to_pandas()``; a probe whose table aggregates over images returns its
        per-image rows instead (LabelMatching: ``hits()``)."""
        return result.to_pandas()


REPORTS = ("last_logits", "answer_logprob")


class Intervention(Component):
    """Changes the value at its sites (returns the replacement from ``at``); ``collect`` returns an
    :class:`~mech_vtokens.results.InterventionResult`: which one ran, plus what :meth:`report` asked for."""

    kind = "intervention"
    _report = None  # set by .report(...): {"what": (...), "answer_ids": LongTensor | None}

    def report(self, what=("last_logits",), answer_ids=None):
        """Ask this intervention's result to carry what the forward produced under it, read on the prompt's forward
        with every intervention of the run applied (reduced inside the trace; the result on the CPU):

        - ``"last_logits"``: the logits at each row's last attended position (``result.logits``, (batch, vocab));
        - ``"answer_logprob"`` (implied by ``answer_ids``): the log-probs there of ``answer_ids`` — one list of token
          ids for every row, or one list per row (``result.logprob``, (batch, n_answers)).

        Returns the intervention itself: ``Prune(dead).report(answer_ids=[yes_id, no_id])``; ``.report(())`` turns
        the report off again."""
        import torch

        from .errors import InputError

        what = (what,) if isinstance(what, str) else tuple(what)
        bad = [w for w in what if w not in REPORTS]
        if bad:
            raise InputError(f"{type(self).__name__}.report: unknown report {bad[0]!r}; reports are {list(REPORTS)}")
        ids = None
        if answer_ids is not None:
            try:
                ids = torch.as_tensor(answer_ids)
            except (TypeError, ValueError, RuntimeError) as err:
                raise InputError(f"{type(self).__name__}.report: answer_ids={answer_ids!r} is not a list of token "
                                 f"ids ({err}); give ints, or one equal-length list of ints per prompt") from None
            if ids.dtype not in (torch.int64, torch.int32) or ids.dim() not in (1, 2) or ids.numel() == 0:
                raise InputError(f"{type(self).__name__}.report: answer_ids={answer_ids!r}: give a non-empty list of "
                                 f"int token ids, or one equal-length list per prompt")
            ids = ids.long()
            what = tuple(dict.fromkeys(what + ("answer_logprob",)))
        elif "answer_logprob" in what:
            raise InputError(f"{type(self).__name__}.report: 'answer_logprob' needs answer_ids=[...] (the token ids "
                             f"whose log-prob to read, e.g. tokenizer.convert_tokens_to_ids(['yes', 'no']))")
        self._report = {"what": what, "answer_ids": ids} if what else None
        return self

    def collect(self, raw, batch, vlm):
        from .results import InterventionResult

        return InterventionResult(self)


class _Report(Probe):
    """The reader behind ``Intervention.report``: at ``unembed.hook_out`` (the logits, after every intervention of
    the forward), each row's last attended position, its logits and the log-probs of the answer ids. Added by the
    Experiment only for an intervention that asked; its raw goes to that intervention's result."""

    name = "report"

    def __init__(self, owner: int, spec):
        self.owner = owner  # the intervention's index among the Experiment's interventions
        self.what, self.answer_ids = spec["what"], spec["answer_ids"]

    def sites(self, vlm):
        return ["unembed.hook_out"]

    def check(self, vlm, batch):
        from .errors import InputError

        ids = self.answer_ids
        if ids is None:
            return
        from .adapters.base import _resolve

        vocab = getattr(_resolve(vlm.hf, vlm.adapter.lm_head), "out_features", None)
        if vocab is not None and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
            raise InputError(f"report: answer_ids {ids.tolist()} hold ids outside the vocabulary (0..{vocab - 1})")
        if ids.dim() == 2 and ids.shape[0] != len(batch.visual_mask):
            raise InputError(f"report: {ids.shape[0]} lists of answer_ids for {len(batch.visual_mask)} prompts; give "
                             f"one list per prompt, or one flat list for all")

    def extras(self, vlm, batch):
        return {} if self.answer_ids is None else {"answer_ids": self.answer_ids}

    def at(self, site, value, ctx, out):
        import torch

        n, s = value.shape[0], value.shape[1]
        am = ctx.get("attention_mask")
        rows = torch.arange(n, device=value.device)
        if am is None or am.shape[-1] != s:  # no mask, or HF kept only the last logits (logits_to_keep)
            last = torch.full((n,), s - 1, dtype=torch.long, device=value.device)
        else:
            pos = torch.arange(s, device=value.device)
            last = (rows_for(am, n).to(value.device).bool() * pos).amax(1)
        logits = value[rows, last].float()
        out["position"] = last.detach().clone()
        out["logits"] = logits.detach().clone()
        ids = ctx["mine"].get("answer_ids")
        if ids is not None:
            ids = ids.to(value.device)
            ids = rows_for(ids, n) if ids.dim() == 2 else ids.expand(n, -1)
            out["logprob"] = torch.log_softmax(logits, -1).gather(1, ids).detach().clone()


# ---- helpers for code that runs INSIDE the trace (torch only) -----------------------------------------------------

from .compat import kv_cache  # noqa: E402,F401  (kept importable here: the KV cache kwarg under both names)


def rows_for(t, n):
    """A per-prompt tensor (batch, ...) for a forward of ``n`` rows. Generation with ``num_beams`` or
    ``num_return_sequences`` > 1 runs each prompt k = n / batch times, its copies consecutive (HF's expansion), and
    every copy shares the prompt's token sets, masks and positions."""
    b = t.shape[0]
    if n == b:
        return t
    if b == 0 or n % b:
        raise ValueError(f"a forward of {n} rows for a batch of {b} prompts: not an expansion of it (num_beams / "
                         f"num_return_sequences repeat each prompt's row); prepare the batch this forward runs")
    return t.repeat_interleave(n // b, 0)


def select_rows(value, mask, ctx):
    """The rows of ``value`` (batch, seq, ...) at the positions ``mask`` (batch, seq) bool picks, given in the
    batch's ORIGINAL coordinates, in ``mask.nonzero()`` order; and a (n,) bool saying which of them exist.

    After an intervention that shortens the sequence (Prune, VisualExit) the sites behind it hold fewer positions:
    the rows of removed tokens come back as NaN and ``present`` False, so a probe's rows (and its table) are the same
    at every site. Without a layout change this is ``value[mask]`` and all present.
    """
    import torch

    if value.shape[0] != mask.shape[0]:
        raise ValueError(f"a probe read a forward of {value.shape[0]} rows for {mask.shape[0]} prompts (generation "
                         f"with num_beams / num_return_sequences > 1 repeats each prompt): probes read the prompt's "
                         f"forward — run them with mech_vtokens.run, or generate with num_beams=1 and one sequence "
                         f"per prompt")
    mask = mask.to(value.device)
    if not ctx.get("shortened"):
        return value[mask], torch.ones(int(mask.sum()), dtype=torch.bool, device=value.device)
    lay = ctx["layout"]
    idx, valid = lay["index"].to(value.device), lay["valid"].to(value.device)
    b, n = mask.shape
    newpos = torch.full((b, n), -1, dtype=torch.long, device=value.device)
    cols = torch.arange(idx.shape[1], device=value.device).expand_as(idx)
    newpos[torch.arange(b, device=value.device)[:, None].expand_as(idx)[valid], idx[valid]] = cols[valid]
    pos = mask.nonzero()
    j = newpos[pos[:, 0], pos[:, 1]]
    present = j >= 0
    out = value.new_full((len(pos),) + tuple(value.shape[2:]), float("nan"))
    out[present] = value[pos[present, 0], j[present]]
    return out, present


def device_of(value):
    """The device of the first tensor in ``value`` (a tensor, or nested tuples / lists / dicts of them), or None."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.device
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else ()
    for v in items:
        d = device_of(v)
        if d is not None:
            return d
    return None


def on_device(obj, device):
    """``obj`` with every tensor in it (nested dicts / lists / tuples) moved to ``device``; other objects as they
    are. Tensors already there are returned as they are (no copy)."""
    import torch

    if device is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: on_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(on_device(v, device) for v in obj)
    return obj


def ctx_on(ctx, value, cache):
    """``ctx`` with its tensors (masks, layout, every component's extras) on the device of ``value``: the site's own
    device, which differs between sites of a model split over several devices. ``cache`` (a dict owned by the caller,
    one per forward) keeps one moved copy per (ctx, device)."""
    device = device_of(value)
    key = (id(ctx), device)
    if key not in cache:
        cache[key] = on_device(ctx, device)
    return cache[key]


def weight_of(module, name: str = "weight"):
    """A parameter of ``module`` (an nnsight envoy or a torch module) as real values, also when accelerate offloaded
    it (``device_map`` with "cpu" / "disk" entries: the parameter is a meta placeholder and the values live in the
    module's offload hook's ``weights_map``, loaded to the hook's execution device)."""
    module = getattr(module, "_module", module)
    p = getattr(module, name)
    if p is None or not p.is_meta:
        return p
    hook = getattr(module, "_hf_hook", None)
    hooks = getattr(hook, "hooks", None) or [hook]  # accelerate's SequentialHook holds several
    for h in hooks:
        wmap = getattr(h, "weights_map", None)
        if wmap is not None and name in wmap:
            dev = getattr(h, "execution_device", None)
            return wmap[name].to(dev) if dev is not None else wmap[name]
    raise ValueError(f"the parameter {name!r} of {type(module).__name__} is a meta placeholder with no offload hook "
                     f"that holds its values; load the model with a device_map that places this module")
