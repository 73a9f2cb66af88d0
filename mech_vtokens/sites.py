"""ONE site access for both backends: read / write a site's value given its (kind, index), and hand it to its
components.

A site is a module plus an accessor ``kind`` (``"output"`` with an optional tuple ``index``, ``"input"``: the first
input, ``"inputs"``: the whole ``(args, kwargs)`` pair, ``"kwarg"``: one keyword input named by ``index``,
``"addend"``: a vector the model adds to the residual stream outside any module, between two decoder layers — Qwen3-VL
DeepStack; see ``Adapter.injection``). Both backends go through :func:`visit`:

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
    tap: bool = False  # keep this site's value (after its components) for a later "addend" site of the forward


def _addend(x, taps, index):
    """The (batch, seq, d) vector added to ``x`` (the next module's input): the packed rows the LM call received
    (kwarg ``rows``, entry ``j``) scattered at its mask (kwarg ``mask``), zero elsewhere and when the call had none
    (a decode step, a prompt without images)."""
    import torch

    _, inputs, rows, j, mask = index
    kwargs = taps[inputs][1]
    packed, m = kwargs.get(rows), kwargs.get(mask)
    out = torch.zeros_like(x)
    if packed is None or m is None or j >= len(packed):
        return out
    out[m.to(x.device)] = packed[j].to(x.device, x.dtype)
    return out


def read(env, kind, index, taps=None):
    """The value at a site of the module ``env`` (an nnsight envoy or a :class:`HookCall`); ``taps``: the values
    kept earlier in this forward (an "addend" site is computed from them)."""
    if kind == "addend":
        return _addend(env.input, taps, index)
    if kind == "output":
        value = env.output
        return value if index is None else value[index]
    if kind == "input":
        return env.input
    if kind == "inputs":
        return env.inputs
    return env.inputs[1][index]  # kind == "kwarg"


def write(env, kind, index, value, taps=None):
    """Replace the value at a site of ``env`` (the rest of a tuple output / of the inputs unchanged). An "addend":
    the next module's input becomes the residual it is added to (``taps``) plus ``value``."""
    if kind == "addend":
        env.input = taps[index[0]] + value
    elif kind == "output":
        if index is None:
            env.output = value
        elif isinstance(index, str):  # a field of a ModelOutput (Adapter.unembed_site: the root's "logits")
            old = env.output
            old[index] = value
            env.output = old
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


def visit(env, site, comps, ctxs, out, moved, taps=None):
    """At one site of ``env``: read the value, hand it to the site's components in order, write it back if changed.

    ``ctxs``: :func:`forward_ctx`'s pair; ``out``: the per-component dicts of reduced results; ``moved``: a dict owned
    by the caller (one per forward) caching ctx's tensors per device (:func:`~mech_vtokens.component.ctx_on`);
    ``taps``: a dict owned by the caller (one per forward) where a ``site.tap`` keeps its final value."""
    value = read(env, site.kind, site.index, taps)
    c = ctx_on(ctxs[1] if site.shortened else ctxs[0], value, moved)
    changed = False
    for cid in site.cids:
        c["mine"] = c.get("extras", {}).get(cid, {})  # this component's extras(...)
        new = comps[cid].at(site.name, value, c, out.setdefault(cid, {}))
        if new is not None:
            value, changed = new, True
    if changed:
        write(env, site.kind, site.index, value, taps)
    if site.tap:
        taps[site.name] = value
    return changed
