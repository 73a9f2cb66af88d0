"""Scheduling: any list of probes and interventions in ONE forward, each acting at its sites in forward order.

``Experiment`` is built outside the trace (it validates everything and computes the plan), ``execute(model)`` runs
inside it, ``results(raw)`` turns what came back into result objects. ``mech_vtokens.run`` wraps the three; use
them directly to compose probes inside your own ``with vlm.trace(...)`` block::

    batch = vlm.prepare(images, prompts)
    exp = vlm.experiment(batch, probes=[EmbedLens(k=5), MyRead()])   # MyRead: your own Probe (README)
    with vlm.trace(**batch.inputs) as tracer:
        raw = nnsight.save(exp.execute(vlm.model))
    res = exp.results(raw)              # res["embed_lens"], res["my_read"]

A read of your own written next to ``exp.execute`` in the same block (before it, or after it at a site it passes)
asks nnsight for a site the model already ran past: make it a component as above (``execute`` raises an
``InputError`` saying so, from ``execute`` for a read before it and from the trace's exit for a read after it).

Everything that runs inside the trace is in this module's ``_execute`` and the components' ``at`` methods:
torch and stdlib only (remote-safe, shipped by value).
"""

from __future__ import annotations

import torch

from .adapters.base import ADDEND, _resolve
from .component import on_device
from .errors import InputError
from .sites import Site, forward_ctx, visit


def _check_inputs(model, ctx):
    """Runs inside the trace, at the forward's start (before any site): the trace runs the batch this Experiment
    was built for (its plan, masks and positions belong to that batch)."""
    want = ctx.get("batch_ids")
    if want is None:
        return
    got = model.inputs[1].get("input_ids")
    if got is None:
        return
    if tuple(got.shape) != tuple(want.shape) or not torch.equal(got, want.to(got.device)):
        what = (f"{want.shape[0]} prompts x {want.shape[1]} tokens; the trace runs {got.shape[0]} x {got.shape[1]}"
                if tuple(got.shape) != tuple(want.shape) else "the same shape, other tokens")
        raise InputError(f"this Experiment was built for another batch ({what}): its plan, visual masks and positions "
                         f"belong to the batch it was built with; build one per batch, exp = vlm.experiment(batch, "
                         f"probes=..., interventions=...), and trace that batch: vlm.trace(**batch.inputs)")


def _execute(model, plan, comps, ctx, out=None, decode=False, check=True):
    """Runs inside the trace: visit each planned site in forward order (``mech_vtokens.sites.visit``); ``check``:
    first the batch (a plain trace; a generate trace reaches its forwards through ``tracer.iter``)."""
    if check:
        _check_inputs(model, ctx)
        # whether the CALLER handed the model a KV cache (a generate prefill does; a plain forward does not, even
        # where the wrapper then builds one for its LM, as Idefics3 / SmolVLM do): see sequence.refuse_single_pass
        from .compat import kv_cache

        ctx = dict(ctx, caller_cache=kv_cache(model.inputs[1]) is not None)
    ctxs = forward_ctx(ctx, model, decode)
    out = {} if out is None else out
    moved = {}  # ctx's tensors on each device a site of this forward runs on (a split model has several)
    taps = {}  # values kept for the "addend" sites of this forward (Site.tap)
    for site in plan:
        visit(_resolve(model, site.path), site, comps, ctxs, out, moved, taps)  # envoys resolve by attribute only
    return out


def _execute_steps(model, plan, decode_plan, comps, ctx, steps, out):
    """Runs inside a generate trace: the whole plan on the prefill (step 0), the decode plan on every later step
    (``steps`` is nnsight's ``tracer.iter[...]``, which binds each pass to that step's module calls)."""
    ctx = dict(ctx, generating=True)
    out = {} if out is None else out
    for step in steps:
        if step == 0:
            _execute(model, plan, comps, ctx, out, check=False)
        elif decode_plan:
            _execute(model, decode_plan, comps, ctx, out, decode=True, check=False)
        else:
            break
    return out


def _listed(comps, what) -> list:
    """``probes=`` / ``interventions=`` as a list: one component is a list of one (as in ``run_dataset``)."""
    from .component import Component

    if comps is None:
        return []
    if isinstance(comps, Component):
        return [comps]
    if isinstance(comps, (str, bytes)) or not hasattr(comps, "__iter__"):
        raise InputError(f"{what}={comps!r}: give a list of components (or one), e.g. {what}=[...]")
    return list(comps)


OWN_READS = (
    "a read of your own in this trace asked for a site the model had already run past: exp.execute(model) visits "
    "its planned sites in forward order, so a read of yours placed before it (or between its sites, after it) is "
    "out of order. Write the read as a component and put it in the Experiment's list (class MyRead(Probe): "
    "sites(vlm) -> ['blocks.1.hook_resid_post'], at(site, value, ctx, out) -> out['x'] = value ...; see the README "
    "section 'Write your own component'), or read it in a second tracer.invoke() block")


