"""Shared bench helpers: the medium LLaVA (real LLaVA-1.5-7B shapes, 2+2 layers, bf16), timing, RSS."""

from __future__ import annotations

import os
import statistics
import threading
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


def rss() -> int:
    """Resident set size of this process in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_above(fn) -> int:
    """Peak resident memory above the level before ``fn`` (sampled every 2 ms)."""
    import gc

    gc.collect()
    base, peak, stop = rss(), [0], [False]

    def sample():
        while not stop[0]:
            peak[0] = max(peak[0], rss())
            time.sleep(0.002)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    fn()
    stop[0] = True
    t.join()
    return max(peak[0], rss()) - base
