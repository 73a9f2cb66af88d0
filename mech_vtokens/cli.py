"""``mech-vtokens`` command line.

    mech-vtokens demo [--model ID_OR_PATH] [--out DIR] [--k 5]
        Runs EmbedLens and LogitLens on the embedded default model (the shipped organism when present, else a tiny
        seeded LLaVA built offline) and a few bundled images, prints a table per lens and writes CSVs to --out.
    mech-vtokens sites --model ID_OR_PATH
        Lists the model's sites in forward order.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def default_model() -> tuple[str, str]:
    """(path, description) of the embedded default model: the organism checkpoint if shipped, else a tiny LLaVA."""
    try:
        from .organism import CHECKPOINT_DIR

        if (Path(CHECKPOINT_DIR) / "config.json").exists():
            return str(CHECKPOINT_DIR), "the shipped model organism (tiny LLaVA trained on synthetic scenes)"
    except ImportError:
        pass
    from . import testing as T

    cache = Path.home() / ".cache" / "mech-vtokens" / "tiny-llava"
    return T.tiny_model("llava", cache), "a tiny random LLaVA fixture (no semantics: random weights)"


def _demo_images(vlm, n: int):
    try:
        from .organism.world import demo_scenes

        return demo_scenes(n)
    except (ImportError, AttributeError):
        from . import testing as T

        return [T.image(224, seed=i) for i in range(n)], ["what color is the object ?"] * n


def demo(args) -> int:
    import pandas as pd

    import mech_vtokens as mv
    from probes import EmbedLens, LogitLens

    path, what = (args.model, args.model) if args.model else default_model()
    print(f"[mech-vtokens] model: {what}\n[mech-vtokens] loading {path}", flush=True)
    vlm = mv.load(path)
    images, questions = _demo_images(vlm, args.images)
    prompts = [f"USER : {vlm.image_placeholder} {q} ASSISTANT :" for q in questions]
    sites = ["hook_embed", f"blocks.{vlm.n_layers // 2}.hook_resid_post", f"blocks.{vlm.n_layers - 1}.hook_resid_post"]
    print(f"[mech-vtokens] one forward over {len(images)} images: EmbedLens + LogitLens (top-{args.k}) at "
          f"{', '.join(sites)}", flush=True)
    embed, logit = mv.run(vlm, images, prompts, probes=[EmbedLens(k=args.k, sites=sites),
                                                        LogitLens(k=args.k, sites=sites)])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with pd.option_context("display.width", 140, "display.max_columns", 20):
        for name, res in (("embed_lens", embed), ("logit_lens", logit)):
            df = res.to_pandas()
            df.to_csv(out / f"{name}.csv", index=False)
            top1 = df[df["rank"] == 0]
            summary = (top1.groupby(["site", "token"]).size().rename("visual_tokens").reset_index()
                       .sort_values(["site", "visual_tokens"], ascending=[True, False]).groupby("site").head(3))
            print(f"\n{name}: most frequent top-1 token per site (over {top1['visual_index'].nunique()} visual "
                  f"tokens in {len(images)} images)")
            print(summary.to_string(index=False))
    print(f"\n[mech-vtokens] full tables: {out / 'embed_lens.csv'}, {out / 'logit_lens.csv'}")
    return 0


def sites(args) -> int:
    import mech_vtokens as mv

    vlm = mv.load(args.model)
    print("\n".join(vlm.sites))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="mech-vtokens", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="EmbedLens vs LogitLens on the embedded default model (no download)")
    d.add_argument("--model", help="hub id or local directory (default: the embedded model)")
    d.add_argument("--out", default="mech-vtokens-demo", help="where to write the tables (default: %(default)s)")
    d.add_argument("--k", type=int, default=5, help="top-k tokens per lens (default: %(default)s)")
    d.add_argument("--images", type=int, default=3, help="how many bundled images (default: %(default)s)")
    d.set_defaults(fn=demo)
    s = sub.add_parser("sites", help="list a model's sites in forward order")
    s.add_argument("--model", required=True)
    s.set_defaults(fn=sites)
    args = ap.parse_args(argv)
    from .errors import InputError

    try:
        return args.fn(args)
    except InputError as err:
        print(f"mech-vtokens: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
