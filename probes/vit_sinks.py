"""ViT sinks (paper Sec. 4.1): visual tokens whose vision-encoder state has an abnormally high L2 norm.

Following the paper (after Darcet et al.), a token is a ViT sink if its L2 norm at the vision layer the LM receives
exceeds τ = 75. ``layer`` defaults to that layer, from the config as the family's adapter declares it
(``vision_feature_layer``: -2 for LLaVA-1.5, -1 for InternVL; Qwen's merger reads the last block); the result
names it (``result.layer``, column ``vision_layer``). ``threshold``: 75 is calibrated for CLIP ViT-L; other encoders
(and tiny test models) need their own: ``mech_vtokens.partition.sink_thresholds(vlm, images)["vit"]`` calibrates one
on data. When no token exceeds the threshold the result says why (``result.note``, a ThresholdWarning).

Why ViTSinks warns only AFTER the forward (unlike SinkChannels / Partition, which warn before): φ has a bound from
the width alone (φ <= sqrt(d_model), whatever the weights and the input), so an unreachable τ is known from the
config. An L2 norm of a ViT residual-stream state has none: the state is the patch embedding plus every earlier
block's attention and MLP output, and its norm grows with the weights (the paper's sinks are exactly such outliers,
norms several times the typical token's). The only input-free bound is a product of each sublayer's operator norms
(norm gains, q/k/v/o, MLP, InternVL's layer scales, Qwen's gated MLP ...): it needs the module structure of every
tower (no adapter declares it, and reading it from the modules would be a family branch), and on a trained tower it
lies orders of magnitude above any real norm, so it would never fire where it matters. Whether a threshold is met
is a fact about the data: ``sink_thresholds(vlm, images)["vit"]`` measures it before a study.

Mapping to the LM's visual tokens: each visual token is built from the rows ``batch.tokens["vision_rows"]`` of the
vision-block output (LLaVA: its one patch, CLS dropped; Qwen2-VL/2.5-VL: the 2x2 merged patches, looked up through
the window order; InternVL: the pixel-shuffled patches). A token's ``l2`` is the MAX over its merged rows (a
token is a sink if any patch it merges is one); ``l2_mean`` gives the (weighted) mean too. A token without a vision
row (LLaVA-NeXT / OneVision's newline tokens) gets NaN and is no sink. ``row_norms`` keeps the norm of
every vision row (CLS and unused rows included).
"""

from __future__ import annotations

import torch

from mech_vtokens.component import Probe
from mech_vtokens.errors import InputError
from mech_vtokens.results import Result
from mech_vtokens.site_names import site_column, site_layer


class ViTSinks(Probe):
    """L2 norm at a vision layer per LM visual token (max over merged rows), sink = norm > threshold (Sec. 4.1)."""

    def __init__(self, layer: int | None = None, threshold: float = 75.0):
        if layer is not None and (not isinstance(layer, int) or isinstance(layer, bool)):
            raise InputError(f"layer={layer!r}: give a vision layer index (negative counts from the end), or None "
                             f"for the layer the LM receives")
        if not threshold > 0:
            raise InputError(f"threshold={threshold!r}: give a positive L2 norm (the paper uses 75)")
        self.layer, self.threshold = layer, float(threshold)

    def sites(self, vlm):
        layer = vlm.adapter.lm_vision_layer() if self.layer is None else self.layer
        return [vlm.adapter.canonical(f"vision.blocks.{layer}.hook_resid_post")]

    def check(self, vlm, batch):
        self.sites(vlm)
        if batch.n_visual == 0:
            raise InputError("ViTSinks needs visual tokens, but the batch has none: pass an image (and its "
                             "placeholder in the prompt)")

    def extras(self, vlm, batch):
        return {"vision_rows": batch.tokens["vision_rows"], "vision_weights": batch.tokens["vision_weights"]}

    def at(self, site, value, ctx, out):
        with torch.no_grad():
            x = value.detach()
            norms = x.reshape(-1, x.shape[-1]).float().norm(dim=-1)
            from mech_vtokens.adapters.geometry import row_max, row_mean

            rows, w = ctx["mine"]["vision_rows"], ctx["mine"]["vision_weights"]  # (n_visual, merged)
            out[site] = {"rows": norms, "max": row_max(norms, rows, w), "mean": row_mean(norms, rows, w)}

    def collect(self, raw, batch, vlm):
        site = self.sites(vlm)[0]
        res = ViTSinksResult(site, raw[site], batch, self.threshold, vlm.n_layers, vlm.adapter.forward_order)
        if len(res.l2) and not bool(res.sinks.any()):
            import warnings

            from mech_vtokens.errors import ThresholdWarning

            res.note = (f"ViTSinks: no visual token's L2 norm exceeds {self.threshold:g} at {site} (max "
                        f"{float(res.l2.max()):.3g}, median {float(res.l2.median()):.3g}); the paper's 75 is CLIP "
                        f"ViT-L/14's number: for this vision tower use a data-calibrated threshold, "
                        f"mech_vtokens.partition.sink_thresholds(vlm, images)['vit']")
            warnings.warn(res.note, ThresholdWarning, stacklevel=2)
        return res


