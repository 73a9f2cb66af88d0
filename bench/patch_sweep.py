"""Activation patching on the shipped organism (issue 17's Must show), in one run:

    PYTHONPATH=. python bench/patch_sweep.py [--pairs 60] [--ratio-pairs 4] [--batch 96] [--json out.json]

1. RED -> BLUE: ``--pairs`` seeded pairs (``patching.organism_colour_pairs``: the same scene, the questioned object
   red in the source and blue in the target); the object's tokens and a background box of the same size
   (``Region``) patched at ``hook_embed`` and after every decoder layer. Per site x region: the fraction of pairs whose
   greedy answer flips to "red" and the mean normalised logit difference recovered, over all pairs and over the
   pairs whose two clean answers are right.
2. Attribution patching (one forward + one backward per batch of pairs) vs the real sweep: Spearman rank correlation
   of the estimated and real ``LD_patched - LD_target`` over every (pair, site, region), and over the object
   region alone (where the effect is large); forwards and seconds of each.
3. Batched (every variant of a pair in one forward) vs one forward per variant, on ``--ratio-pairs`` pairs, timed
   interleaved: the ratio, and the largest difference between their numbers.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import interleaved  # noqa: E402

import mech_vtokens as mv  # noqa: E402
from mech_vtokens.attribution import attribution_patching  # noqa: E402
from mech_vtokens.interventions import Region  # noqa: E402
from mech_vtokens.loop import counting  # noqa: E402
from mech_vtokens.organism import checkpoint_path  # noqa: E402
from mech_vtokens.patching import Variant, organism_colour_pairs, patch_sweep  # noqa: E402


def spearman(x, y) -> float:
    """Spearman's rho = Pearson's r of the ranks (average ranks for ties), as scipy.stats.spearmanr."""
    return float(x.rank().corr(y.rank()))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=60)
    ap.add_argument("--ratio-pairs", type=int, default=4)
    ap.add_argument("--batch", type=int, default=96)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    vlm = mv.load(str(checkpoint_path()))
    pairs = organism_colour_pairs(args.pairs, seed=args.seed)
    sites = ["hook_embed"] + [f"blocks.{i}.hook_resid_post" for i in range(vlm.n_layers)]

    def variants(p):
        return [Variant(s, Region(p.regions[r]), r) for s in sites for r in ("object", "background")]

    with counting() as c_real:
        t = time.perf_counter()
        real = patch_sweep(vlm, pairs, variants, batch_size=args.batch)
        t_real = time.perf_counter() - t
    df = real.to_pandas()
    per_pair = df.groupby("pair")[["source_right", "target_right"]].first()
    both = per_pair["source_right"] & per_pair["target_right"]
    summary = real.summary()
    print(f"{args.pairs} pairs: source answer right {per_pair['source_right'].mean():.3f}, target right "
          f"{per_pair['target_right'].mean():.3f}, both right {int(both.sum())}")
    print(summary.round(4).to_string(index=False))

    with counting() as c_attr:
        t = time.perf_counter()
        est = attribution_patching(vlm, pairs, variants, batch_size=args.batch)
        t_attr = time.perf_counter() - t
    m = df.merge(est[["pair", "site", "region", "estimate"]], on=["pair", "site", "region"])
    m["effect"] = m["ld_patched"] - m["ld_target"]
    obj = m[m["region"] == "object"]
    rho_all, rho_obj = spearman(m["effect"], m["estimate"]), spearman(obj["effect"], obj["estimate"])
    by_site = m.groupby(["site", "region"], observed=True).agg(real=("effect", "mean"), est=("estimate", "mean"))
    rho_sites = spearman(by_site["real"], by_site["est"])
    print(f"attribution vs real: spearman all {rho_all:.3f}, object region {rho_obj:.3f}, site x region means "
          f"{rho_sites:.3f}; real {c_real.n} forwards {t_real:.2f} s, attribution {c_attr.n} forwards (+ backward) "
          f"{t_attr:.2f} s")

    few = pairs[:args.ratio_pairs]
    n_var = len(variants(few[0]))

    def batched():
        return patch_sweep(vlm, few, variants, batch_size=args.batch).to_pandas()

    def one_by_one():
        out = [patch_sweep(vlm, few, lambda p, v=v: [variants(p)[v]], batch_size=3).to_pandas()
               for v in range(n_var)]
        return out

    times = interleaved({"batched": batched, "per_variant": one_by_one}, repeats=3, warmup=1)
    import pandas as pd

    def ordered(df):  # site as text: the per-variant frames' site categories differ, concat would re-sort them
        return df.assign(site=df["site"].astype(str)).sort_values(["pair", "site", "region"]).reset_index(drop=True)

    a, b = ordered(batched()), ordered(pd.concat(one_by_one()))
    assert (a[["pair", "site", "region"]] == b[["pair", "site", "region"]]).all().all()
    diff = float((a["ld_patched"] - b["ld_patched"]).abs().max())
    with counting() as c_b:
        batched()
    with counting() as c_1:
        one_by_one()
    ratio = times["per_variant"] / times["batched"]
    print(f"batched vs one forward per variant ({len(few)} pairs x {n_var} variants): {c_b.n} vs {c_1.n} forwards, "
          f"{times['batched']:.3f} s vs {times['per_variant']:.3f} s, ratio {ratio:.2f}x; "
          f"max |d LD_patched| {diff:.2e}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "pairs": args.pairs, "both_right": int(both.sum()), "summary": summary.to_dict("records"),
            "spearman": {"all": rho_all, "object": rho_obj, "site_means": rho_sites},
            "cost": {"real": [c_real.n, t_real], "attribution": [c_attr.n, t_attr]},
            "ratio": {"batched_s": times["batched"], "per_variant_s": times["per_variant"], "ratio": ratio,
                      "forwards": [c_b.n, c_1.n], "max_diff": diff}}, indent=1, default=str))


if __name__ == "__main__":
    main()
