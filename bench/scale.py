"""Runs at scale, measured in ONE command: ratios on the medium LLaVA and on the model organism, each next to the
naive way (``output_hidden_states`` + post-hoc) and a TransformerLens ``TransformerBridge.run_with_cache``.

    PYTHONPATH=. python bench/scale.py [--repeats 3] [--models medium,organism] [--write]

Rows (time: medians of interleaved repeats in this process; peak RSS: a fresh subprocess per variant, sampled every
2 ms, above the level after loading the model):
- trace overhead: an nnsight trace saving EVERY tensor site vs a plain forward; naive = ``output_hidden_states=True``
  (+ ``output_attentions`` no); TL = ``run_with_cache`` (every hook).
- full suite (EmbedLens k=5 + LogitLens k=5 at hook_embed and every layer, NormTracker, SinkChannels) in one forward
  vs the floor = plain forward + the bare probe math (torch hooks keep the states; bf16 chunked top-k, norms, phi);
  naive = ``output_hidden_states`` + fp32 full similarity matrices post hoc; TL = ``run_with_cache`` of the needed
  hooks + the same bare math.
- peak RSS of those variants / plain forward.
- pruned (40 % of the visual tokens, seeded, ``interventions.Prune`` under ``applied``) vs plain prefill.
- result bytes per image: the runner's Parquet store vs the hidden states the naive way keeps (all layers, as
  ``output_hidden_states`` returns them) and vs the TL cache.
- 2x images vs 1x: ``run_dataset`` wall time (and RSS after the run) for 2N vs N images: linear = 2.0, flat memory.
All variants use eager attention (TransformerBridge forces it; the same kernels everywhere).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import CACHE, chunked_topk, interleaved, kept_states, peak_above, rss  # noqa: E402

K = 5
THREADS = 2


# ---- models and inputs -----------------------------------------------------------------------------------------

def model_path(name: str) -> str:
    from mech_vtokens import testing as T

    if name == "medium":
        return T.medium_llava(CACHE / "medium_llava")
    if name == "organism":
        from mech_vtokens.defaults import default_model

        return default_model()[0]
    return T.tiny_model(name, CACHE / f"tiny_{name}")


def inputs(vlm, name: str, n: int = 1, offset: int = 0):
    from mech_vtokens import testing as T
    from mech_vtokens.defaults import demo_inputs

    if name == "medium":
        return [T.image(336, seed=offset + i) for i in range(n)], [T.prompt("llava", "describe the image .")] * n
    if name == "organism":
        imgs, qs, _ = demo_inputs(n + offset, seed=1234)
        return imgs[offset:], [vlm.prompt(q) for q in qs[offset:]]
    return [T.image(112, seed=offset + i) for i in range(n)], [T.prompt(name)] * n


def load(name):
    import mech_vtokens as mv

    kw = {"dtype": torch.bfloat16} if name == "medium" else {}
    return mv.load(model_path(name), attn_implementation="eager", **kw)


def boot_bridge(path):
    import transformer_lens.model_bridge.sources.transformers.helpers as helpers

    helpers._ensure_torchvision = lambda: False  # TL would pip-install torchvision (and a CUDA torch) otherwise
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    hf = AutoModelForImageTextToText.from_pretrained(path, attn_implementation="eager").eval()  # a separate copy
    tok = AutoTokenizer.from_pretrained(path)
    return TransformerBridge.boot_transformers(path, hf_model=hf, tokenizer=tok, device="cpu")


# ---- the variants ----------------------------------------------------------------------------------------------

class Bench:
    def __init__(self, name, vlm, bridge=None, n_images=1):
        import nnsight

        from mech_vtokens.probes import EmbedLens, LogitLens, NormTracker, SinkChannels
        from mech_vtokens.probes.activations import Activations

        self.name, self.vlm, self.bridge = name, vlm, bridge
        self.imgs, self.prompts = inputs(vlm, name, n_images)
        self.batch = b = vlm.prepare(self.imgs, self.prompts)
        self.points = ["hook_embed"] + [f"blocks.{i}.hook_resid_post" for i in range(vlm.n_layers)]
        self.every = Activations([s for s in vlm.sites if s != "lm.hook_inputs"])
        self.exp_every = vlm.experiment(b, probes=[self.every])
        self.suite = lambda: [EmbedLens(k=K), LogitLens(k=K), NormTracker(), SinkChannels()]
        self.exp_suite = vlm.experiment(b, probes=self.suite())
        self.W = vlm.embedding_matrix.detach()
        self.U = vlm.unembed.weight.detach()
        nrm = torch.linalg.vector_norm(self.W.float(), dim=1)
        self.inv = torch.where(nrm > 0, 1.0 / nrm.clamp_min(1e-30), torch.zeros_like(nrm))
        self.dims = None
        self._nnsight = nnsight

    # plain / trace every site / naive hidden states / TL cache
    def plain(self):
        with torch.no_grad():
            return self.vlm.hf(**self.batch.inputs)

    def trace_all(self):
        with torch.no_grad(), self.vlm.trace(**self.batch.inputs):
            raw = self._nnsight.save(self.exp_every.execute(self.vlm.model))
        return raw

    def naive_states(self):
        with torch.no_grad():
            return self.vlm.hf(**self.batch.inputs, output_hidden_states=True)

    def _tl_kw(self):
        return {k: v for k, v in self.batch.inputs.items() if k != "input_ids"}

    def tl_cache(self, names_filter=None):
        with torch.no_grad():
            return self.bridge.run_with_cache(self.batch.inputs["input_ids"], names_filter=names_filter,
                                              **self._tl_kw())

    # the suite and its floors
    def suite_run(self):
        with torch.no_grad(), self.vlm.trace(**self.batch.inputs):
            raw = self._nnsight.save(self.exp_suite.execute(self.vlm.model))
        return raw

    def _math(self, states, fp32=False):
        """The probe math on kept states: both lenses at the points (visual tokens), norms, phi (top 2 |x| dims)."""
        vm = self.batch.visual_mask
        norm = self.vlm.final_norm
        res = {}
        for p, x in states.items():
            h = x[vm]
            if fp32:
                hf_, W, U = h.float(), self.W.float(), self.U.float()
                e = torch.nn.functional.normalize(hf_, dim=-1) @ torch.nn.functional.normalize(W, dim=-1).T
                lg = norm.float()(hf_) @ U.T if hasattr(norm, "float") else None
                res[("embed", p)] = e.topk(K, dim=1).indices
                res[("logit", p)] = lg.topk(K, dim=1).indices
            else:
                for nm, mat, hh, scale in (("embed", self.W, h, self.inv), ("logit", self.U, norm(h), None)):
                    res[(nm, p)] = chunked_topk(hh, mat, K, scale)
            xf = x.float()
            res[("norms", p)] = (xf.abs().sum(-1), xf.norm(dim=-1))
            top = xf.abs().amax((0, 1)).topk(2).indices
            res[("phi", p)] = xf[..., top].abs().amax(-1) / xf.pow(2).mean(-1).sqrt()
        if fp32:
            self.vlm.final_norm.to(self.W.dtype)
        return res

    def floor(self):
        with torch.no_grad():
            return self._math(kept_states(self.vlm, self.batch))

    def naive_suite(self):
        with torch.no_grad():
            o = self.naive_states()
            hs = o.hidden_states  # LM: embeddings + every layer (the last one final-normed in transformers 5)
            states = {p: hs[i] for i, p in enumerate(self.points)}
            return self._math(states, fp32=True)

    def tl_suite(self):
        names = {"blocks.0.hook_resid_pre": "hook_embed"}
        names.update({f"blocks.{i}.hook_resid_post": f"blocks.{i}.hook_resid_post" for i in range(self.vlm.n_layers)})
        with torch.no_grad():
            _, cache = self.tl_cache(names_filter=lambda n: n in names)
            return self._math({names[k]: cache[k] for k in names})

    # pruning
    def pruned(self):
        from mech_vtokens.interventions import Group, Prune, applied

        if not hasattr(self, "_prune"):
            n = self.batch.n_visual
            m = torch.zeros(n, dtype=torch.bool)
            m[torch.randperm(n, generator=torch.Generator().manual_seed(0))[:round(0.4 * n)]] = True
            self._prune = Prune(Group(m, "random 40 %"))
        with torch.no_grad(), applied(self.vlm, self.batch, interventions=[self._prune]):
            return self.vlm.hf(**self.batch.inputs)


# ---- memory ----------------------------------------------------------------------------------------------------



def rss_child(name, variant) -> float:
    """Peak RSS (MiB) above the loaded model, for one variant on its first call, in a fresh process."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent.parent))
    out = subprocess.run([sys.executable, __file__, "--rss", variant, "--models", name], capture_output=True,
                         text=True, env=env, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return float(out.stdout.strip().splitlines()[-1])


# ---- the runner at scale ---------------------------------------------------------------------------------------

def runner_scaling(name, vlm, n, batch_size):
    from mech_vtokens.data import InMemory
    from mech_vtokens.runner import run_dataset
    from mech_vtokens.probes import EmbedLens, LogitLens, NormTracker, SinkChannels

    res = {}
    imgs, _ = inputs(vlm, name, batch_size, offset=50)  # warm-up run (lazy imports, allocator pools), discarded
    with tempfile.TemporaryDirectory() as out:
        run_dataset(vlm, InMemory(imgs), probes=[EmbedLens(k=K), LogitLens(k=K), NormTracker(), SinkChannels()],
                    out=out, batch_size=batch_size, progress=False)
    for mult in (1, 2):
        imgs, _ = inputs(vlm, name, n * mult, offset=100)
        src = InMemory(imgs, questions=["describe the image ."] * len(imgs))
        with tempfile.TemporaryDirectory() as out:
            t = time.perf_counter()
            store = run_dataset(vlm, src, probes=[EmbedLens(k=K), LogitLens(k=K), NormTracker(), SinkChannels()],
                                out=out, batch_size=batch_size, progress=False)
            res[mult] = {"s": time.perf_counter() - t, "rss": rss(), "bytes": store.bytes() / len(store),
                         "n": len(store)}
    return res


def state_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(state_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(state_bytes(v) for v in obj)
    return 0


# ---- main ------------------------------------------------------------------------------------------------------

VARIANTS_RSS = ("plain", "suite_run", "floor", "naive_suite", "tl_suite")


def one_rss(name, variant):
    torch.set_num_threads(THREADS)
    vlm = load(name)
    bridge = boot_bridge(model_path(name)) if variant.startswith("tl_") else None
    b = Bench(name, vlm, bridge)
    print(peak_above(getattr(b, variant)) / 2 ** 20)


def measure(name, repeats, n_runner, batch_size):
    torch.set_num_threads(THREADS)
    vlm = load(name)
    bridge = boot_bridge(model_path(name))
    b = Bench(name, vlm, bridge)
    t = interleaved({"plain": b.plain, "trace_all": b.trace_all, "naive_states": b.naive_states,
                     "tl_cache": b.tl_cache}, repeats=repeats)
    t.update(interleaved({"suite": b.suite_run, "floor": b.floor, "naive_suite": b.naive_suite,
                          "tl_suite": b.tl_suite}, repeats=repeats))
    t.update({k + "_p": v for k, v in interleaved({"plain": b.plain, "pruned": b.pruned}, repeats=repeats).items()})
    mem = {v: rss_child(name, v) for v in VARIANTS_RSS}
    hidden = b.naive_states()
    naive_bytes = state_bytes(hidden.hidden_states) + state_bytes(getattr(hidden, "image_hidden_states", None))
    _, cache = b.tl_cache()
    tl_bytes = state_bytes(dict(cache.items()))
    scale = runner_scaling(name, vlm, n_runner, batch_size)
    return {"model": name, "seq": int(b.batch.visual_mask.shape[1]), "n_visual": b.batch.n_visual, "t": t,
            "mem": mem, "naive_bytes": naive_bytes, "tl_bytes": tl_bytes, "runner": scale,
            "n_runner": n_runner, "batch_size": batch_size}


def table(r) -> str:
    t, m, s = r["t"], r["mem"], r["runner"]
    p = t["plain"]
    rows = [
        ("trace overhead: trace saving every site / plain", t["trace_all"] / p,
         f"naive output_hidden_states {t['naive_states'] / p:.3f}; TL run_with_cache (all hooks) "
         f"{t['tl_cache'] / p:.3f}"),
        ("full suite (one forward) / plain forward", t["suite"] / p,
         f"floor (plain + bare math) {t['floor'] / p:.3f}; naive (hidden states + fp32) {t['naive_suite'] / p:.3f}; "
         f"TL cache + bare math {t['tl_suite'] / p:.3f}"),
        ("full suite / floor (plain forward + bare probe math)", t["suite"] / t["floor"],
         f"naive / floor {t['naive_suite'] / t['floor']:.3f}; TL / floor {t['tl_suite'] / t['floor']:.3f}"),
        ("peak RSS: suite / plain forward", m["suite_run"] / max(m["plain"], 1e-9),
         f"floor {m['floor'] / max(m['plain'], 1e-9):.2f}; naive {m['naive_suite'] / max(m['plain'], 1e-9):.2f}; "
         f"TL {m['tl_suite'] / max(m['plain'], 1e-9):.2f} (MiB above weights: plain {m['plain']:.0f}, suite "
         f"{m['suite_run']:.0f}, floor {m['floor']:.0f}, naive {m['naive_suite']:.0f}, TL {m['tl_suite']:.0f})"),
        ("pruned (40 % visual) / plain prefill", t["pruned_p"] / t["plain_p"],
         f"speed-up {t['plain_p'] / t['pruned_p']:.2f}x (HF forward under interventions.applied)"),
        ("result bytes per image: store / naive hidden states", s[1]["bytes"] / r["naive_bytes"],
         f"store {s[1]['bytes'] / 1e3:.1f} kB/image (Parquet, suite); naive {r['naive_bytes'] / 1e6:.2f} MB; "
         f"TL cache {r['tl_bytes'] / 1e6:.2f} MB (store / TL {s[1]['bytes'] / r['tl_bytes']:.4f})"),
        ("2x images vs 1x: run_dataset time", s[2]["s"] / s[1]["s"],
         f"{s[1]['n']} images {s[1]['s']:.1f} s, {s[2]['n']} images {s[2]['s']:.1f} s (linear = 2.0); RSS after "
         f"2x / after 1x {s[2]['rss'] / s[1]['rss']:.3f}"),
    ]
    out = [f"**{r['model']}** — sequence {r['seq']} tokens ({r['n_visual']} visual), plain forward "
           f"{p:.3f} s; runner: batch size {r['batch_size']}", "",
           "| figure | ratio | next to it |", "|---|---|---|"]
    out += [f"| {a} | **{b:.3f}** | {c} |" for a, b, c in rows]
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--models", default="medium,organism")
    ap.add_argument("--runner-images", type=int, default=None, help="N for the 2x-vs-1x row (default 4 medium, 16)")
    ap.add_argument("--write", action="store_true", help="append the tables to bench/RESULTS.md")
    ap.add_argument("--rss", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rss:
        return one_rss(args.models, args.rss)
    load0 = os.getloadavg()
    results = []
    for name in args.models.split(","):
        n = args.runner_images or (4 if name == "medium" else 16)
        r = measure(name, args.repeats, n, 2 if name == "medium" else 8)
        results.append(r)
        print(table(r), "\n", flush=True)
    load1 = os.getloadavg()
    note = (f"machine load (1/5/15-min averages, 2 cores shared): start {load0[0]:.1f}/{load0[1]:.1f}/{load0[2]:.1f},"
            f" end {load1[0]:.1f}/{load1[1]:.1f}/{load1[2]:.1f}; {THREADS} threads; repeats {args.repeats}")
    print(note)
    Path(CACHE).mkdir(parents=True, exist_ok=True)
    (Path(CACHE) / "scale.json").write_text(json.dumps(results, indent=1, default=float))
    if args.write:
        md = Path(__file__).parent / "RESULTS.md"
        text = md.read_text().rstrip() + "\n\n## Runs at scale (`bench/scale.py`)\n\n" \
            "    PYTHONPATH=. python bench/scale.py " \
            f"--repeats {args.repeats} --models {args.models} --write\n\n" + note + ". Time: medians of interleaved " \
            "repeats; peak RSS: first call in a fresh process, above the loaded model. " \
            "Eager attention everywhere.\n\n" \
            + "\n\n".join(table(r) for r in results) + "\n"
        md.write_text(text)


if __name__ == "__main__":
    main()