class ViTSinksResult(Result):
    """``to_pandas()``: row, image, position, visual_index, grid_row, grid_col, site, vision_layer, l2, l2_mean,
    sink. ``layer``: the vision block read (non-negative index). ``note``: why no token is a sink, when none is
    (the threshold above every norm: 75 is CLIP ViT-L's), else None."""

    name = "vit_sinks"
    note = None

    def __init__(self, site, rec, batch, threshold, n_layers, order):
        self.site, self.threshold, self._batch, self._order = site, threshold, batch, order
        self.layer = site_layer(site, n_layers)
        self.l2, self.l2_mean, self.row_norms = rec["max"], rec["mean"], rec["rows"]

    @property
    def sinks(self):
        return self.l2 > self.threshold

    def to_pandas(self):
        from mech_vtokens.results import visual_index_frame

        df = visual_index_frame(self._batch)
        df["site"] = site_column([self.site] * len(df), self._order)
        df["vision_layer"] = self.layer
        df["l2"], df["l2_mean"] = self.l2.numpy(), self.l2_mean.numpy()
        df["sink"] = self.sinks.numpy()
        return df

    def plot(self, image=0, ax=None):
        """The token grid of ``image`` coloured by L2 norm; sinks marked with a dot."""
        from mech_vtokens.views.figure import figure_of, subplots
        import numpy as np

        t = self._batch.tokens
        on = (t["image"] == image).numpy()
        if not on.any():
            raise InputError(f"image {image} has no visual tokens in this batch")
        tiles = t["tile"].numpy()[on]
        keep = tiles == tiles.max() if (tiles >= 0).any() and len(set(tiles)) > 1 else np.ones(on.sum(), bool)
        r, c = t["row"].numpy()[on][keep], t["col"].numpy()[on][keep]
        v = self.l2.numpy()[on][keep]
        grid = np.full((r.max() + 1, c.max() + 1), np.nan)
        grid[r, c] = v
        if ax is None:
            _, ax = subplots(figsize=(5, 5))
        from mech_vtokens.views.figure import GROUP_COLORS, VALUE_CMAP, integer_layers

        im = ax.imshow(grid, cmap=VALUE_CMAP)
        s = v > self.threshold
        ax.scatter(c[s], r[s], s=30, facecolors="none", edgecolors=GROUP_COLORS["vit_sink"], linewidths=2,
                   label=f"ViT sink (L2 > {self.threshold:g}): {int(s.sum())}")
        ax.set_title(f"image {image}: L2 norm at {self.site}", fontsize=9)
        ax.set_xlabel("grid column")
        ax.set_ylabel("grid row")
        integer_layers(ax, "x")
        integer_layers(ax, "y")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0, -0.12))
        ax.figure.colorbar(im, ax=ax, label="L2 norm")
        return figure_of(ax)
