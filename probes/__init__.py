from .activations import Activations
from .embed_lens import EmbedLens
from .logit_lens import LogitLens
from .label_matching import LabelMatching
from .norm_tracker import NormTracker
from .sink_channels import SinkChannels
from .vit_sinks import ViTSinks

__all__ = ["Activations", "EmbedLens", "LabelMatching", "LogitLens", "NormTracker", "SinkChannels", "ViTSinks"]

from .metrics import AnswerLogProb, ChoiceProb, KLToClean, LogitDiff, MetricResult  # noqa: E402

__all__ += ["AnswerLogProb", "ChoiceProb", "KLToClean", "LogitDiff", "MetricResult"]
