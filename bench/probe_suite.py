"""Probe suite cost on both backends (one nnsight trace; plain torch hooks via ``applied``) vs a bare-torch floor
that does the SAME work, a plain forward and the naive way.

    python bench/probe_suite.py [--repeats 7] [--write] [--no-memory]

Medium LLaVA (bench/common.py): CLIP-L/14-336 (576 patches), LLaMA-7B widths, vocab 32000, bf16, 2 vision + 2 text
layers. Suite (bench/suite_floor.py ``suite_probes``) = EmbedLens(k=5) + LogitLens(k=5) at hook_embed and every
blocks.{i}.hook_resid_post for all visual tokens over every matrix row (``unused_rows=True``: the medium model's toy
tokenizer names 86 of the 32000 rows, a real LLaVA tokenizer ~all of them), NormTracker (every vision and LM layer),
SinkChannels (φ with the LLaMA-2-7B dims, BOS cosine, every sublayer), ViTSinks (the vision layer the LM receives).
Floors (bench/suite_floor.py ``floor``) = plain forward (torch hooks keep the states) + the same numbers in bare
torch: "bf16 ids" (one chunked pass in the model dtype, no re-rank) and "exact ids" (candidates re-scored in fp32 +
the full-vocabulary look for tokens without a safe margin, ids equal fp32 as the suite's). The exact floor's
outputs are checked EQUAL to both backends' results (ids exact, values within 1e-4) and printed. Naive =
output_hidden_states=True + fp32 full similarity matrices (lenses and norms only; the fp32 reference for the ids).
Timings: fastest of N interleaved repeats, with the 1-minute load average printed before and after.
``--write`` replaces the "Probe suite vs a same-work floor" section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import interleaved, kept_states, medium_inputs, medium_llava, peak_above  # noqa: E402
import suite_floor as SF  # noqa: E402

import nnsight  # noqa: E402
from mech_vtokens.harness import applied  # noqa: E402

K = 5
DIMS = [1415, 2533]
SECTION = "## Probe suite vs a same-work floor"


def main():  # noqa: C901 - a benchmark script: argument handling, modes and the report in one sequence
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-RSS runs (one fresh process per mode)")
    ap.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(2)
    vlm = medium_llava()
    hf, a = vlm.hf, vlm.adapter
    imgs, prompts = medium_inputs(vlm)
    batch = vlm.prepare(imgs, prompts)
    n_layers = vlm.n_layers
    points = ["hook_embed"] + [f"blocks.{i}.hook_resid_post" for i in range(n_layers)]
    suite = SF.suite_probes(K, DIMS)
    exp = vlm.experiment(batch, probes=suite)
    W = vlm.embedding_matrix.detach()
    U = vlm.unembed.weight.detach()
    norm = vlm.final_norm
    vm = batch.visual_mask
    inv = SF.inverse_row_norms(W)  # once per model, outside the timed calls (as the suite caches it)
    out = {}

    def plain():
        with torch.no_grad():
            hf(**batch.inputs)

    def run_suite():  # one nnsight trace, then the Result objects (on the CPU)
        with torch.no_grad(), vlm.trace(**batch.inputs):
            raw = nnsight.save(exp.execute(vlm.model))
        out["suite"] = exp.results(raw)

    def run_hooks():  # the same components as plain torch hooks on the HF model, then the same Result objects
        with torch.no_grad(), applied(vlm, batch, probes=suite) as h:
            hf(**batch.inputs)
        out["hooks"] = h.experiment.results(h.raw)

    def floor_exact():
        out["floor_exact"] = SF.floor(vlm, batch, K, DIMS, inv, exact=True)

    def floor_bf16():
        out["floor_bf16"] = SF.floor(vlm, batch, K, DIMS, inv, exact=False)

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
    fns = {"plain": plain, "suite": run_suite, "hooks": run_hooks, "floor_exact": floor_exact,
           "floor_bf16": floor_bf16, "naive": naive}

    if args.mode:  # child process: peak RSS of one mode's SECOND call (the first pays one-time set-up) in a fresh
        # process whose allocator returns large blocks to the OS at once (see the parent), so RSS tracks live memory
        fn = fns[args.mode]
        fn()
        print("PEAK", peak_above(fn))
        return
    import subprocess

    load0 = os.getloadavg()
    t0 = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    mem = {m: float("nan") for m in fns}
    for mode in () if args.no_memory else fns:
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
        r = subprocess.run([sys.executable, __file__, "--mode", mode], capture_output=True, text=True, env=env)
        mem[mode] = int([ln for ln in r.stdout.splitlines() if ln.startswith("PEAK")][0].split()[1])
    load1 = os.getloadavg()
    # the naive way allocates ~1 GiB of fp32 per call, which disturbs whatever runs next: time it on its own
    timed = {k: f for k, f in fns.items() if k != "naive"}
    times = interleaved(timed, repeats=args.repeats, stat="min")
    load2 = os.getloadavg()
    times.update(interleaved({"naive": naive}, repeats=max(1, args.repeats // 2), stat="min"))
    t1 = time.strftime("%H:%M", time.gmtime())

    # the same work: the exact floor's outputs vs each backend's results; the backends vs each other
    checks = {b: SF.check(vlm, out[b], out["floor_exact"]) for b in ("suite", "hooks")}
    fl_ok = {b: all(ok for ok, _ in c.values()) for b, c in checks.items()}
    el, ll = out["suite"][:2]
    hel, hll = out["hooks"][:2]
    backends_same = all(torch.equal(x.ids[p], y.ids[p]) and torch.equal(x.scores[p], y.scores[p])
                        for x, y in ((el, hel), (ll, hll)) for p in points)
    # exactness: suite ids vs an fp32 computation (the naive way IS fp32), and the bf16 floor's agreement
    same = all(torch.equal(el.ids[p].long(), out["naive"][("embed", p)]) and
               torch.equal(ll.ids[p].long(), out["naive"][("logit", p)]) for p in points)
    n_tok = sum(out["naive"][("embed", p)].numel() for p in points) * 2
    fb = out["floor_bf16"]
    floor_agree = sum(int((fb[(n, p)][0] == out["naive"][(n, p)]).sum()) for n in ("embed", "logit")
                      for p in points) / n_tok
    top1_floor = sum(int((fb[(n, p)][0][:, 0] == out["naive"][(n, p)][:, 0]).sum()) for n in ("embed", "logit")
                     for p in points) / (n_tok / K)

    def nbytes(x):
        if isinstance(x, torch.Tensor):
            return x.numel() * x.element_size()
        if isinstance(x, dict):
            return sum(nbytes(v) for v in x.values())
        if isinstance(x, (list, tuple)):
            return sum(nbytes(v) for v in x)
        return 0

    with torch.no_grad(), vlm.trace(**batch.inputs):
        raw = nnsight.save(exp.execute(vlm.model))
    res_bytes = nbytes(raw)
    seq, d = vm.shape[1], a.d_model
    hidden_bytes = len(points) * seq * d * W.element_size()
    d_v = hf.config.vision_config.hidden_size
    read_bytes = ((2 * n_layers + 1) * seq * d + vlm.n_vision_layers * 577 * d_v) * W.element_size()
    fallbacks = sum(el.fallbacks.values()) + sum(ll.fallbacks.values())
    mib = 2 ** 20
    names = {"plain": "plain forward", "suite": "suite, nnsight trace (`mv.run`'s path)",
             "hooks": "suite, plain torch hooks (`applied`)", "floor_exact": "floor, exact ids (fp32 re-rank)",
             "floor_bf16": "floor, bf16 ids (no re-rank)", "naive": "naive (output_hidden_states + fp32 full)"}
    rows = [(names[m], times[m], times[m] / times["plain"], times[m] / times["floor_exact"], mem[m]) for m in fns]

    def fmt_check(c):
        return "; ".join(f"{k} {'=' if ok else '≠'} (worst {v:.2g})" for k, (ok, v) in c.items())

    lines = [
        SECTION,
        "",
        "    python bench/probe_suite.py --repeats %d --write%s" % (args.repeats, " --no-memory" * args.no_memory),
        "",
        f"{t0}–{t1} UTC. Machine load (1/5/15-min averages, 2 cores shared with other engineers' jobs): before "
        f"{'/'.join(f'{x:.2f}' for x in load0)}, after the memory runs {'/'.join(f'{x:.2f}' for x in load1)}, after "
        f"the timed runs {'/'.join(f'{x:.2f}' for x in load2)}.",
        f"Medium LLaVA (LLaVA-1.5-7B widths, bf16, 2 vision + 2 text layers), 1 image, sequence {seq} tokens "
        f"({batch.n_visual} visual), {len(points)} lens points over all {W.shape[0]} matrix rows, 2 CPU threads; "
        f"fastest of {args.repeats} interleaved runs (naive: of {max(1, args.repeats // 2)}, on its own); suite times "
        f"include building the Result objects. Peak RSS above the loaded model on the second call in a fresh process "
        f"per mode (glibc returns blocks >= 64 KiB to the OS at once), sampled every 2 ms.",
        "Suite = EmbedLens + LogitLens top-5 (hook_embed + every layer, all visual tokens, `unused_rows=True`) + "
        "NormTracker (L1/L2/cos to the previous layer, every vision + LM layer) + SinkChannels (φ on the LLaMA-2-7B "
        "dims, BOS cosine, every sublayer; ranks) + ViTSinks (vision layer the LM receives). Floors = plain forward "
        "with torch hooks keeping the states + the same numbers in bare torch (bench/suite_floor.py).",
        "",
        "| run | time (s) | × plain | × floor (exact ids) | peak RSS above weights (MiB) |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {n} | {t:.3f} | {r:.2f} | {rf:.3f} | {'not measured' if m != m else f'{m / mib:.0f}'} |"
              for n, t, r, rf, m in rows]
    lines += [
        "",
        f"- suite (nnsight) / floor exact = **{times['suite'] / times['floor_exact']:.3f}**; suite (hooks) / floor "
        f"exact = **{times['hooks'] / times['floor_exact']:.3f}** (goal ≤ 1.10); suite (nnsight) / floor bf16 = "
        f"{times['suite'] / times['floor_bf16']:.3f}, suite (hooks) / floor bf16 = "
        f"{times['hooks'] / times['floor_bf16']:.3f}; floor exact / floor bf16 = "
        f"{times['floor_exact'] / times['floor_bf16']:.3f} (the price of exact ids)",
        f"- same work: the exact floor's outputs equal the suite's — nnsight: **{'yes' if fl_ok['suite'] else 'NO'}**, "
        f"hooks: **{'yes' if fl_ok['hooks'] else 'NO'}** ({fmt_check(checks['suite'])}); the two backends' lens ids "
        f"and scores identical: **{'yes' if backends_same else 'NO'}**",
        f"- suite top-5 ids identical to fp32 (both lenses, every point, every visual token): "
        f"**{'yes' if same else 'NO'}**"
        f" ({fallbacks} of {n_tok // K} token-points needed the full-vocabulary fallback)"
        f"; the bf16 floor agrees on {100 * floor_agree:.2f} % of top-5 ids and {100 * top1_floor:.2f} % of "
        f"top-1 ids",
        "- peak RSS: not measured (--no-memory)" if args.no_memory else
        f"- peak RSS above weights: suite / plain = {mem['suite'] / max(1, mem['plain']):.2f}, hooks / plain = "
        f"{mem['hooks'] / max(1, mem['plain']):.2f} (goal ≤ 1.3); naive / plain = "
        f"{mem['naive'] / max(1, mem['plain']):.2f}",
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
        if SECTION in old:
            head, rest = old.split(SECTION, 1)
            nxt = rest.find("\n## ")
            old = head + (rest[nxt + 1:] if nxt >= 0 else "")
        path.write_text(old.rstrip("\n") + "\n\n" + text)


if __name__ == "__main__":
    main()
