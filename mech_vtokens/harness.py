"""``applied``: the interventions on a PLAIN HF model call or HF ``generate``, without nnsight (paper Sec. 7.2's
benchmark rows need an evaluation harness such as lmms-eval to run an intervened model).

    with interventions.applied(vlm_or_hf_model, batch, interventions=[Prune(dead), ZeroSublayer("all", 1, "mlp")]):
        ids = hf_model.generate(**batch.inputs, max_new_tokens=20)      # or hf_model(**inputs), or vlm.generate

The signature is the package's one shape, ``f(vlm, data, *, probes=, interventions=)``; ``vlm`` may also be a bare
HF model. The old order ``applied(model, interventions, batch)`` raises an InputError naming the new call.

The same plan as :class:`~mech_vtokens.Experiment` (same sites, same order, same ``at`` code) is installed as plain
torch forward / forward-pre hooks on the HF modules; every hook is removed on exit, also when the body raises.
On generation steps after the first, ``ctx["decode"]`` is True and only the components that act on every step run
there (the Experiment's ``decode_plan``): probes and prefill-only interventions step aside, ``Prune`` keeps the cache
shortened and the positions continuing, ``VisualEntry`` / ``VisualExit`` give each layer the mask of its own cache.
``batch_or_inputs``: a :class:`~mech_vtokens.Batch` (``vlm.prepare``), or the processor's output dict (then token
sets are resolved with one image per prompt row).
"""

from __future__ import annotations

from contextlib import contextmanager

from mech_vtokens.compat import past_length
from mech_vtokens.errors import InputError
from mech_vtokens.loop import keywords
from mech_vtokens.sites import HookCall, forward_ctx, visit


class _ModelFacts:
    """The few facts components ask of a ``VLM``, for a bare HF model."""

    def __init__(self, hf):
        from mech_vtokens.adapters import adapter_class_for

        self.hf = hf
        self.adapter = adapter_class_for(hf.config)(hf)
        self.n_layers = self.adapter.n_layers
        self.family = self.adapter.family


def _batch(adapter, inputs):
    from mech_vtokens.vlm import Batch

    if hasattr(inputs, "visual_mask"):
        return inputs
    inputs = dict(inputs)
    mask = adapter.visual_mask(inputs["input_ids"])
    tokens = {"image": mask.nonzero()[:, 0]}
    return Batch(inputs, mask, tokens, [], [], [], [])


class Applied:
    """Handle yielded by :func:`applied`: ``raw`` holds what the components stored (per component id)."""

    def __init__(self, experiment, raw):
        self.experiment = experiment
        self.raw = raw


def _old_order(args, kwargs):
    if len(args) >= 3 or (len(args) == 2 and isinstance(args[1], (list, tuple))):
        return ("applied(model, interventions, batch) is the old order: call "
                "applied(vlm_or_model, batch, interventions=[...], probes=[...])")
    return None


@keywords(old=_old_order)
@contextmanager
def applied(model, batch_or_inputs, *, interventions=(), probes=()):
    """Install ``probes`` and ``interventions`` as plain torch hooks on ``model`` (a ``VLM`` or a bare HF model) for
    the inputs ``batch_or_inputs`` (see the module docstring); yields an :class:`Applied`."""
    from mech_vtokens.experiment import Experiment

    facts = model if hasattr(model, "adapter") and hasattr(model, "hf") else _ModelFacts(model)
    hf, adapter = facts.hf, facts.adapter
    batch = _batch(adapter, batch_or_inputs)
    exp = Experiment(facts, batch, probes=probes, interventions=interventions)
    for site in exp.plan:
        if ".source." in f".{site.path}.":
            who = ", ".join(repr(exp.comps[c]) for c in site.cids)
            raise InputError(f"{who} acts inside a function of the model (nnsight .source: {site.path!r}), which "
                             f"plain torch hooks cannot reach; run it in an nnsight trace "
                             f"(mech_vtokens.run / an Experiment) "
                             f"instead of applied(...)")
    # the Experiment's ctx for a prefill and for a decode step: every forward under the hooks is seen
    ctxs = {d: forward_ctx(dict(exp.ctx, generating=True), hf, d) for d in (False, True)}
    on_decode = {site.name: site for site in exp.decode_plan}
    raw: dict = {}
    state = {"decode": False}
    prefill_len = batch.visual_mask.shape[1]
    moved: dict = {}  # ctx's tensors on each device a hooked module runs on
    taps: dict = {}  # values kept for "addend" sites (rewritten by every forward before they are read)
    handles = []

    def lm_pre(module, args, kwargs):
        emb = kwargs.get("inputs_embeds")
        n = emb.shape[1] if emb is not None else kwargs["input_ids"].shape[1]
        state["decode"] = past_length(kwargs) > 0 or n != prefill_len

    def run(call, site):  # the one site access (mech_vtokens.sites) on this hook call; True if it wrote
        if state["decode"]:
            site = on_decode.get(site.name)
            if site is None:
                return False
        return visit(call, site, exp.comps, ctxs[state["decode"]], raw, moved, taps)

    try:
        handles.append(hf.get_submodule(adapter.language_model).register_forward_pre_hook(lm_pre, with_kwargs=True))
        for site in exp.plan:
            module = hf.get_submodule(site.path)
            if site.kind == "output":
                def hook(mod, args, output, site=site):
                    call = HookCall(output=output)
                    return call.output if run(call, site) else None
                handles.append(module.register_forward_hook(hook))
            else:
                def pre(mod, args, kwargs, site=site):
                    call = HookCall(inputs=(args, kwargs))
                    return call.inputs if run(call, site) else None
                handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        yield Applied(exp, raw)
    finally:
        for h in handles:
            h.remove()
