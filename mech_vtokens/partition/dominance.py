"""Paper Fig. 1: cluster dominance and cross-image stability of the projected visual tokens.

Per image, anchor clustering (App. B.1, τ) of its visual tokens as the LM receives them (``hook_embed``); right panel:
the sizes of the 5 largest clusters per image (mean ± std over images); left panel: the cross-image similarity of the
cluster of each rank (App. B.2: s_i = max_j C_i·C_j over normalised centroids, mean ± std over image pairs).
"""

from __future__ import annotations

import torch

from ..errors import InputError
from ..loop import DEFAULT_BATCH_SIZE, batches, forward, keywords
from ..results import Result
from .clustering import anchor_clusters, cross_image_similarity


@keywords
def cluster_dominance(vlm, images, prompts=None, *, tau: float = 0.9, top: int = 5,
                      batch_size: int = DEFAULT_BATCH_SIZE, remote=False, progress: bool = False) -> "ClusterDominance":
    """Cluster the LM-input visual tokens of each image (one forward per ``batch_size`` images) and compare across
    images."""
    from mech_vtokens.probes import Activations

    images = list(images)
    if len(images) < 2:
        raise InputError(f"Fig. 1 compares clusters across images: pass at least 2 images, got {len(images)}")
    prompts = prompts or [vlm.image_placeholder] * len(images)
    clusters = []
    for _, batch in batches(vlm, images, prompts, batch_size, progress, desc="clusters"):
        act = forward(vlm, batch, [Activations(["hook_embed"], visual_only=True)], remote=remote)["activations"]
        x = act["hook_embed"].float()
        img = batch.tokens["image"]
        clusters += [anchor_clusters(x[img == i], tau) for i in torch.unique(img).tolist()]
    return ClusterDominance(clusters, cross_image_similarity(clusters, top=top), tau, top)


class ClusterDominance(Result):
    """What :func:`cluster_dominance` returns (paper Fig. 1): ``clusters`` per image, ``cross`` similarities."""

    name = "cluster_dominance"

    def __init__(self, clusters, cross, tau, top):
        self.clusters, self.cross, self.tau, self.top = clusters, cross, tau, top

    def sizes(self) -> torch.Tensor:
        """(images, top) sizes of the largest clusters."""
        return torch.tensor([c.top_sizes(self.top) for c in self.clusters], dtype=torch.float)

    def to_pandas(self):

        s = self.sizes()
        df = self.cross.to_pandas()
        df = df[df.cluster < self.top].copy()
        df["size_mean"] = s.mean(0).numpy()[: len(df)]
        df["size_std"] = s.std(0, unbiased=False).numpy()[: len(df)]
        return df

    def plot(self, axes=None):
        from ..views.figure import GROUP_COLORS, figure_of, integer_layers, subplots

        df = self.to_pandas()
        if axes is None:
            _, axes = subplots(1, 2, figsize=(9, 3.5))
        col = GROUP_COLORS["visual"]
        axes[0].bar(df.cluster, df.similarity_mean, yerr=df.similarity_var.pow(0.5), color=col,
                    label="mean ± std over image pairs")
        axes[0].set_ylabel("cross-image similarity")
        axes[0].legend(fontsize=7)
        axes[0].set_title(f"cross-image similarity per cluster rank (τ={self.tau})", fontsize=9)
        axes[0].set_xlabel("cluster (ranked by size)")
        axes[1].bar(df.cluster, df.size_mean, yerr=df.size_std, color=col, label="mean ± std over images")
        axes[1].set_ylabel("visual tokens in the cluster")
        axes[1].legend(fontsize=7)
        for ax in axes:
            integer_layers(ax)
        axes[1].set_title("tokens in the top clusters per image", fontsize=9)
        axes[1].set_xlabel("cluster (ranked by size)")
        return figure_of(axes)
