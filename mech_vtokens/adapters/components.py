"""Shared behaviour of all adapters, written once (the family files are declarations)."""

from __future__ import annotations

_VIDEOLESS: dict = {}


def videoless(processor_cls):
    """A subclass of ``processor_cls`` without its video processor.

    Qwen2-VL / Qwen2.5-VL / InternVL processors fail to build when no video processor can be loaded (their video
    processors need torchvision). Images + text need none, so this subclass leaves video out of its attributes.

    transformers saves and reloads a processor by its class's ``__init__`` (``to_dict`` keeps the attributes its
    signature names, ``from_args_and_dict`` passes the kwargs its code object names): the subclass therefore keeps
    the parent's ``__init__`` untouched (``video_processor`` defaults to None there), so ``chat_template``,
    ``image_seq_length`` and every other init kwarg survive save/load.
    """
    if processor_cls in _VIDEOLESS:
        return _VIDEOLESS[processor_cls]

    class Videoless(processor_cls):
        @classmethod
        def get_attributes(cls):
            return [a for a in super().get_attributes() if "video" not in a]

    init = _video_optional(processor_cls.__init__)
    if init is not None:
        Videoless.__init__ = init
    Videoless.__name__ = Videoless.__qualname__ = processor_cls.__name__
    _VIDEOLESS[processor_cls] = Videoless
    return Videoless


def _video_optional(init):
    """A copy of ``init`` (same code object, so the same signature and argument names transformers reads) whose
    ``video_processor`` argument defaults to None, or None when it already has a default. SmolVLMProcessor requires
    it positionally; ``from_pretrained`` of the video-less subclass passes no video processor."""
    import inspect
    import types

    code = init.__code__
    names = code.co_varnames[:code.co_argcount]
    if "video_processor" not in names:
        return None
    first = names.index("video_processor")
    old = init.__defaults__ or ()
    if first >= len(names) - len(old):
        return None
    defaults = (None,) * (len(names) - len(old) - first) + tuple(old)
    copy = types.FunctionType(code, init.__globals__, init.__name__, defaults, init.__closure__)
    copy.__kwdefaults__, copy.__doc__, copy.__qualname__ = init.__kwdefaults__, init.__doc__, init.__qualname__
    assert "video_processor" in inspect.signature(copy).parameters
    return copy


# Geometries moved to ``geometry.py`` / ``anyres.py``; importable from here too (family files written against it).
from .anyres import AnyresGeometry  # noqa: E402,F401
from .geometry import CLIPGridGeometry, Geometry, QwenMergedGeometry, TiledGeometry  # noqa: E402,F401
