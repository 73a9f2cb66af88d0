"""Views: offline circuitsvis views, the patch-grid overlay, and the self-contained HTML report."""

from .circuits import View, attention, bundle, lens_topk, token_values
from .overlay import PatchOverlay
from .report import Report

__all__ = ["PatchOverlay", "Report", "View", "attention", "bundle", "lens_topk", "token_values"]
