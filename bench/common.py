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
    prompts = [T.prompt("llava", "describe the image .")] * n
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


def kept_states(vlm, batch) -> dict:
    """A plain HF forward that keeps the LM input (``hook_embed``) and each decoder layer's output (torch hooks,
    removed after): what a post-hoc probe pipeline would hold."""
    from mech_vtokens.adapters.base import _resolve

    hf, a = vlm.hf, vlm.adapter
    got, hooks = {}, []
    hooks.append(_resolve(hf, a.language_model).register_forward_pre_hook(
        lambda m, args, kw: got.__setitem__("hook_embed", kw["inputs_embeds"]), with_kwargs=True))
    for i, layer in enumerate(_resolve(hf, a.decoder_layers)):
        hooks.append(layer.register_forward_hook(
            lambda m, i_, o, i=i: got.__setitem__(f"blocks.{i}.hook_resid_post", o[0] if isinstance(o, tuple)
                                                  else o)))
    forward_with_hooks(hf, batch.inputs, hooks)
    return got


def forward_with_hooks(hf, inputs, hooks) -> None:
    """One no-grad HF forward with ``hooks`` (torch hook handles) installed; every one removed after, also on error."""
    try:
        with torch.no_grad():
            hf(**inputs)
    finally:
        for h in hooks:
            h.remove()


def chunked_topk(h, mat, k: int, scale=None, chunk: int = 8192, values: bool = False):
    """Top-k ids of ``h @ mat.T`` (times ``scale`` per column, e.g. inverse row norms for a cosine), over vocabulary
    chunks with a running top-k, in the model dtype: the bare floor the probe suite is timed against.
    ``values=True``: (values, ids)."""
    bv = bi = None
    for s in range(0, mat.shape[0], chunk):
        sc = h @ mat[s:s + chunk].T
        if scale is not None:
            sc = sc * scale[s:s + chunk].to(sc.dtype)
        v, i = sc.topk(min(k, sc.shape[1]), dim=1)
        i = i + s
        if bv is not None:
            v, i2 = torch.cat([bv, v], 1), torch.cat([bi, i], 1)
            v, j = v.topk(k, dim=1)
            i = i2.gather(1, j)
        bv, bi = v, i
    return (bv, bi) if values else bi
