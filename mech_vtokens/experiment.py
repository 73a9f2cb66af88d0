"""Scheduling: any list of probes and interventions in ONE forward, each acting at its sites in forward order.

``Experiment`` is built outside the trace (it validates everything and computes the plan), ``execute(model)`` runs
inside it, ``results(raw)`` turns what came back into result objects. ``mech_vtokens.run`` wraps the three; use
them directly to compose probes inside your own ``with vlm.trace(...)`` block::

    batch = vlm.prepare(images, prompts)
    exp = vlm.experiment(batch, probes=[EmbedLens(k=5)])
    with vlm.trace(**batch.inputs) as tracer:
        raw = nnsight.save(exp.execute(vlm.model))
        mine = nnsight.save(vlm.model.model.language_model.layers[1].output)
    lens = exp.results(raw)[0]

Everything that runs inside the trace is in this module's ``_execute`` and the components' ``at`` methods:
torch and stdlib only (remote-safe, shipped by value).
"""

from __future__ import annotations

import torch

from .adapters.base import _resolve
from .component import ctx_on, on_device
from .errors import InputError


def _read(env, kind, index):
    if kind == "output":
        value = env.output
        return value if index is None else value[index]
    if kind == "input":
        return env.input
    if kind == "inputs":
        return env.inputs
    return env.inputs[1][index]  # kind == "kwarg"


def _write(env, kind, index, value):
    if kind == "output":
        if index is None:
            env.output = value
        else:
            old = env.output
            env.output = tuple(old[:index]) + (value,) + tuple(old[index + 1:])
    elif kind == "input":
        env.input = value
    elif kind == "inputs":
        env.inputs = value
    else:
        args, kwargs = env.inputs
        kwargs = dict(kwargs)
        kwargs[index] = value
        env.inputs = (args, kwargs)


def _execute(model, plan, comps, ctx, out=None, decode=False):
    """Runs inside the trace: visit each planned site in forward order, hand its value to the components."""
    ctx = dict(ctx)
    ctx["model"] = model
    ctx["decode"] = decode
    after = ctx.get("after_layout")  # masks of the shortened sequence, for the sites after a sequence change
    ctx_after = dict(ctx, **after["ctx"]) if after and not decode else ctx
    out = {} if out is None else out
    moved = {}  # ctx's tensors on each device a site of this forward runs on (a split model has several)
    for name, path, kind, index, cids in plan:
        env = _resolve(model, path)
        value = _read(env, kind, index)
        changed = False
        c = ctx_on(ctx_after if after and name in after["sites"] else ctx, value, moved)
        for cid in cids:
            comp = comps[cid]
            slot = out.setdefault(cid, {})
            c["mine"] = c.get("extras", {}).get(cid, {})  # this component's extras(...)
            new = comp.at(name, value, c, slot)
            if new is not None:
                value, changed = new, True
        if changed:
            _write(env, kind, index, value)
    return out


def _execute_steps(model, plan, decode_plan, comps, ctx, steps, out):
    """Runs inside a generate trace: the whole plan on the prefill (step 0), the decode plan on every later step
    (``steps`` is nnsight's ``tracer.iter[...]``, which binds each pass to that step's module calls)."""
    ctx = dict(ctx, generating=True)
    out = {} if out is None else out
    for step in steps:
        if step == 0:
            _execute(model, plan, comps, ctx, out)
        elif decode_plan:
            _execute(model, decode_plan, comps, ctx, out, decode=True)
        else:
            break
    return out


