"""Differences between transformers versions, written once (runs inside the trace: torch and stdlib only).

- the KV cache a module receives: keyword ``cache`` from transformers 5.24, ``past_key_values`` before;
- ``cache_position``: passed to the language model and its layers before 5.24, gone from 5.24. An intervention that
  changes the sequence (Prune, VisualEntry / VisualExit) must then give the positions of its new sequence in the
  cache, where the caller passed one.
"""

from __future__ import annotations


def kv_cache(kwargs):
    """The KV cache a module received (``cache`` from transformers 5.24, ``past_key_values`` before), or None."""
    cache = kwargs.get("cache")
    return kwargs.get("past_key_values") if cache is None else cache


def past_length(kwargs) -> int:
    """How many keys the KV cache a module received already holds (0 without a cache: a prefill)."""
    cache = kv_cache(kwargs)
    return int(cache.get_seq_length()) if cache is not None else 0


def cache_position(kwargs, start, n, device) -> dict:
    """``{"cache_position": the n cache slots from start}`` where the caller passed one (transformers < 5.24), else
    ``{}`` (newer versions have none): ``kwargs.update(cache_position(kwargs, ...))``."""
    import torch

    if kwargs.get("cache_position") is None:
        return {}
    return {"cache_position": torch.arange(start, start + n, device=device)}
