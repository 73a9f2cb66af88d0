"""Per-model partition summary (paper Secs. 2, 4-6; Fig. 1 / Tables' setting): the share of each group (the paper:
alive ~60 %, dead ~30 % on LLaVA-1.5-7B) and the cross-image similarity of each group's centroid (per image the
mean LM-input vector of the group's tokens; App. B.2 with one centroid per image: mean / variance of the cosine over
ordered image pairs), as a table and a plot.
"""

from __future__ import annotations

import torch

from ..errors import InputError
from ..results import Result
from .clustering import cross_image_similarity
from ..loop import DEFAULT_BATCH_SIZE, batches, forward, keywords
from .partition import GROUPS, Partition


@keywords
def summarize(vlm, images, prompts=None, *, partition=None, batch_size: int = DEFAULT_BATCH_SIZE, remote=False,
              progress: bool = False) -> "PartitionSummary":
    """Classify ``images`` (>= 2) with ``partition`` (of ``vlm``) and read their LM-input vectors in the same
    forward; returns the summary."""
    from mech_vtokens.probes import Activations

    if isinstance(vlm, Partition):
        raise InputError("summarize(partition, images, ...) is the old order: call summarize(vlm, images, prompts, "
                         "partition=partition)")
    if not isinstance(partition, Partition):
        raise InputError(f"partition={partition!r}: give the Partition of calibrate(vlm, images) or "
                         f"Partition.load(path, vlm)")
    if partition.vlm is not vlm:
        raise InputError("the partition is bound to another model than vlm: calibrate it on this model or "
                         "Partition.load(path, vlm)")
    images = list(images)
    if len(images) < 2:
        raise InputError(f"the summary's cross-image similarities need at least 2 images, got {len(images)}")
    counts = torch.zeros(len(GROUPS))
    cents = {g: [] for g in GROUPS}
    for _, batch in batches(vlm, images, prompts, batch_size, progress, desc="summary"):
        out = forward(vlm, batch, [partition, acts := Activations(["hook_embed"], visual_only=True)], remote=remote)
        res, act = out[partition], out[acts]
        x = act["hook_embed"].float()
        img = batch.tokens["image"]
        for gi, g in enumerate(GROUPS):
            m = res.codes == gi
            counts[gi] += int(m.sum())
            for i in torch.unique(img).tolist():
                mm = m & (img == i)
                if bool(mm.any()):
                    cents[g].append(x[mm].mean(0))
    rows = []
    for gi, g in enumerate(GROUPS):
        r = {"group": g, "percent": float(100 * counts[gi] / counts.sum()), "images_with_group": len(cents[g]),
             "cross_image_similarity": float("nan"), "cross_image_variance": float("nan")}
        if len(cents[g]) >= 2:
            ci = cross_image_similarity([c[None] for c in cents[g]])
            r["cross_image_similarity"], r["cross_image_variance"] = float(ci.mean[0]), float(ci.var[0])
        rows.append(r)
    return PartitionSummary(rows, partition.identity.get("name"))


class PartitionSummary(Result):
    name = "partition_summary"

    def __init__(self, rows, model):
        self.rows, self.model = rows, model

    def to_pandas(self):
        import pandas as pd

        return pd.DataFrame(self.rows)

    def plot(self, axes=None):
        from pathlib import Path

        from ..views.figure import GROUP_NAMES, color_of, figure_of, subplots

        df = self.to_pandas()
        if axes is None:
            _, axes = subplots(1, 2, figsize=(9, 3.5))
        colors = [color_of(g) for g in df.group]
        names = [GROUP_NAMES.get(g, g) for g in df.group]
        bars = axes[0].bar(names, df.percent, color=colors)
        for b, p in zip(bars, df.percent):
            axes[0].annotate(f"{p:.1f} %", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center",
                             va="bottom", fontsize=7)
        axes[0].set_ylabel("% of visual tokens")
        axes[1].bar(names, df.cross_image_similarity, yerr=df.cross_image_variance.pow(0.5), color=colors)
        axes[1].set_ylabel("cross-image centroid similarity")
        axes[1].legend(bars, names, fontsize=7, title="group")
        model = self.model
        if model and Path(str(model)).is_absolute():  # a local checkpoint: its folder name, not the path
            model = Path(str(model)).name
        axes[0].set_title(f"share of each group{f' ({model})' if model else ''}", fontsize=9)
        axes[1].set_title("similarity of a group's centroid across images", fontsize=9)
        return figure_of(axes)
