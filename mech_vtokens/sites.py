"""ONE site access for both backends: read / write a site's value given its (kind, index), and hand it to its
components.

A site is a module plus an accessor ``kind`` (``"output"`` with an optional tuple ``index``, ``"input"``: the first
input, ``"inputs"``: the whole ``(args, kwargs)`` pair, ``"kwarg"``: one keyword input named by ``index``). Both
backends go through :func:`visit`:

- nnsight (:class:`~mech_vtokens.Experiment` in a trace): the module is an envoy, read and written through its
  ``.output`` / ``.input`` / ``.inputs``;
- plain torch hooks (:func:`mech_vtokens.harness.applied`): a hook call is wrapped in a :class:`HookCall`, which has
  the same three attributes over the hook's ``output`` or ``(args, kwargs)``; the hook returns what was written.

:func:`visit` hands the value to the site's components in plan order (interventions first, in list order, then
probes: a probe sees the value the forward continues with) and writes the value back only when one changed it.

Code here runs inside the trace: torch and stdlib only, no state kept on objects.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from .component import ctx_on


class Site(NamedTuple):
    """One planned site: its name, module path, accessor kind and index, the ids of the components acting there (in
    order), and whether it lies after a sequence change (it then gets the shortened sequence's ctx)."""

    name: str
    path: str
    kind: str
    index: Any
    cids: tuple
    shortened: bool = False


def read(env, kind, index):
    """The value at a site of the module ``env`` (an nnsight envoy or a :class:`HookCall`)."""
    if kind == "output":
        value = env.output
        return value if index is None else value[index]
    if kind == "input":
        return env.input
    if kind == "inputs":
        return env.inputs
    return env.inputs[1][index]  # kind == "kwarg"


def write(env, kind, index, value):
    """Replace the value at a site of ``env`` (the rest of a tuple output / of the inputs unchanged)."""
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


class HookCall:
    """One torch hook call seen as an nnsight envoy: ``output`` (forward hook) or ``inputs`` = ``(args, kwargs)``
    (forward-pre hook with kwargs); ``input`` is the first positional input, else the first keyword one (nnsight's
    ``.input``). ``written`` says whether :func:`write` replaced anything."""

    def __init__(self, output=None, inputs=None):
        self._output, self._inputs, self.written = output, inputs, False

    @property
    def output(self):
        return self._output

    @output.setter
    def output(self, value):
        self._output, self.written = value, True

    @property
    def inputs(self):
        return self._inputs

    @inputs.setter
    def inputs(self, value):
        self._inputs, self.written = value, True

    @property
    def input(self):
        args, kwargs = self._inputs
        return args[0] if args else next(iter(kwargs.values()))

    @input.setter
    def input(self, value):
        args, kwargs = self._inputs
        if args:
            self.inputs = ((value,) + tuple(args[1:]), kwargs)
        else:
            self.inputs = (args, {**kwargs, next(iter(kwargs)): value})


def forward_ctx(ctx, model, decode):
    """The ctx of one forward pass: (for the sites before a sequence change, for the sites after it). ``model``: what
    components reach modules through (the nnsight root envoy, or the HF model under plain hooks)."""
    ctx = dict(ctx, model=model, decode=decode)
    after = ctx.get("after_layout")
    return ctx, (dict(ctx, **after["ctx"]) if after else ctx)


def visit(env, site, comps, ctxs, out, moved):
    """At one site of ``env``: read the value, hand it to the site's components in order, write it back if changed.

    ``ctxs``: :func:`forward_ctx`'s pair; ``out``: the per-component dicts of reduced results; ``moved``: a dict owned
    by the caller (one per forward) caching ctx's tensors per device (:func:`~mech_vtokens.component.ctx_on`)."""
    value = read(env, site.kind, site.index)
    c = ctx_on(ctxs[1] if site.shortened else ctxs[0], value, moved)
    changed = False
    for cid in site.cids:
        c["mine"] = c.get("extras", {}).get(cid, {})  # this component's extras(...)
        new = comps[cid].at(site.name, value, c, out.setdefault(cid, {}))
        if new is not None:
            value, changed = new, True
    if changed:
        write(env, site.kind, site.index, value)
    return changed
