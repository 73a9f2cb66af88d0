"""Attribution of the answer to visual tokens (issue 17, items 3 and 4), on the same engine as everything else.

- :func:`direct_logit_attribution`: per decoder layer and head, the DIRECT effect on the logit difference
  ``logit[a] - logit[b]`` of what that head reads from the visual tokens at the last position. The head's
  visual-key part of the attention output is measured exactly, not approximated: one forward holds the clean row and
  one copy per (layer, head) in which :class:`~mech_vtokens.interventions.HeadKnockout` zeroes that head's attention
  from the text positions to the visual keys at that layer only, so ``delta = attn_out(clean) - attn_out(copy)`` at
  that layer (same inputs up to there; attention is linear in its post-softmax weights and ``o_proj`` is linear).
  The direct effect is then ``LD(unembed(norm(x))) - LD(unembed(norm(x - delta)))`` with ``x`` the clean final
  residual at the last position and the model's own final norm (recomputed, not frozen) and unembedding. ``head``
  -1 is the whole layer (every head knocked out at once).
- :func:`attribution_patching`: the gradient x activation-difference estimate of a patching sweep (see its doc).
"""

from __future__ import annotations

import torch

from .component import Probe
from .errors import InputError
from .loop import batches, forward


class _LastPosition(Probe):
    """Each row's value at its last attended position at ``sites`` ((batch, d) per site, detached)."""

    name = "last_position"

    def __init__(self, sites):
        self.site_names = list(sites)

    def sites(self, vlm):
        return self.site_names

    def at(self, site, value, ctx, out):
        from .probes.metrics import last_positions

        rows = torch.arange(value.shape[0], device=value.device)
        out[site] = value[rows, last_positions(value, ctx)].detach().float().clone()


def _answer_id(vlm, answer, who):
    if isinstance(answer, int) and not isinstance(answer, bool):
        return answer
    ids = vlm.processor.tokenizer(answer, add_special_tokens=False)["input_ids"] if isinstance(answer, str) else []
    if len(ids) != 1:
        raise InputError(f"{who}: the answer {answer!r} must be one token (an id or a one-token string)")
    return int(ids[0])


def logit_diff_of(vlm, resid, a: int, b: int):
    """``logit[a] - logit[b]`` of final residuals ``resid`` (n, d) through the model's final norm and unembedding."""
    norm, unembed = vlm.final_norm, vlm.unembed
    w = unembed.weight
    with torch.no_grad():
        h = norm(resid.to(device=w.device, dtype=w.dtype))
        logits = unembed(h).float()
    return (logits[:, a] - logits[:, b]).cpu()


def direct_logit_attribution(vlm, image, prompt, *, a, b, layers=None, batch_size: int = 64, remote=False):
    """Direct effect of each head's reading of the visual tokens on ``logit[a] - logit[b]`` (module doc); a pandas
    table with ``layer``, ``head`` (-1: the whole layer), ``dla``, ``delta_norm`` (|delta|), ``ld_clean``. Needs
    eager attention (``mv.load(..., attn_implementation="eager")``)."""
    import pandas as pd

    from .interventions import HeadKnockout

    a, b = _answer_id(vlm, a, "direct_logit_attribution"), _answer_id(vlm, b, "direct_logit_attribution")
    n_heads = vlm.hf.config.get_text_config().num_attention_heads
    layers = list(range(vlm.n_layers)) if layers is None else [int(i) % vlm.n_layers for i in layers]
    per_layer = n_heads + 1  # each head alone, then the whole layer
    k = max(1, (batch_size - 1) // per_layer)  # layers per forward
    last = f"blocks.{vlm.n_layers - 1}.hook_resid_post"
    records = []
    for c in range(0, len(layers), k):
        chunk = layers[c:c + k]
        n_rows = 1 + per_layer * len(chunk)
        _, batch = next(batches(vlm, [image] * n_rows, [prompt] * n_rows, batch_size=n_rows))
        ivs, where = [], []
        for j, layer in enumerate(chunk):
            for h in range(per_layer):
                r = 1 + j * per_layer + h
                heads = [h] if h < n_heads else list(range(n_heads))
                ivs.append(HeadKnockout({layer: heads}, kind="vt", rows=[r]))
                where.append((layer, h if h < n_heads else -1, r))
        sites = sorted({f"blocks.{layer}.hook_attn_out" for layer in chunk} | {last},
                       key=lambda s: vlm.adapter.site(s)[0])
        probe = _LastPosition(sites)
        raw = forward(vlm, batch, probes=[probe], interventions=ivs, remote=remote)[probe]
        x = raw[last][0:1]
        ld_clean = float(logit_diff_of(vlm, x, a, b)[0])
        for layer, h, r in where:
            attn = raw[f"blocks.{layer}.hook_attn_out"]
            delta = attn[0:1] - attn[r:r + 1]
            dla = ld_clean - float(logit_diff_of(vlm, x - delta, a, b)[0])
            records.append({"layer": layer, "head": h, "dla": dla, "delta_norm": float(delta.norm()),
                            "ld_clean": ld_clean})
    return pd.DataFrame(records)
