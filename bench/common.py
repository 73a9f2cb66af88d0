"""Shared bench helpers: the medium LLaVA (real LLaVA-1.5-7B shapes, 2+2 layers, bf16), timing, RSS."""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import torch

CACHE = Path(os.environ.get("MECH_VTOKENS_BENCH_CACHE", Path.home() / ".cache" / "mech-vtokens-bench"))


def medium_llava():
    import mech_vtokens as mv
    from mech_vtokens import testing as T

    path = T.medium_llava(CACHE / "medium_llava")
    vlm = mv.load(path, dtype=torch.bfloat16)
    return vlm


def medium_inputs(vlm, n: int = 1):
    from mech_vtokens import testing as T

    imgs = [T.image(336, seed=i) for i in range(n)]
    prompts = ["USER : <image> describe the image . ASSISTANT :"] * n
    return imgs, prompts


def interleaved(fns: dict, repeats: int = 5, warmup: int = 1, stat: str = "median") -> dict:
    """Seconds of each fn, run alternately (so machine noise hits all alike): the median, or with ``stat="min"``
    the fastest repeat (the least disturbed by other load, as ``timeit`` recommends on a shared machine)."""
    times = {k: [] for k in fns}
    for _ in range(warmup):
        for f in fns.values():
            f()
    for _ in range(repeats):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    pick = min if stat == "min" else statistics.median
    return {k: pick(v) for k, v in times.items()}
