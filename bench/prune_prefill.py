"""Pruning: prefill time of the medium LLaVA, plain vs 40 % of the visual tokens pruned (interventions.Prune), in one
run, interleaved. Two paths: an nnsight trace (Experiment) and a plain HF forward under interventions.applied.

    PYTHONPATH=. python bench/prune_prefill.py [--repeats 5] [--fraction 0.4]

Medium LLaVA: CLIP-L/14-336 (576 patches), LLaMA-7B widths, vocab 32000, bf16, 2 vision + 2 text layers.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import interleaved, medium_inputs, medium_llava  # noqa: E402

import nnsight  # noqa: E402
from interventions import Group, Prune, applied  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--fraction", type=float, default=0.4)
    args = ap.parse_args()
    torch.set_num_threads(2)
    vlm = medium_llava()
    imgs, prompts = medium_inputs(vlm)
    batch = vlm.prepare(imgs, prompts)
    n = batch.n_visual
    k = round(args.fraction * n)
    members = torch.zeros(n, dtype=torch.bool)
    members[torch.randperm(n, generator=torch.Generator().manual_seed(0))[:k]] = True
    prune = Prune(Group(members, "random 40 %"))
    exp_pruned = vlm.experiment(batch, interventions=[prune])

    lm = vlm.hf.model.language_model
    lm_times = {"hf_plain": [], "hf_pruned": []}
    clock = {}

    def timed(key, fn):  # also time the language model alone (what pruning shortens; the vision tower is fixed)
        def run():
            h1 = lm.register_forward_pre_hook(lambda m, a: clock.__setitem__("t", time.perf_counter()))
            h2 = lm.register_forward_hook(lambda m, a, o: lm_times[key].append(time.perf_counter() - clock["t"]))
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
        with torch.no_grad(), applied(vlm, [prune], batch):
            out = vlm.hf(**batch.inputs)
        assert out.logits.shape[1] == batch.visual_mask.shape[1] - k

    def trace_plain():
        with torch.no_grad(), vlm.trace(**batch.inputs):
            nnsight.save(vlm.model.output.logits)

    def trace_pruned():
        with torch.no_grad(), vlm.trace(**batch.inputs):
            exp_pruned.execute(vlm.model)
            logits = nnsight.save(vlm.model.output.logits)
        assert logits.shape[1] == batch.visual_mask.shape[1] - k

    t = interleaved({"hf_plain": timed("hf_plain", hf_plain), "hf_pruned": timed("hf_pruned", hf_pruned), "trace_plain": trace_plain,
                     "trace_pruned": trace_pruned}, repeats=args.repeats, stat="min")
    seq = batch.visual_mask.shape[1]
    print(f"sequence {seq} tokens ({n} visual); pruned {k} visual ({k / n:.0%}) -> {seq - k} tokens")
    print(f"HF forward      plain {t['hf_plain']:.3f} s   pruned (applied) {t['hf_pruned']:.3f} s   "
          f"speed-up {t['hf_plain'] / t['hf_pruned']:.2f}x")
    lm_plain, lm_pruned = (min(lm_times[k][1:]) for k in ("hf_plain", "hf_pruned"))
    print(f"language model  plain {lm_plain:.3f} s   pruned {lm_pruned:.3f} s   speed-up {lm_plain / lm_pruned:.2f}x "
          f"(the LM part of the HF forward; vision tower + projector are the same in both)")
    print(f"nnsight trace   plain {t['trace_plain']:.3f} s   pruned (Experiment) {t['trace_pruned']:.3f} s   "
          f"speed-up {t['trace_plain'] / t['trace_pruned']:.2f}x")


if __name__ == "__main__":
    main()
