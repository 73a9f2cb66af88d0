"""The token partition (paper Secs. 2, 4-6, App. B): anchor clustering, cross-image stability, sink / dead / alive
classification (statistical and reference-token rules), group dynamics, semantic sparsity, per-model summary."""

from .calibrate import calibrate, sink_thresholds
from .clustering import (Clusters, CrossImage, anchor_clusters, centroid_labels, cross_image_similarity,
                         max_similarity)
from .dynamics import GroupDynamics, GroupDynamicsResult
from .dominance import ClusterDominance, cluster_dominance
from .partition import GROUPS, PRESETS, Partition, PartitionGroup, PartitionResult, model_identity
from .sparsity import SparsityResult, semantic_sparsity
from .summary import PartitionSummary, summarize

__all__ = ["ClusterDominance", "cluster_dominance", "GROUPS", "PRESETS", "Clusters", "CrossImage", "GroupDynamics",
           "GroupDynamicsResult", "Partition", "PartitionGroup", "PartitionResult",
           "anchor_clusters", "calibrate", "sink_thresholds", "centroid_labels", "cross_image_similarity",
           "max_similarity",
           "model_identity", "PartitionSummary", "semantic_sparsity", "SparsityResult", "summarize"]
