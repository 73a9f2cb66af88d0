"""The layout check run at load: every site the adapter declares exists, in forward order, with the right shape.

Like nnterp's ``check_io``: a structural pass (every module path resolves, decoder layers have attention, MLP and
post-attention norm), then one REAL forward of a two-token text input that reads every LM site and checks its shape
is (batch, seq, d_model) and the logits' last dim is the vocabulary. Real, not nnsight's ``scan`` on fake tensors:
fake tensors break on accelerate's offload hooks (``device_map`` with "cpu" / "disk" entries load weights inside the
forward) and on data-dependent code (InternVL3's ``rope_type: dynamic`` compares the sequence length with a tensor).
Two tokens cost one pass over the weights, which the first real run pays anyway.
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
    import torch

    from .sites import read

    adapter = vlm.adapter
    # Text only (no image to invent here): the vision path is checked structurally above, its sites by the first run.
    batch = vlm.prepare(None, [vlm.tokenizer.decode([0, 0])])
    seq = batch.visual_mask.shape[1]
    lm_sites = ["hook_embed"] + [f"blocks.{i}.{h}" for i in range(adapter.n_layers)
                                 for h in ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out",
                                           "hook_resid_post")] + ["ln_final.hook_normalized", "unembed.hook_out"]
    shapes = {}
    with torch.no_grad(), vlm.model.trace(**batch.inputs):
        for name in lm_sites:
            _, path, kind, index = adapter.site(name)
            shapes[name] = nnsight.save(read(_resolve(vlm.model, path), kind, index).shape)
    vocab = vlm.unembed.out_features
    for name, shape in shapes.items():
        want = (1, seq, vocab if name == "unembed.hook_out" else adapter.d_model)
        if tuple(shape) != want:
            raise LayoutError(f"layout check: site {name!r} has shape {tuple(shape)}, expected {want}; the "
                              f"{adapter.family} adapter's declaration for it is wrong for this model")