def _name_late_reads(model) -> None:
    """After ``execute`` returned in a plain trace: a read of the user's own placed AFTER it, at a site the plan
    already passed, parks nnsight's worker until the forward ends, and nnsight then raises its raw "already ran
    past it" from the trace's exit, where no frame of ours runs. Wrap this run's check of parked workers (an
    attribute of the interleaver, removed when it runs) so that error names the pattern that works (OWN_READS);
    only for the worker that ran this ``execute``, so a later trace without one keeps nnsight's own error. Where
    the interleaver is not nnsight 0.8's (a remote server), nothing is changed."""
    try:
        from nnsight.intervention.interleaver import Mediator, OutOfOrderError

        inter = model.interleaver
        mine = Mediator.current("execute")
        check = type(inter).check_dangling_mediators
    except Exception:  # noqa: BLE001 - another nnsight / a server: keep its own error
        return
    import weakref

    ran = weakref.ref(mine)

    def check_dangling_mediators():
        vars(inter).pop("check_dangling_mediators", None)  # one run only
        parked = [m for m in inter.mediators if m.alive]
        try:
            check(inter)
        except OutOfOrderError as err:
            if not any(m is ran() for m in parked):
                raise
            raise InputError(OWN_READS + f" (nnsight: {err})") from None

    inter.check_dangling_mediators = check_dangling_mediators


