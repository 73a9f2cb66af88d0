"""Errors raised before any work is done, each naming the problem and the fix."""


class InputError(ValueError):
    """Bad input to the public API: the message says what is wrong and how to fix it."""


class ManyVisualTokensWarning(UserWarning):
    """An image became more visual tokens than ``vlm.visual_token_warning``: the message names the count and the
    processor setting that caps it."""


class ThresholdWarning(UserWarning):
    """A threshold the model can never reach (φ(x) <= sqrt(d_model)) or not calibrated for it (the paper's ViT-sink 75
    is CLIP ViT-L's): the message names the bound and the data-calibrated alternative
    (``mech_vtokens.partition.sink_thresholds``)."""


class PositionsUnitWarning(UserWarning):
    """``Positions`` ints without a stated unit on a batch of several images: they count the BATCH's visual tokens
    (image 0's first), which a reader of per-image indices would not expect (``mech_vtokens.token_sets``)."""


# ---- argument checks shared by every constructor and public function (one rule per kind of value) ----------------

def check_flag(value, what: str) -> bool:
    """A yes/no argument: True or False only (``"no"``, ``1`` or ``None`` would be read as truthy / falsy without a
    word); InputError naming the two values."""
    if value is not True and value is not False and type(value).__name__ != "bool_":
        raise InputError(f"{what}={value!r}: give True or False")
    return bool(value)


def check_int(value, what: str, minimum: int | None = None, fix: str = "") -> int:
    """An integer argument (numpy / torch integer scalars too; bools, floats and strings refused: ``int()`` would
    read 1.5 as 1, ``"5"`` as 5 and True as 1), at least ``minimum`` when given."""
    import numbers

    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool) and type(value).__name__ != "bool_"
    if not ok and type(value).__module__ == "torch" and getattr(value, "ndim", None) == 0:
        ok = not value.is_floating_point() and str(value.dtype) != "torch.bool"
    if not ok or (minimum is not None and int(value) < minimum):
        want = "an int" if minimum is None else f"an int >= {minimum}"
        raise InputError(f"{what}={value!r}: give {want}" + (f" ({fix})" if fix else ""))
    return int(value)


def check_number(value, what: str, positive: bool = False, fix: str = "") -> float:
    """A real-number argument: finite, not a bool or a string (and > 0 when ``positive``)."""
    import math
    import numbers

    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and type(value).__name__ != "bool_"
    if not ok and type(value).__module__ == "torch" and getattr(value, "ndim", None) == 0:
        ok = str(value.dtype) != "torch.bool"
    if not ok or not math.isfinite(float(value)) or (positive and not float(value) > 0):
        want = "a finite positive number" if positive else "a finite number"
        raise InputError(f"{what}={value!r}: give {want}" + (f" ({fix})" if fix else ""))
    return float(value)
