"""Views: offline circuitsvis views, the patch-grid viewer, the top-k words widget, the self-contained HTML report,
and the one palette every plot and view uses (``views.figure``)."""

from .circuits import View, attention, bundle, token_values
from .figure import GROUP_COLORS
from .overlay import PatchOverlay
from .report import Report
from .topk import TopWords

__all__ = ["GROUP_COLORS", "PatchOverlay", "Report", "TopWords", "View", "attention", "bundle", "token_values"]
