"""Small checks shared by the interventions (outside the trace)."""

from __future__ import annotations

import math

from mech_vtokens.errors import InputError


def layer_list(vlm, layers, who: str) -> list[int]:
    """Layers as a sorted list of non-negative indices; negative count from the end; out of range -> InputError."""
    if isinstance(layers, int) or not hasattr(layers, "__iter__") or isinstance(layers, (str, bytes)):
        layers = [layers]  # one layer (a float or a string is refused below, naming it)
    layers = list(layers)
    if not layers:
        raise InputError(f"{who}: give at least one layer")
    n = vlm.n_layers
    out = []
    for layer in layers:
        if not isinstance(layer, int) or isinstance(layer, bool):
            raise InputError(f"{who}: layers must be ints, got {layer!r}")
        if not -n <= layer < n:
            raise InputError(f"{who}: layer {layer} is out of range; this {vlm.family} model has {n} decoder layers "
                             f"(use 0..{n - 1}, or a negative index from the end)")
        out.append(layer % n)
    return sorted(set(out))


def finite(x, who: str, what: str = "factor") -> float:
    try:
        x = float(x)
    except (TypeError, ValueError):
        raise InputError(f"{who}: {what} must be a number, got {x!r}") from None
    if not math.isfinite(x):
        raise InputError(f"{who}: {what} must be finite, got {x}")
    return x


def overlap(a, b, vlm, batch) -> int:
    """How many tokens two interventions' token sets share (0 if either has none)."""
    from mech_vtokens.token_sets import resolve

    ta, tb = getattr(a, "tokens", None), getattr(b, "tokens", None)
    if ta is None or tb is None:
        return 0
    return int((resolve(ta, batch) & resolve(tb, batch)).sum())
