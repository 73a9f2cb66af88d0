"""Trace overhead: plain HF forward vs one nnsight trace (via mech_vtokens.run) saving EVERY site.

    python bench/trace_overhead.py [--repeats 5]

Medium LLaVA: CLIP-L/14-336 (576 patches), LLaMA-7B widths, vocab 32000, bf16, 2 vision + 2 text layers.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import interleaved, medium_inputs, medium_llava  # noqa: E402

import nnsight  # noqa: E402
from mech_vtokens.probes.activations import Activations  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(2)
    vlm = medium_llava()
    imgs, prompts = medium_inputs(vlm)
    batch = vlm.prepare(imgs, prompts)
    tensor_sites = [s for s in vlm.sites if s != "lm.hook_inputs"]  # every site holding a tensor
    every = Activations(tensor_sites)

    def plain():
        with torch.no_grad():
            vlm.hf(**batch.inputs)

    exp = vlm.experiment(batch, probes=[every])  # planned once, like the inputs of the plain forward

    def traced():
        with torch.no_grad(), vlm.trace(**batch.inputs):
            raw = nnsight.save(exp.execute(vlm.model))
        assert len(raw[0]) == len(tensor_sites)

    t = interleaved({"plain": plain, "traced_all_sites": traced}, repeats=args.repeats)
    print(f"sites saved: {len(tensor_sites)}; sequence {batch.visual_mask.shape[1]} tokens "
          f"({batch.n_visual} visual)")
    print(f"plain forward      {t['plain']:.3f} s")
    print(f"trace, every site  {t['traced_all_sites']:.3f} s")
    print(f"ratio              {t['traced_all_sites'] / t['plain']:.3f}")


if __name__ == "__main__":
    main()