class Experiment:
    """A validated plan for one batch: which component acts at which site, in forward order."""

    def __init__(self, vlm, batch, probes=(), interventions=()):
        from .component import Intervention, Probe

        probes, interventions = list(probes), list(interventions)
        for c in probes:
            if not isinstance(c, Probe):
                raise InputError(f"{c!r} is not a Probe; pass interventions with interventions=[...]")
        for c in interventions:
            if not isinstance(c, Intervention):
                raise InputError(f"{c!r} is not an Intervention; pass probes with probes=[...]")
        if not probes and not interventions:
            raise InputError("nothing to run: pass probes=[...] and/or interventions=[...]")
        comps = interventions + probes  # interventions act first at a shared site
        for c in comps:
            c.check(vlm, batch)
        for a in comps:  # contradicting components (e.g. prune a token and zero it): components may define conflicts
            for b in comps:
                msg = a.conflicts(b, vlm, batch) if a is not b and hasattr(a, "conflicts") else None
                if msg:
                    raise InputError(msg)
        by_site: dict[str, list[int]] = {}
        for cid, c in enumerate(comps):
            for name in c.sites(vlm):
                canon = vlm.adapter.canonical(name)
                if cid not in by_site.setdefault(canon, []):
                    by_site[canon].append(cid)
        plan = []
        for name in sorted(by_site, key=lambda n: vlm.adapter.site(n)[0]):
            _, path, kind, index = vlm.adapter.site(name)
            plan.append((name, path, kind, index, by_site[name]))
        self.plan = plan
        # generation steps after the prefill: only the sites components asked for there (Prune's positions and
        # mask, VisualEntry / VisualExit's per-window masks, ZeroSublayer(every_step=True)); probes read the prefill
        by_decode: dict[str, list[int]] = {}
        for cid, c in enumerate(comps):
            for name in c.decode_sites(vlm):
                by_decode.setdefault(vlm.adapter.canonical(name), []).append(cid)
        self.decode_plan = [(n, p, k, i, [c for c in cids if c in by_decode.get(n, [])])
                            for n, p, k, i, cids in plan if n in by_decode]
        self.comps = comps
        self.n_interventions = len(interventions)
        self.ctx = dict(batch.ctx)
        self.ctx["extras"] = {cid: c.extras(vlm, batch) for cid, c in enumerate(comps)}
        # An intervention that shortens the sequence (Prune, VisualExit) defines ``layout(vlm, batch)`` -> dict with
        # "keep" (batch, seq) bool, "index"/"valid" (batch, seq') gather index into the old sequence; sites after
        # ``lm.hook_inputs`` (or in the layout's "start"/"stop" window) then get the visual and attention masks of the
        # shortened sequence in ``ctx`` (and
        # ``ctx["layout"]`` to map full-length masks; see ``mech_vtokens.token_sets.fit``).
        layouts = [c for c in interventions if hasattr(c, "layout")]
        if len(layouts) > 1:
            raise InputError(f"{layouts[0]!r} and {layouts[1]!r} both change the sequence length; combine their token "
                             f"sets into one intervention")
        if layouts:
            lay = layouts[0].layout(vlm, batch)
            idx, valid = lay["index"], lay["valid"]
            am = batch.ctx["attention_mask"]
            am = torch.ones_like(batch.visual_mask, dtype=torch.long) if am is None else am
            # the shortened window: after ``lay["start"]`` (default ``lm.hook_inputs``) and, if given, before
            # ``lay["stop"]`` (VisualEntry restores the full sequence there; VisualExit starts at a decoder layer)
            start = vlm.adapter.site(lay.get("start", "lm.hook_inputs"))[0]
            stop = vlm.adapter.site(lay["stop"])[0] if lay.get("stop") else len(vlm.adapter._sites)
            lay = {k: v for k, v in lay.items() if k not in ("start", "stop")}
            self.ctx["layout"] = lay
            self.ctx["after_layout"] = {
                "sites": [p[0] for p in plan if start < vlm.adapter.site(p[0])[0] < stop],
                "ctx": {"shortened": True, "visual_mask": batch.visual_mask.gather(1, idx) & valid,
                        "attention_mask": am.gather(1, idx) * valid.to(am.dtype)}}
        self._vlm, self._batch = vlm, batch

    def execute(self, model, steps=None, out=None):
        """Call INSIDE a trace of ``model`` (the nnsight model, ``vlm.model``); returns the raw reduced results.

        In a ``generate`` trace pass ``steps=tracer.iter[:max_new_tokens]``: the interventions that act on every step
        (``Prune``, ``VisualEntry`` / ``VisualExit``, ``ZeroSublayer(every_step=True)``) then fix each decode step,
        and probes read the prefill. Generation may stop before the last step (EOS), which cuts the loop short
        (nnsight warns and the statements after it in that block do not run): bind a saved dict first and pass it
        as ``out``, and read ``tracer.result`` in a second invoke::

            with vlm.generate(max_new_tokens=8) as tracer:
                raw = nnsight.save({})
                with tracer.invoke(**batch.inputs):
                    exp.execute(vlm.model, steps=tracer.iter[:8], out=raw)
                with tracer.invoke():
                    ids = nnsight.save(tracer.result)
            results = exp.results(raw)

        ``mech_vtokens.generate`` does exactly this.
        """
        if steps is None:
            return _execute(model, self.plan, self.comps, self.ctx, out)
        return _execute_steps(model, self.plan, self.decode_plan, self.comps, self.ctx, steps, out)

    def results(self, raw) -> list:
        """One result per component, in the order probes then interventions were given; their tensors on the CPU
        whatever device the model runs on."""
        raw = on_device(raw, "cpu")
        res = [c.collect(raw.get(cid, {}), self._batch, self._vlm) for cid, c in enumerate(self.comps)]
        n = self.n_interventions
        return res[n:] + res[:n]

    def __getstate__(self):  # shipped into a (remote) trace: no model, processor or batch
        state = dict(self.__dict__)
        state["_vlm"] = state["_batch"] = None
        return state

    def __repr__(self) -> str:
        sites = ", ".join(p[0] for p in self.plan[:6]) + (" ..." if len(self.plan) > 6 else "")
        return f"Experiment({len(self.comps)} components, {len(self.plan)} sites: {sites})"
