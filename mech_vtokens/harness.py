"""``applied``: the interventions on a PLAIN HF model call or HF ``generate``, without nnsight (paper Sec. 7.2's
benchmark rows need an evaluation harness such as lmms-eval to run an intervened model).

    with interventions.applied(vlm_or_hf_model, [Prune(dead), ZeroSublayer("all", 1, "mlp")], batch):
        ids = hf_model.generate(**batch.inputs, max_new_tokens=20)      # or hf_model(**inputs), or vlm.generate

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

from mech_vtokens.adapters.base import _resolve
from mech_vtokens.component import ctx_on, kv_cache
from mech_vtokens.errors import InputError


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


@contextmanager
def applied(model, interventions, batch_or_inputs, probes=()):
    from mech_vtokens.experiment import Experiment

    facts = model if hasattr(model, "adapter") and hasattr(model, "hf") else _ModelFacts(model)
    hf, adapter = facts.hf, facts.adapter
    batch = _batch(adapter, batch_or_inputs)
    exp = Experiment(facts, batch, probes=probes, interventions=interventions)
    for _, path, _, _, cids in exp.plan:
        if ".source." in f".{path}.":
            who = ", ".join(repr(exp.comps[c]) for c in cids)
            raise InputError(f"{who} acts inside a function of the model (nnsight .source: {path!r}), which plain torch "
                             f"hooks cannot reach; run it in an nnsight trace (mech_vtokens.run / an Experiment) "
                             f"instead of applied(...)")
    ctx = dict(exp.ctx)
    ctx["model"] = hf
    ctx["generating"] = True  # every forward under the hooks is seen, decode steps included
    after = ctx.get("after_layout")
    ctx_after = dict(ctx, **after["ctx"]) if after else ctx
    raw: dict = {}
    state = {"decode": False}
    prefill_len = batch.visual_mask.shape[1]
    handles = []

    def lm_pre(module, args, kwargs):
        emb = kwargs.get("inputs_embeds")
        n = emb.shape[1] if emb is not None else kwargs["input_ids"].shape[1]
        cache = kv_cache(kwargs)
        past = int(cache.get_seq_length()) if cache is not None else 0
        state["decode"] = past > 0 or n != prefill_len

    on_decode = {name: cids for name, _, _, _, cids in exp.decode_plan}

    moved: dict = {}  # ctx's tensors on each device a hooked module runs on

    def make_run(name, cids, c0):
        def run(value):
            c = ctx_on(c0, value, moved)
            c["decode"] = state["decode"]
            changed = False
            for cid in (on_decode.get(name, ()) if state["decode"] else cids):
                c["mine"] = c["extras"].get(cid, {})
                new = exp.comps[cid].at(name, value, c, raw.setdefault(cid, {}))
                if new is not None:
                    value, changed = new, True
            return value if changed else None
        return run

    try:
        lm = _resolve(hf, adapter.language_model)
        handles.append(lm.register_forward_pre_hook(lm_pre, with_kwargs=True))
        for name, path, kind, index, cids in exp.plan:
            module = _resolve(hf, path)
            run = make_run(name, cids, ctx_after if after and name in after["sites"] else ctx)
            if kind == "output":
                def hook(mod, args, output, run=run, index=index):
                    new = run(output if index is None else output[index])
                    if new is None:
                        return None
                    if index is None:
                        return new
                    return tuple(output[:index]) + (new,) + tuple(output[index + 1:])
                handles.append(module.register_forward_hook(hook))
            else:
                def pre(mod, args, kwargs, run=run, kind=kind, index=index):
                    if kind == "inputs":
                        return run((args, kwargs))
                    if kind == "kwarg":
                        new = run(kwargs[index])
                        return None if new is None else (args, {**kwargs, index: new})
                    if args:  # kind == "input": the first input
                        new = run(args[0])
                        return None if new is None else ((new,) + tuple(args[1:]), kwargs)
                    key = next(iter(kwargs))
                    new = run(kwargs[key])
                    return None if new is None else (args, {**kwargs, key: new})
                handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        yield Applied(exp, raw)
    finally:
        for h in handles:
            h.remove()
