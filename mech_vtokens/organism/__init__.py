"""The model organism: a tiny LLaVA trained on CPU on a synthetic world of shapes, colours and characters.

``CHECKPOINT_DIR`` holds the shipped checkpoint (``LlavaForConditionalGeneration`` + ``LlavaProcessor``)::

    from transformers import AutoProcessor, LlavaForConditionalGeneration
    from mech_vtokens.organism import checkpoint_path
    model = LlavaForConditionalGeneration.from_pretrained(checkpoint_path())
    processor = AutoProcessor.from_pretrained(checkpoint_path())

Training code lives in ``mech_vtokens.organism.train`` and evaluation in ``mech_vtokens.organism.evaluate``; neither
is imported here, so importing this package is cheap.
"""
from __future__ import annotations

from pathlib import Path

CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoint"


def checkpoint_path() -> Path:
    """Path of the shipped checkpoint directory (raises if it is missing)."""
    if not (CHECKPOINT_DIR / "config.json").is_file():
        raise FileNotFoundError(
            f"organism checkpoint missing at {CHECKPOINT_DIR}; train one with "
            "`python -m mech_vtokens.organism.train --out DIR`"
        )
    return CHECKPOINT_DIR


__all__ = ["CHECKPOINT_DIR", "checkpoint_path"]
