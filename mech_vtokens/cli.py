"""mech-vtokens: probe the visual tokens of a multimodal LLM and write an HTML report.

  mech-vtokens demo [--out DIR]
      The full suite (EmbedLens, LogitLens, norms, sink channels, ViT sinks, label matching) on the embedded default
      model (the shipped organism; a tiny fixture if absent) and a few bundled synthetic scenes. No download.
  mech-vtokens analyze --model ID_OR_PATH --images DIR [--probes embed_lens,norms,...] [--remote] [--out DIR]
      The same on your model (hub id or local directory) and your images (a folder).
  mech-vtokens sites --model ID_OR_PATH
      List the model's sites (TransformerLens-style names) in forward order.

Every command prints where it writes; open report.html in a browser (it is self-contained and works offline).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

def _thresholds_line(out) -> None:
    """Print what the report says about the sink thresholds (the paper's, or calibrated and why)."""
    import json

    path = Path(out) / "thresholds.json"
    if path.exists():
        print(f"\n[mech-vtokens] {json.loads(path.read_text())['text']}")


def _summary(results) -> None:
    import pandas as pd

    with pd.option_context("display.width", 140, "display.max_columns", 20):
        for name in ("embed_lens", "logit_lens"):
            if name not in results:
                continue
            df = pd.concat([r.to_pandas() for r in results[name]], ignore_index=True)
            top1 = df[df["rank"] == 0]
            summary = (top1.groupby(["site", "token"]).size().rename("visual_tokens").reset_index()
                       .sort_values(["site", "visual_tokens"], ascending=[True, False]).groupby("site").head(3))
            n_tokens = sum(int((r.to_pandas()["rank"] == 0).sum()) for r in results[name]) \
                // max(1, top1.site.nunique())
            print(f"\n{name}: most frequent top-1 token per site (over {n_tokens} visual tokens)")
            print(summary.to_string(index=False))
        if "labels" in results:
            print("\nlabel matching A(l), first batch:")
            print(results["labels"][0].to_pandas().to_string(index=False))


def demo(args) -> int:
    import mech_vtokens as mv

    from .defaults import default_model, demo_inputs
    from .suite import ALL_PROBES, analyze

    path, what = (args.model, args.model) if args.model else default_model()
    print(f"[mech-vtokens] model: {what}\n[mech-vtokens] loading {path}", flush=True)
    vlm = mv.load(path)
    images, questions, objects = demo_inputs(args.images)
    prompts = [vlm.prompt(q) for q in questions]
    from mech_vtokens.probes.label_matching import label_token_ids

    # label matching needs labels that are whole tokens of this vocabulary (a tiny fixture lacks some)
    objects = [[o for o in objs if label_token_ids(vlm.tokenizer, o)] for objs in objects]
    from .defaults import demo_boxes

    boxes = [[b for b in bs if label_token_ids(vlm.tokenizer, b["label"])] for bs in demo_boxes(args.images)]
    print(f"[mech-vtokens] {len(images)} bundled scenes, probes: all, top-{args.k}, one forward per batch", flush=True)
    probes = [p for p in ALL_PROBES if p != "partition" or len(images) >= 2]  # the partition needs 2+ images
    results, report = analyze(vlm, images, prompts, probes=probes, labels=objects, k=args.k, out=args.out,
                              batch_size=args.batch_size, boxes=boxes)
    _summary(results)
    _thresholds_line(args.out)
    print(f"\n[mech-vtokens] report: {report}\n[mech-vtokens] tables: {Path(args.out)}/*.csv")
    return 0


def _load_folder(folder: Path):
    """(images, names) of the image files in ``folder`` (not recursive), read as every job reads images
    (:mod:`mech_vtokens.data`: RGB, EXIF-rotated, sizes clamped); unreadable files are skipped with a note."""
    from . import data as D

    images, names = [], []
    for r in D.ImageFolder(folder, recursive=False):  # InputError naming the fix for a missing / empty folder
        im, note = r.load()
        if im is None:
            print(f"[mech-vtokens] skipped {r.id}: {note.removeprefix('skipped: ')}", file=sys.stderr)
        else:
            images.append(im)
            names.append(r.id)
    return images, names


def analyze_cmd(args) -> int:
    import mech_vtokens as mv

    from .errors import InputError
    from .suite import ALL_PROBES, analyze

    probes = [p.strip() for p in args.probes.split(",")] if args.probes else list(ALL_PROBES)
    unknown = [p for p in probes if p not in ALL_PROBES]
    if unknown:
        raise InputError(f"--probes: unknown {unknown}; choose from {', '.join(ALL_PROBES)}")
    images, names = _load_folder(Path(args.images))
    if not images:
        from .data import IMAGE_SUFFIXES

        raise InputError(f"--images {args.images}: no readable images ({', '.join(IMAGE_SUFFIXES)})")
    print(f"[mech-vtokens] loading {args.model}", flush=True)
    vlm = mv.load(args.model, dtype=args.dtype, device_map=args.device_map)
    prompts = [vlm.prompt(args.question) for _ in images]
    remote = {"none": False, "ndif": True, "local": "local"}[args.remote]
    if "partition" in probes and len(images) < 2:
        probes.remove("partition")
    results, report = analyze(vlm, images, prompts, probes=[p for p in probes if p != "labels"], k=args.k,
                              out=args.out, batch_size=args.batch_size, remote=remote)
    _summary(results)
    _thresholds_line(args.out)
    print(f"\n[mech-vtokens] {len(images)} images ({', '.join(names[:3])}{' ...' if len(names) > 3 else ''})")
    print(f"[mech-vtokens] report: {report}\n[mech-vtokens] tables: {Path(args.out)}/*.csv")
    return 0


def sites(args) -> int:
    import mech_vtokens as mv

    vlm = mv.load(args.model)
    print("\n".join(vlm.sites))
    return 0


def main(argv=None) -> int:
    import os

    os.environ.setdefault("MPLBACKEND", "Agg")  # the CLI only writes files; a backend set by the user wins
    ap = argparse.ArgumentParser(prog="mech-vtokens", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="the full suite on the embedded default model (no download)")
    d.add_argument("--model", help="hub id or local directory instead of the embedded model")
    d.add_argument("--out", default="mech-vtokens-demo", help="output folder (default: %(default)s)")
    d.add_argument("--k", type=int, default=5, help="top-k tokens per lens (default: %(default)s)")
    d.add_argument("--images", type=int, default=8, help="how many bundled scenes (default: %(default)s)")
    d.add_argument("--batch-size", type=int, default=4, help="images per forward (default: %(default)s)")
    d.set_defaults(fn=demo)
    a = sub.add_parser("analyze", help="the full suite on your model and a folder of images")
    a.add_argument("--model", required=True, help="hub id (e.g. llava-hf/llava-1.5-7b-hf) or local directory")
    a.add_argument("--images", required=True, help="folder of images (png, jpg, ...)")
    a.add_argument("--probes", help="comma-separated subset of: embed_lens,logit_lens,norms,sinks,vit_sinks,"
                                    "partition (default: all)")
    a.add_argument("--question", default="describe the image .", help="the text after the image placeholder")
    a.add_argument("--remote", choices=["none", "ndif", "local"], default="none",
                   help="run on NDIF (ndif), simulate the remote path here (local), or not (default: %(default)s)")
    a.add_argument("--dtype", default=None, help="e.g. bfloat16 (default: the checkpoint's)")
    a.add_argument("--device-map", default=None, help='e.g. "auto" to spread over several GPUs')
    a.add_argument("--k", type=int, default=5)
    a.add_argument("--batch-size", type=int, default=4)
    a.add_argument("--out", default="mech-vtokens-report", help="output folder (default: %(default)s)")
    a.set_defaults(fn=analyze_cmd)
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
