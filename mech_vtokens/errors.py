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
