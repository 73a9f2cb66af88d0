"""Probe suite cost: the full suite in one nnsight forward vs a plain forward, the bare-torch "floor" and the naive way.

    python bench/probe_suite.py [--repeats 3] [--write]

Medium LLaVA (bench/common.py): CLIP-L/14-336 (576 patches), LLaMA-7B widths, vocab 32000, bf16, 2 vision + 2 text
layers. Suite = EmbedLens(k=5) + LogitLens(k=5) at hook_embed and every blocks.{i}.hook_resid_post for all visual
tokens, NormTracker (every vision and LM layer), SinkChannels (φ with the LLaMA-2-7B dims, BOS cosine, every
sublayer). Floor = plain forward (torch hooks keep the states) + the same lens math in bare torch bf16, chunked over
the vocabulary, no fp32 re-rank, + norms and φ. Naive = output_hidden_states=True + fp32 full similarity matrices.
``--write`` appends/replaces the "Probe suite" section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import chunked_topk, interleaved, kept_states, medium_inputs, medium_llava, peak_above  # noqa: E402

import nnsight  # noqa: E402
from mech_vtokens.probes import EmbedLens, LogitLens, NormTracker, SinkChannels  # noqa: E402

K = 5
DIMS = [1415, 2533]




def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(2)
    vlm = medium_llava()
    hf, a = vlm.hf, vlm.adapter
    imgs, prompts = medium_inputs(vlm)
    batch = vlm.prepare(imgs, prompts)
    n_layers = vlm.n_layers
    points = ["hook_embed"] + [f"blocks.{i}.hook_resid_post" for i in range(n_layers)]
    suite = [EmbedLens(k=K), LogitLens(k=K), NormTracker(), SinkChannels(dims=DIMS)]
    exp = vlm.experiment(batch, probes=suite)
    W = vlm.embedding_matrix.detach()
    U = vlm.unembed.weight.detach()
    norm = vlm.final_norm
    vm = batch.visual_mask
    out = {}

    def plain():
        with torch.no_grad():
            hf(**batch.inputs)

    def run_suite():
        with torch.no_grad(), vlm.trace(**batch.inputs):
            raw = nnsight.save(exp.execute(vlm.model))
        out["raw"] = raw

    # inverse embedding-row norms, precomputed once (as the suite does outside its trace); the padding row is zero
    nrm = torch.cat([torch.linalg.vector_norm(W[s:s + 2048].float(), dim=1) for s in range(0, W.shape[0], 2048)])
    inv = torch.where(nrm > 0, 1.0 / nrm.clamp_min(1e-30), torch.zeros_like(nrm))

    def floor():
        with torch.no_grad():
            st = kept_states(vlm, batch)
            res = {}
            for p in points:
                x = st[p]
                h = x[vm]
                for name, mat, hh, scale in (("embed", W, h, inv), ("logit", U, norm(h), None)):
                    res[(name, p)] = chunked_topk(hh, mat, K, scale)
                xf = x.float()
                res[("norms", p)] = (xf.abs().sum(-1), xf.norm(dim=-1))
                res[("phi", p)] = xf[..., DIMS].abs().amax(-1) / xf.pow(2).mean(-1).sqrt()
        out["floor"] = res

    def naive():
        with torch.no_grad():
            o = hf(**batch.inputs, output_hidden_states=True)
            hs = list(o.hidden_states)
            res = {}
            Wn = F.normalize(W.float(), dim=1)
            Uf = U.float()
            for idx, p in enumerate(points):
                h = (hs[idx] if idx < n_layers else out["last"])[vm].float()
                res[("embed", p)] = (F.normalize(h, dim=1) @ Wn.T).topk(K, dim=1).indices
                res[("logit", p)] = (norm(h.to(W.dtype)).float() @ Uf.T).topk(K, dim=1).indices
                res[("norms", p)] = (h.abs().sum(-1), h.norm(dim=-1))
        out["naive"] = res

    # the last layer's raw output (hidden_states[-1] is final-normed in transformers 5): take it from a hook once
    out["last"] = kept_states(vlm, batch)[f"blocks.{n_layers - 1}.hook_resid_post"]

    if args.mode:  # child process: peak RSS of one mode's SECOND call (the first pays one-time set-up) in a fresh
        # process whose allocator returns large blocks to the OS at once (see the parent), so RSS tracks live memory
        fn = {"plain": plain, "suite": run_suite, "floor": floor, "naive": naive}[args.mode]
        fn()
        print("PEAK", peak_above(fn))
        return
    import subprocess

    mem = {}
    for mode in ("plain", "suite", "floor", "naive"):
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
        r = subprocess.run([sys.executable, __file__, "--mode", mode], capture_output=True, text=True, env=env)
        mem[mode] = int([ln for ln in r.stdout.splitlines() if ln.startswith("PEAK")][0].split()[1])
    # the naive way allocates ~1 GiB of fp32 per call, which disturbs whatever runs next: time it on its own
    times = interleaved({"plain": plain, "suite": run_suite, "floor": floor}, repeats=args.repeats, stat="min")
    times.update(interleaved({"naive": naive}, repeats=max(1, args.repeats // 2), stat="min"))

    # exactness: suite ids vs an fp32 computation (the naive way IS fp32), and the bf16 floor's agreement
    el, ll = exp.results(out["raw"])[:2]
    same = all(torch.equal(el.ids[p], out["naive"][("embed", p)]) and torch.equal(ll.ids[p], out["naive"][("logit", p)])
               for p in points)
    n_tok = sum(out["naive"][("embed", p)].numel() for p in points) * 2
    floor_agree = sum(int((out["floor"][(n, p)] == out["naive"][(n, p)]).sum()) for n in ("embed", "logit")
                      for p in points) / n_tok
    top1_floor = sum(int((out["floor"][(n, p)][:, 0] == out["naive"][(n, p)][:, 0]).sum()) for n in ("embed", "logit")
                     for p in points) / (n_tok / K)

    def nbytes(x):
        if isinstance(x, torch.Tensor):
            return x.numel() * x.element_size()
        if isinstance(x, dict):
            return sum(nbytes(v) for v in x.values())
        if isinstance(x, (list, tuple)):
            return sum(nbytes(v) for v in x)
        return 0

    res_bytes = nbytes(out["raw"])
    seq, d = vm.shape[1], a.d_model
    hidden_bytes = len(points) * seq * d * W.element_size()
    d_v = hf.config.vision_config.hidden_size
    read_bytes = ((2 * n_layers + 1) * seq * d + vlm.n_vision_layers * 577 * d_v) * W.element_size()
    fallbacks = sum(el.fallbacks.values()) + sum(ll.fallbacks.values())
    gib = 2 ** 20
    rows = [
        ("plain forward", times["plain"], 1.0, mem["plain"]),
        ("suite (one nnsight forward)", times["suite"], times["suite"] / times["plain"], mem["suite"]),
        ("floor (forward + bare torch bf16 chunked)", times["floor"], times["floor"] / times["plain"], mem["floor"]),
        ("naive (output_hidden_states + fp32 full)", times["naive"], times["naive"] / times["plain"], mem["naive"]),
    ]
    lines = [
        "## Probe suite",
        "",
        "    python bench/probe_suite.py --repeats %d --write" % args.repeats,
        "",
        f"Medium LLaVA (LLaVA-1.5-7B widths, bf16, 2 vision + 2 text layers), 1 image, sequence {seq} tokens "
        f"({batch.n_visual} visual), {len(points)} lens points, 2 CPU threads; fastest of {args.repeats} interleaved "
        f"runs; peak RSS above the level before the call (model loaded), measured on the second call in a fresh "
        f"process per run (glibc told to return blocks >= 64 KiB to the OS at once), sampled every 2 ms.",
        "Suite = EmbedLens top-5 + LogitLens top-5 (hook_embed + every layer, all visual tokens) + NormTracker (all "
        "vision + LM layers) + SinkChannels (φ on LLaMA-2-7B dims, BOS cosine, every sublayer).",
        "",
        "| run | time (s) | × plain | peak RSS above weights (MiB) |",
        "|---|---|---|---|",
    ]
    lines += [f"| {n} | {t:.3f} | {r:.2f} | {m / gib:.0f} |" for n, t, r, m in rows]
    lines += [
        "",
        f"- suite / floor = **{times['suite'] / times['floor']:.3f}** (goal ≤ 1.10); naive / suite = "
        f"{times['naive'] / times['suite']:.2f}",
        f"- suite top-5 ids identical to fp32 (both lenses, every point, every visual token): **{'yes' if same else 'NO'}**"
        f" ({fallbacks} of {n_tok // K} token-points needed the full-vocabulary fp32 fallback)"
        f"; the bf16 floor alone agrees on {100 * floor_agree:.2f} % of top-5 ids and {100 * top1_floor:.2f} % of "
        f"top-1 ids",
        f"- peak RSS above weights: suite / plain = {mem['suite'] / max(1, mem['plain']):.2f} (goal ≤ 1.3); naive / "
        f"plain = {mem['naive'] / max(1, mem['plain']):.2f}",
        f"- result bytes per image: {res_bytes / 1e6:.2f} MB vs {hidden_bytes / 1e6:.1f} MB of raw hidden states at "
        f"the {len(points)} lens points = {100 * res_bytes / hidden_bytes:.2f} %; vs the "
        f"{read_bytes / 1e6:.1f} MB of states the suite reads ({2 * n_layers + 1} LM sublayers + "
        f"{vlm.n_vision_layers} vision layers) = **{100 * res_bytes / read_bytes:.2f} %** (goal ≤ 1 %)",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.write:
        path = Path(__file__).parent / "RESULTS.md"
        old = path.read_text() if path.exists() else "# Bench results\n\n"
        if "## Probe suite" in old:
            head, rest = old.split("## Probe suite", 1)
            nxt = rest.find("\n## ")
            old = head + (rest[nxt + 1:] if nxt >= 0 else "")
        path.write_text(old.rstrip("\n") + "\n\n" + text)


if __name__ == "__main__":
    main()
