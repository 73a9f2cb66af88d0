"""The layout check run at load: every site the adapter declares exists, in forward order, with the right shape.

Like nnterp's ``check_io``: a structural pass (every module path resolves, decoder layers have attention, MLP and
post-attention norm), then one ``scan`` of a tiny text input on fake tensors (no real compute) that reads every LM site and
checks its shape is (batch, seq, d_model) and the logits' last dim is the vocabulary.
"""

from __future__ import annotations

from .adapters.base import _resolve
from .errors import InputError


class LayoutError(InputError):
    """The model's module layout is not what its adapter declares."""


def check_layout(vlm, scan: bool = True) -> None:
    adapter, hf = vlm.adapter, vlm.hf
    for name in adapter.site_names:
        _, path, _, _ = adapter.site(name)
        try:
            _resolve(hf, path)
        except (AttributeError, IndexError) as err:
            raise LayoutError(
                f"the {adapter.family} adapter declares site {name!r} at module {path!r}, which this "
                f"{type(hf).__name__} does not have ({err}). The installed transformers version may have moved it: "
                f"update the paths in mech_vtokens/adapters/{adapter.family}.py") from None
    if scan:
        _scan(vlm)


def _scan(vlm) -> None:
    import nnsight

    from .experiment import _read

    adapter = vlm.adapter
    # Text only: fake tensors cannot run the data-dependent scatter of image features; the vision path is checked
    # structurally above, and its sites by the first real run.
    batch = vlm.prepare(None, [vlm.tokenizer.decode([0, 0])])
    seq = batch.visual_mask.shape[1]
    lm_sites = ["hook_embed"] + [f"blocks.{i}.{h}" for i in range(adapter.n_layers)
                                 for h in ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out",
                                           "hook_resid_post")] + ["ln_final.hook_normalized", "unembed.hook_out"]
    shapes = {}
    with vlm.model.scan(**batch.inputs):
        for name in lm_sites:
            _, path, kind, index = adapter.site(name)
            shapes[name] = nnsight.save(_read(_resolve(vlm.model, path), kind, index).shape)
    vocab = vlm.unembed.out_features
    for name, shape in shapes.items():
        want = (1, seq, vocab if name == "unembed.hook_out" else adapter.d_model)
        if tuple(shape) != want:
            raise LayoutError(f"layout check: site {name!r} has shape {tuple(shape)}, expected {want}; the "
                              f"{adapter.family} adapter's declaration for it is wrong for this model")