class Experiment:
    """A validated plan for one batch: which component acts at which site, in forward order."""

    def __init__(self, vlm, batch, probes=(), interventions=()):
        probes, interventions = self._validated(_listed(probes, "probes"), _listed(interventions, "interventions"))
        from .component import _Report

        # an intervention asked with .report(...) gets a reader of the logits it produced (nothing otherwise)
        reporters = [_Report(i, iv._report) for i, iv in enumerate(interventions) if iv._report]
        self.comps = interventions + probes + reporters  # interventions act first at a shared site
        self.n_interventions = len(interventions)
        self.n_probes = len(probes)
        self._check(vlm, batch)
        self.ctx = self._context(vlm, batch)
        self.plan, self.decode_plan = self._plans(vlm, batch, interventions)
        self._vlm, self._batch = vlm, batch

    def _check(self, vlm, batch):
        """Every component's own checks, then the contradictions between components (InputError)."""
        for c in self.comps:
            c.check(vlm, batch)
        self._refuse_conflicts(vlm, batch)

    def _context(self, vlm, batch) -> dict:
        """The batch's ctx plus each component's extras (``ctx["mine"]`` at its sites)."""
        ctx = dict(batch.ctx)
        ids = batch.inputs.get("input_ids") if hasattr(batch.inputs, "get") else None
        ctx["batch_ids"] = ids if isinstance(ids, torch.Tensor) else None  # execute checks the trace runs this batch
        ctx["extras"] = {cid: c.extras(vlm, batch) for cid, c in enumerate(self.comps)}
        return ctx

    def _plans(self, vlm, batch, interventions):
        """(plan, decode plan): the planned sites in forward order, marked where they see a shortened sequence.
        Generation steps after the prefill run only the sites components asked for there (Prune's positions and
        mask, VisualEntry / VisualExit's per-window masks, ZeroSublayer(every_step=True)); probes read the
        prefill."""
        plan = self._plan(vlm, lambda c: c.sites(vlm))
        window = self._layout_window(vlm, batch, interventions, plan)
        decode = self._plan(vlm, lambda c: c.decode_sites(vlm))
        return ([s._replace(shortened=s.name in window) for s in plan],
                [s._replace(shortened=s.name in window) for s in decode])

    @staticmethod
    def _validated(probes, interventions):
        from .component import Intervention, Probe

        for c in probes:
            if not isinstance(c, Probe):
                raise InputError(f"{c!r} is not a Probe; pass interventions with interventions=[...]")
        for c in interventions:
            if not isinstance(c, Intervention):
                raise InputError(f"{c!r} is not an Intervention; pass probes with probes=[...]")
        if not probes and not interventions:
            raise InputError("nothing to run: pass probes=[...] and/or interventions=[...]")
        return probes, interventions

    def _refuse_conflicts(self, vlm, batch):
        """Contradicting components (e.g. prune a token and zero it): ``Component.conflicts`` says so."""
        for a in self.comps:
            for b in self.comps:
                msg = a.conflicts(b, vlm, batch) if a is not b else None
                if msg:
                    raise InputError(msg)

    def _plan(self, vlm, sites_of) -> list[Site]:
        """The sites ``sites_of(component)`` names, canonical and in forward order, each with its components in
        list order."""
        by_site: dict[str, list[int]] = {}
        for cid, c in enumerate(self.comps):
            for name in sites_of(c):
                canon = vlm.adapter.canonical(name)
                if cid not in by_site.setdefault(canon, []):
                    by_site[canon].append(cid)
        taps = set()  # an "addend" site is computed from values earlier in the forward: visit those too
        for name in list(by_site):
            _, _, kind, index = vlm.adapter.site(name)
            if kind == ADDEND:
                taps.update(index[:2])
        for name in taps:
            by_site.setdefault(name, [])
        plan = []
        for name in sorted(by_site, key=lambda n: vlm.adapter.site(n)[0]):
            _, path, kind, index = vlm.adapter.site(name)
            plan.append(Site(name, path, kind, index, tuple(by_site[name]), tap=name in taps))
        return plan

    def _layout_window(self, vlm, batch, interventions, plan) -> set:
        """The names of the planned sites that see a shortened sequence, and their ctx (``ctx["after_layout"]``).

        An intervention that shortens the sequence (Prune, VisualExit) returns from ``layout(vlm, batch)`` a dict
        with "keep" (batch, seq) bool, "index"/"valid" (batch, seq') gather index into the old sequence; sites after
        ``lm.hook_inputs`` (or in the layout's "start"/"stop" window) then get the visual and attention masks of the
        shortened sequence in ``ctx`` (and ``ctx["layout"]`` to map full-length masks; see
        ``mech_vtokens.token_sets.fit``)."""
        layouts = [(c, c.layout(vlm, batch)) for c in interventions]
        layouts = [(c, lay) for c, lay in layouts if lay is not None]
        if len(layouts) > 1:
            raise InputError(f"{layouts[0][0]!r} and {layouts[1][0]!r} both change the sequence length; combine their "
                             f"token sets into one intervention")
        if not layouts:
            return set()
        lay = layouts[0][1]
        idx, valid = lay["index"], lay["valid"]
        am = batch.ctx["attention_mask"]
        am = torch.ones_like(batch.visual_mask, dtype=torch.long) if am is None else am
        # the shortened window: after ``lay["start"]`` (default ``lm.hook_inputs``) and, if given, before
        # ``lay["stop"]`` (VisualEntry restores the full sequence there; VisualExit starts at a decoder layer)
        start = vlm.adapter.site(lay.get("start", "lm.hook_inputs"))[0]
        stop = vlm.adapter.site(lay["stop"])[0] if lay.get("stop") else len(vlm.adapter._sites)
        self.ctx["layout"] = {k: v for k, v in lay.items() if k not in ("start", "stop")}
        self.ctx["after_layout"] = {
            "ctx": {"shortened": True, "visual_mask": batch.visual_mask.gather(1, idx) & valid,
                    "attention_mask": am.gather(1, idx) * valid.to(am.dtype)}}
        return {s.name for s in plan if start < vlm.adapter.site(s.name)[0] < stop}

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
        if steps is not None:  # nnsight ends a loop that outran the generation with the same error class: left alone
            return _execute_steps(model, self.plan, self.decode_plan, self.comps, self.ctx, steps, out)
        try:
            got = _execute(model, self.plan, self.comps, self.ctx, out)
        except Exception as err:  # noqa: BLE001 - only nnsight's out-of-order error is translated
            if type(err).__name__ != "OutOfOrderError":
                raise
            raise InputError(OWN_READS + f" (nnsight: {err})") from None
        _name_late_reads(model)
        return got

    def results(self, raw):
        """Every component's result as a :class:`~mech_vtokens.results.Results` (keyed by the component's name,
        indexable by the component), probes then interventions in the order given; their tensors on the CPU
        whatever device the model runs on. An intervention's report (``Intervention.report``) is in its result."""
        from .results import Results

        raw = on_device(raw, "cpu")
        res = [c.collect(raw.get(cid, {}), self._batch, self._vlm) for cid, c in enumerate(self.comps)]
        n, p = self.n_interventions, self.n_probes
        for rep, got in zip(self.comps[n + p:], res[n + p:]):
            res[rep.owner] = res[rep.owner].with_report(got, rep.answer_ids)
        comps = self.comps[n:n + p] + self.comps[:n]
        return Results(list(zip(comps, res[n:n + p] + res[:n])), order=self._vlm.adapter.forward_order)

    def __getstate__(self):  # shipped into a (remote) trace: no model, processor or batch
        state = dict(self.__dict__)
        state["_vlm"] = state["_batch"] = None
        return state

    def __repr__(self) -> str:
        sites = ", ".join(p.name for p in self.plan[:6]) + (" ..." if len(self.plan) > 6 else "")
        return f"Experiment({len(self.comps)} components, {len(self.plan)} sites: {sites})"
