"""Anchor clustering of visual tokens (paper App. B.1, Fig. 1 right) and cross-image cluster similarity (App. B.2,
Fig. 1 left); EmbedLens labels of cluster centroids (Sec. 3.2 "Cluster Tracking").

Anchor rule (the paper does not give one; this is ours, deterministic): vectors are L2-normalised; while tokens are
unassigned, the ANCHOR is the unassigned token with the most unassigned neighbours at cosine >= τ (ties: the lowest
index); its cluster is every unassigned token with cosine to the anchor >= τ (the anchor included). So the first
clusters are the densest, no token is in two clusters, and every token ends in one (a lone token is a cluster of 1).
Clusters are then ranked by size (ties: by their smallest member index). Centroid = the mean of the members' raw
vectors.

Cross-image similarity: centroids of each image's clusters are L2-normalised; for images a, b:
S_ij = C_i(a) · C_j(b) and s_i = max_j S_ij. ``cross_image_similarity`` averages s_i over the ordered image pairs
(a != b) per cluster rank i (0 = the largest), and reports the variance too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import InputError


def _check_tau(tau) -> float:
    try:
        tau = float(tau)
    except (TypeError, ValueError):
        raise InputError(f"τ={tau!r}: give a cosine threshold in (0, 1] "
                         f"(the paper uses 0.9; 0.8 and 0.95 too)") from None
    if not 0.0 < tau <= 1.0:
        raise InputError(f"τ={tau}: the cosine threshold must be in (0, 1] (the paper uses 0.9; 0.8 and 0.95 too)")
    return tau


@dataclass
class Clusters:
    """The clusters of one set of vectors, ranked by size: ``members[i]`` (indices into the input, ascending),
    ``anchors[i]``, ``centroids`` (n_clusters, d) raw means, ``labels`` (n,) cluster rank of every vector."""

    members: list
    anchors: list
    centroids: torch.Tensor
    labels: torch.Tensor
    tau: float

    @property
    def sizes(self) -> list[int]:
        return [len(m) for m in self.members]

    def top_sizes(self, k: int = 5) -> list[int]:
        """Sizes of the ``k`` largest clusters (0-padded), Fig. 1 right."""
        s = self.sizes[:k]
        return s + [0] * (k - len(s))

    def __len__(self) -> int:
        return len(self.members)


def anchor_clusters(x: torch.Tensor, tau: float = 0.9) -> Clusters:
    """Anchor clustering of the rows of ``x`` (n, d) at cosine threshold ``tau`` (App. B.1); see the module doc."""
    tau = _check_tau(tau)
    x = torch.as_tensor(x)
    if x.ndim != 2 or x.shape[0] == 0:
        raise InputError(f"anchor_clusters needs an (n, d) matrix with n >= 1 vectors, got shape {tuple(x.shape)}")
    xf = x.detach().float()
    xn = torch.nn.functional.normalize(xf, dim=-1)
    adj = (xn @ xn.T) >= tau - 1e-6  # tolerance: identical vectors must join at τ = 1
    adj.fill_diagonal_(True)
    free = torch.ones(len(x), dtype=torch.bool)
    found = []
    while bool(free.any()):
        counts = (adj & free[None, :]).sum(1).masked_fill(~free, -1)
        a = int(torch.argmax(counts))  # argmax returns the first maximum: lowest index on ties
        mem = (adj[a] & free).nonzero()[:, 0]
        found.append((a, mem))
        free[mem] = False
    found.sort(key=lambda t: (-len(t[1]), int(t[1][0])))
    labels = torch.empty(len(x), dtype=torch.long)
    for i, (_, mem) in enumerate(found):
        labels[mem] = i
    cents = torch.stack([xf[mem].mean(0) for _, mem in found])
    return Clusters([m.tolist() for _, m in found], [a for a, _ in found], cents, labels, tau)


@dataclass
class CrossImage:
    """Per cluster rank i: ``mean[i]`` / ``var[i]`` of s_i over ordered image pairs, ``n_pairs[i]`` pairs counted
    (an image with fewer than i+1 clusters does not contribute for rank i). ``per_pair``: {(a, b): s (n_a,)}."""

    mean: torch.Tensor
    var: torch.Tensor
    n_pairs: torch.Tensor
    per_pair: dict = field(default_factory=dict)

    def to_pandas(self):
        import pandas as pd

        return pd.DataFrame({"cluster": range(len(self.mean)), "similarity_mean": self.mean.numpy(),
                             "similarity_var": self.var.numpy(), "n_pairs": self.n_pairs.numpy()})


def max_similarity(c1: torch.Tensor, c2: torch.Tensor) -> torch.Tensor:
    """s_i = max_j C1_i · C2_j over L2-normalised centroids (App. B.2); (n1,)."""
    a = torch.nn.functional.normalize(torch.as_tensor(c1).float(), dim=-1)
    b = torch.nn.functional.normalize(torch.as_tensor(c2).float(), dim=-1)
    return (a @ b.T).amax(1)


def cross_image_similarity(centroids: list, top: int | None = None) -> CrossImage:
    """Cross-image similarity of cluster centroids (App. B.2). ``centroids``: one (n_clusters, d) tensor (or
    :class:`Clusters`) per image, rows ranked by cluster size. ``top``: keep only the first ``top`` ranks."""
    cs = [c.centroids if isinstance(c, Clusters) else torch.as_tensor(c) for c in centroids]
    if len(cs) < 2:
        raise InputError(f"cross-image similarity needs at least 2 images, got {len(cs)}; pass the clusters of two "
                         f"or more images")
    if top is not None:
        cs = [c[:top] for c in cs]
    width = max(len(c) for c in cs)
    sums = [[] for _ in range(width)]
    per = {}
    for a in range(len(cs)):
        for b in range(len(cs)):
            if a == b or not len(cs[a]) or not len(cs[b]):
                continue
            s = max_similarity(cs[a], cs[b])
            per[(a, b)] = s
            for i, v in enumerate(s.tolist()):
                sums[i].append(v)
    mean = torch.tensor([sum(v) / len(v) if v else float("nan") for v in sums])
    var = torch.tensor([torch.tensor(v).var(unbiased=False).item() if v else float("nan") for v in sums])
    return CrossImage(mean, var, torch.tensor([len(v) for v in sums]), per)


def centroid_labels(vlm, centroids: torch.Tensor, k: int = 3, skip_special: bool = False):
    """EmbedLens labels of centroids (Sec. 3.2, "Cluster Tracking"): (ids (n, k), cosines (n, k)) of the top-k INPUT
    embeddings by cosine, with the probes' exact fp32 re-rank (``mech_vtokens.ops``)."""
    from mech_vtokens.ops import topk_rerank
    from mech_vtokens.probes.lens import _special_ids

    weight = vlm.embedding_matrix.detach()
    norms = weight.float().norm(dim=1)
    scale = torch.where(norms > 0, 1.0 / norms.clamp_min(1e-30), torch.zeros_like(norms))
    pen = None
    if skip_special:
        pen = torch.zeros(weight.shape[0])
        pen[_special_ids(vlm.tokenizer, weight.shape[0])] = float("-inf")
    h = torch.as_tensor(centroids).to(weight.device)
    v, i, _ = topk_rerank(h, weight, k, max(2 * k, k + 3), 8192, row_scale=scale, penalty=pen, normalize=True)
    return i, v
