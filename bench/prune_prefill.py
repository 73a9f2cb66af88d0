"""Pruning: prefill time of the medium LLaVA, plain vs 40 % of the visual tokens pruned (interventions.Prune), in one
run, interleaved. Two paths: an nnsight trace (Experiment) and a plain HF forward under interventions.applied.

    PYTHONPATH=. python bench/prune_prefill.py [--repeats 5] [--fraction 0.4] [--batch 1] [--new-tokens 0]

Medium LLaVA: CLIP-L/14-336 (576 patches), LLaMA-7B widths, vocab 32000, bf16, 2 vision + 2 text layers.
Also counts the FLOPs of both forwards (torch.utils.flop_counter: matmuls, convolutions, attention), the figure
FastV's "~45 % FLOPs saved" is about, and times the language model alone (decoder layers, final norm and lm_head:
what pruning shortens) next to the whole forward (plus the vision tower and projector, a fixed cost).
``--new-tokens N`` also times whole generations of N tokens (greedy, ``min_new_tokens=N``): ``mv.generate`` plain vs
pruned (decode steps attend to the shortened cache).
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import interleaved, medium_inputs, medium_llava  # noqa: E402

import nnsight  # noqa: E402
from mech_vtokens.interventions import Group, Prune, applied  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--fraction", type=float, default=0.4)
    ap.add_argument("--batch", type=int, default=1, help="images (and prompts) per forward")
    ap.add_argument("--new-tokens", type=int, default=0, help="also time generations of this many tokens")
    args = ap.parse_args()
    torch.set_num_threads(2)
    vlm = medium_llava()
    imgs, prompts = medium_inputs(vlm, args.batch)
    batch = vlm.prepare(imgs, prompts)
    n = batch.n_visual
    k = round(args.fraction * n)
    per = n // args.batch  # the same fraction of every image's tokens
    members = torch.zeros(n, dtype=torch.bool)
    g = torch.Generator().manual_seed(0)
    for i in range(args.batch):
        members[i * per + torch.randperm(per, generator=g)[:round(args.fraction * per)]] = True
    k = int(members.sum())
    prune = Prune(Group(members, "random 40 %"))
    exp_pruned = vlm.experiment(batch, interventions=[prune])

    lm, head = vlm.hf.model.language_model, vlm.hf.lm_head
    lm_times = {"hf_plain": [], "hf_pruned": []}
    clock = {}

    def timed(key, fn):  # also time the language model alone (what pruning shortens; the vision tower is fixed)
        def run():
            h1 = lm.register_forward_pre_hook(lambda m, a: clock.__setitem__("t", time.perf_counter()))
            h2 = head.register_forward_hook(lambda m, a, o: lm_times[key].append(time.perf_counter() - clock["t"]))
            try:
                fn()
            finally:
                h1.remove()
                h2.remove()
        return run

    def hf_plain():
        with torch.no_grad():
            vlm.hf(**batch.inputs)

    def hf_pruned():
        with torch.no_grad(), applied(vlm, batch, interventions=[prune]):
            out = vlm.hf(**batch.inputs)
        assert out.logits.shape[1] == batch.visual_mask.shape[1] - k // args.batch

    def trace_plain():
        with torch.no_grad(), vlm.trace(**batch.inputs):
            nnsight.save(vlm.model.output.logits)

    def trace_pruned():
        with torch.no_grad(), vlm.trace(**batch.inputs):
            exp_pruned.execute(vlm.model)
            logits = nnsight.save(vlm.model.output.logits)
        assert logits.shape[1] == batch.visual_mask.shape[1] - k // args.batch

    from torch.utils.flop_counter import FlopCounterMode

    def flops(fn):  # whole forward, and the language model + lm_head (modules named by the adapter)
        with FlopCounterMode(display=False, depth=8) as fc:
            fn()
        per = {name: sum(v.values()) for name, v in fc.get_flop_counts().items()}
        root = type(vlm.hf).__name__
        return fc.get_total_flops(), sum(per.get(f"{root}.{p}", 0) for p in (vlm.adapter.language_model,
                                                                               vlm.adapter.lm_head))
    (f_plain, f_plain_lm), (f_pruned, f_pruned_lm) = flops(hf_plain), flops(hf_pruned)

    t = interleaved({"hf_plain": timed("hf_plain", hf_plain), "hf_pruned": timed("hf_pruned", hf_pruned),
                     "trace_plain": trace_plain, "trace_pruned": trace_pruned}, repeats=args.repeats, stat="min")
    seq = batch.visual_mask.shape[1]
    kb = k // args.batch
    print(f"batch {args.batch}; sequence {seq} tokens ({n // args.batch} visual); pruned {kb} visual per image "
          f"({k / n:.0%}) -> {seq - kb} tokens; threads {torch.get_num_threads()}")
    print(f"FLOPs           plain {f_plain / 1e9:.0f} G   pruned {f_pruned / 1e9:.0f} G   saved "
          f"{1 - f_pruned / f_plain:.1%} (ratio {f_plain / f_pruned:.2f}x); language model + lm_head "
          f"{f_plain_lm / 1e9:.0f} G -> {f_pruned_lm / 1e9:.0f} G, saved {1 - f_pruned_lm / f_plain_lm:.1%}")
    print(f"HF forward      plain {t['hf_plain']:.3f} s   pruned (applied) {t['hf_pruned']:.3f} s   "
          f"speed-up {t['hf_plain'] / t['hf_pruned']:.2f}x")
    lm_plain, lm_pruned = (min(lm_times[k][1:]) for k in ("hf_plain", "hf_pruned"))
    print(f"language model  plain {lm_plain:.3f} s   pruned {lm_pruned:.3f} s   speed-up {lm_plain / lm_pruned:.2f}x "
          f"(decoder layers + final norm + lm_head; vision tower + projector are the same in both)")
    print(f"nnsight trace   plain {t['trace_plain']:.3f} s   pruned (Experiment) {t['trace_pruned']:.3f} s   "
          f"speed-up {t['trace_plain'] / t['trace_pruned']:.2f}x")
    if args.new_tokens:
        import mech_vtokens as mv

        g = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
        gen = interleaved({"plain": lambda: mv.generate(vlm, imgs, prompts, **g),
                           "pruned": lambda: mv.generate(vlm, imgs, prompts, interventions=[prune], **g)},
                          repeats=max(1, args.repeats // 2), stat="min")
        print(f"generate {args.new_tokens} tokens (mv.generate)  plain {gen['plain']:.3f} s   pruned "
              f"{gen['pruned']:.3f} s   speed-up {gen['plain'] / gen['pruned']:.2f}x")
    # why wall-clock trails the FLOPs: the LM's own linear layers, alone, at both token counts of this batch
    rows = {r: gemm_rate(vlm, r) for r in (args.batch * seq, args.batch * (seq - kb))}
    print("LM linears alone " + "   ".join(f"{r} rows: {ms:.1f} ms, {tf:.2f} TFLOP/s" for r, (ms, tf) in rows.items()))


def gemm_rate(vlm, rows, repeats=5):
    """Time of every linear layer of the language model + lm_head on ``rows`` random rows (fastest of repeats), and
    the throughput it reaches: small row counts do not keep the matmul kernels busy."""
    layers = [m for m in vlm.hf.model.language_model.modules() if isinstance(m, torch.nn.Linear)] + [vlm.hf.lm_head]
    x = {m.in_features: torch.randn(rows, m.in_features, dtype=m.weight.dtype) for m in layers}
    best = float("inf")
    with torch.no_grad():
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            for m in layers:
                torch.nn.functional.linear(x[m.in_features], m.weight)
            best = min(best, time.perf_counter() - t0)
    flops = sum(2 * rows * m.in_features * m.out_features for m in layers)
    return best * 1e3, flops / best / 1e12


if __name__ == "__main__":
    main()
