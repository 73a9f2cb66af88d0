"""mech-vtokens: probe the visual tokens of a multimodal LLM and write an HTML report.

  mech-vtokens demo [--n-images N] [--out DIR]
      The full suite (EmbedLens, LogitLens, norms, sink channels, ViT sinks, label matching) on the embedded default
      model (the shipped organism; a tiny fixture if absent) and N bundled synthetic scenes. No download.
  mech-vtokens analyze --model ID_OR_PATH --images DIR [--probes embed_lens,norms,...] [--remote] [--out DIR]
      The same on your model (hub id or local directory) and your images (a folder).
  mech-vtokens run --model ID_OR_PATH --data SOURCE [--images-dir DIR] [--probes ...] [--out DIR]
      Probe tables over a dataset (a folder, a COCO instances .json, a VQA .jsonl), resumable (run_dataset).
  mech-vtokens sites [--model ID_OR_PATH]
      List the model's sites (TransformerLens-style names) in forward order (default: the embedded model).

One option name, one meaning in every command: --images is a folder of images, --n-images a count, --images-dir the
folder holding the image files a JSON names. Every long phase shows a tqdm bar (--no-progress hides them). Every
command prints where it writes; open report.html in a browser (it is self-contained and works offline).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from .suite import ALL_PROBES


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


def _model(args):
    """(path, description) of ``--model``, or the embedded default model when it is not given."""
    from .defaults import default_model

    return (args.model, args.model) if args.model else default_model()


def _positive_int(text: str) -> int:
    """argparse type of a count (--k, --batch-size, --n-images, --limit): a positive int, refused by argparse (before
    any model loads) otherwise."""
    import argparse

    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer; give a positive count") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n} is not positive; give a count of at least 1")
    return n


def _probe_names(args, allowed, command: str, default):
    """``--probes`` split and checked against ``allowed`` before any model is loaded (InputError naming the valid
    names and, for a known name this command cannot run, the command that can)."""
    from .errors import InputError

    if args.probes is None:  # not given (an empty --probes "" is refused below, not read as "all")
        return list(default)
    names = [p.strip() for p in args.probes.split(",") if p.strip()]
    if not names:
        raise InputError(f"--probes {args.probes!r}: no probe name; choose from {', '.join(allowed)}")
    for name in names:
        if name in allowed:
            continue
        if name == "labels":
            raise InputError(f"--probes labels: label matching needs each image's object labels and {command}'s "
                             f"folder has none; run `mech-vtokens run --data instances.json --probes labels` on a "
                             f"COCO instances file (or a VQA .jsonl with labels), or drop 'labels'")
        if name in ALL_PROBES:
            raise InputError(f"--probes {name}: `mech-vtokens {command}` cannot run it (it needs a calibration "
                             f"over the whole image set); use `mech-vtokens analyze`, or choose from "
                             f"{', '.join(allowed)}")
        import difflib

        close = difflib.get_close_matches(name, allowed, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise InputError(f"--probes: unknown {[name]}{hint}; choose from {', '.join(allowed)}")
    return names


def demo(args) -> int:
    import mech_vtokens as mv

    from .defaults import demo_inputs
    from .suite import analyze

    path, what = _model(args)
    print(f"[mech-vtokens] model: {what}\n[mech-vtokens] loading {path}", flush=True)
    vlm = mv.load(path)
    images, questions, objects = demo_inputs(args.n_images)
    prompts = [vlm.prompt(q) for q in questions]
    from mech_vtokens.probes.label_matching import label_token_ids

    # label matching needs labels that are whole tokens of this vocabulary (a tiny fixture lacks some)
    objects = [[o for o in objs if label_token_ids(vlm.tokenizer, o)] for objs in objects]
    from .defaults import demo_boxes

    boxes = [[b for b in bs if label_token_ids(vlm.tokenizer, b["label"])] for bs in demo_boxes(args.n_images)]
    print(f"[mech-vtokens] {len(images)} bundled scenes, probes: all, top-{args.k}", flush=True)
    probes = [p for p in ALL_PROBES if p != "partition" or len(images) >= 2]  # the partition needs 2+ images
    if len(probes) < len(ALL_PROBES):
        print("[mech-vtokens] no partition: it needs 2+ images (--n-images 2)", flush=True)
    results, report = analyze(vlm, images, prompts, probes=probes, labels=objects, k=args.k, out=args.out,
                              batch_size=args.batch_size, boxes=boxes, progress=not args.no_progress)
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


ANALYZE_PROBES = tuple(p for p in ALL_PROBES if p != "labels")
"""What ``analyze`` runs on a folder: the suite minus label matching (a folder has no labels: ``run`` does it)."""
RUN_PROBES = tuple(p for p in ALL_PROBES if p != "partition")
"""What ``run`` (``run_dataset``) computes per record: the suite minus the partition (calibrated over a set)."""


def analyze_cmd(args) -> int:
    import mech_vtokens as mv

    from .errors import InputError
    from .suite import analyze

    probes = _probe_names(args, ANALYZE_PROBES, "analyze", ANALYZE_PROBES)
    images, names = _load_folder(Path(args.images))
    if not images:
        from .data import IMAGE_SUFFIXES

        raise InputError(f"--images {args.images}: no readable images ({', '.join(IMAGE_SUFFIXES)})")
    if not args.probes and len(images) < 2:
        probes.remove("partition")  # the default set; asked for by name, analyze refuses it with the fix
        print("[mech-vtokens] no partition: it needs 2+ images", flush=True)
    remote = {"none": False, "ndif": True, "local": "local"}[args.remote]
    print(f"[mech-vtokens] loading {args.model}", flush=True)
    vlm = mv.load(args.model, dtype=args.dtype, device_map=args.device_map)
    prompts = [vlm.prompt(args.question) for _ in images]
    results, report = analyze(vlm, images, prompts, probes=probes, k=args.k, out=args.out,
                              batch_size=args.batch_size, remote=remote, progress=not args.no_progress)
    _summary(results)
    _thresholds_line(args.out)
    print(f"\n[mech-vtokens] {len(images)} images ({', '.join(names[:3])}{' ...' if len(names) > 3 else ''})")
    print(f"[mech-vtokens] report: {report}\n[mech-vtokens] tables: {Path(args.out)}/*.csv")
    return 0


def _shard(text):
    """``--shard I/N`` -> (I, N); None when not given."""
    from .errors import InputError

    if text is None:
        return None
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise InputError(f"--shard {text!r}: write I/N, e.g. --shard 0/4 for the first of 4 processes") from None
    return i, n


def run_cmd(args) -> int:
    from .errors import InputError
    from .runner import run_dataset

    probes = _probe_names(args, RUN_PROBES, "run", ("embed_lens", "logit_lens", "norms"))
    if args.images_dir is not None and not Path(args.images_dir).is_dir():
        raise InputError(f"--images-dir {args.images_dir}: not a directory; give the folder holding the image "
                         f"files the JSON names (e.g. val2017/ beside annotations/)")
    remote = {"none": False, "ndif": True, "local": "local"}[args.remote]
    print(f"[mech-vtokens] loading {args.model}", flush=True)
    shard = _shard(args.shard)
    try:
        store = run_dataset(args.model, args.data, probes=probes, out=args.out, batch_size=args.batch_size,
                            remote=remote, progress=not args.no_progress, question=args.question, k=args.k,
                            limit=args.limit, overwrite=args.overwrite, dtype=args.dtype,
                            device_map=args.device_map, shard=shard, images_dir=args.images_dir)
    except InputError as err:  # the fix in this command's spelling (run_dataset names its Python keyword)
        raise InputError(str(err).replace("pass images_dir=", "pass --images-dir ")) from None
    print(f"\n[mech-vtokens] {len(store.records)} records done, {len(store.skipped)} skipped"
          f"{' (see the store: Store(out).skipped)' if store.skipped else ''}")
    print(f"[mech-vtokens] store: {Path(args.out)} (tables: {', '.join(store.tables)}; read with "
          f"mech_vtokens.store.Store({str(args.out)!r}).frame(name))")
    return 0


def sites(args) -> int:
    import mech_vtokens as mv

    path, what = _model(args)
    if not args.model:
        print(f"# model: {what}", file=sys.stderr)
    vlm = mv.load(path)
    print("\n".join(vlm.sites))
    return 0


class _Renamed(argparse.Action):
    """An option spelling that was renamed: refuse it, naming the new one (argparse error, exit status 2)."""

    def __init__(self, option_strings, dest, new: str = "", why: str = "", **kwargs):
        self.new, self.why = new, why
        kwargs.setdefault("help", f"renamed: use {new}")
        super().__init__(option_strings, dest, nargs="?", **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} was renamed to {self.new} ({self.why})")


def _progress_option(p) -> None:
    p.add_argument("--no-progress", action="store_true",
                   help="hide the tqdm progress bars (one per phase: calibration, passes, batches)")


def _model_options(p) -> None:
    p.add_argument("--remote", choices=["none", "ndif", "local"], default="none",
                   help="run on NDIF (ndif), simulate the remote path here (local), or not (default: %(default)s)")
    p.add_argument("--dtype", default=None, help="e.g. bfloat16 (default: the checkpoint's)")
    p.add_argument("--device-map", default=None, help='e.g. "auto" to spread over several GPUs')


def parser() -> argparse.ArgumentParser:
    """The CLI's argparse tree (every option of every subcommand has a help text: tests/test_cli.py walks it)."""
    from .loop import DEFAULT_BATCH_SIZE

    ap = argparse.ArgumentParser(prog="mech-vtokens", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="the full suite on the embedded default model (no download)")
    d.add_argument("--model", metavar="ID_OR_PATH", help="hub id or local directory instead of the embedded model")
    d.add_argument("--out", metavar="DIR", default="mech-vtokens-demo", help="output folder (default: %(default)s)")
    d.add_argument("--k", type=_positive_int, default=5, help="top-k tokens per lens (default: %(default)s)")
    d.add_argument("--n-images", metavar="N", type=_positive_int, default=8,
                   help="how many bundled scenes (default: %(default)s)")
    d.add_argument("--images", action=_Renamed, metavar="N", new="--n-images",
                   why="a count of bundled scenes; --images is a folder in `analyze`")
    d.add_argument("--batch-size", type=_positive_int, default=4, help="images per forward (default: %(default)s)")
    _progress_option(d)
    d.set_defaults(fn=demo)
    a = sub.add_parser("analyze", help="the full suite on your model and a folder of images")
    a.add_argument("--model", metavar="ID_OR_PATH", required=True,
                   help="hub id (e.g. llava-hf/llava-1.5-7b-hf) or local directory")
    a.add_argument("--images", metavar="DIR", required=True, help="folder of images (png, jpg, ...; not recursive)")
    a.add_argument("--probes", metavar="NAMES",
                   help=f"comma-separated subset of: {','.join(ANALYZE_PROBES)} (default: all; a partition "
                        f"needs 2+ images)")
    a.add_argument("--question", default="describe the image .", help="the text after the image placeholder "
                                                                       "(default: %(default)r)")
    _model_options(a)
    a.add_argument("--k", type=_positive_int, default=5, help="top-k tokens per lens (default: %(default)s)")
    a.add_argument("--batch-size", type=_positive_int, default=4, help="images per forward (default: %(default)s)")
    a.add_argument("--out", metavar="DIR", default="mech-vtokens-report", help="output folder (default: %(default)s)")
    _progress_option(a)
    a.set_defaults(fn=analyze_cmd)
    r = sub.add_parser("run", help="probe tables over a dataset, written as it goes and resumable (run_dataset)")
    r.add_argument("--model", metavar="ID_OR_PATH", required=True,
                   help="hub id (e.g. llava-hf/llava-1.5-7b-hf) or local directory")
    r.add_argument("--data", metavar="SOURCE", required=True,
                   help="a folder of images, a COCO instances .json or a VQA .jsonl")
    r.add_argument("--images-dir", metavar="DIR", default=None,
                   help="the folder holding the image files a JSON names (default: the JSON's folder, or val2017/ "
                        "beside annotations/ for annotations/instances_val2017.json)")
    r.add_argument("--probes", metavar="NAMES",
                   help=f"comma-separated subset of: {','.join(RUN_PROBES)} (default: embed_lens,logit_lens,norms; "
                        f"labels needs labelled records)")
    r.add_argument("--question", default=None,
                   help="the prompt text for records without their own question (default: the library's)")
    _model_options(r)
    r.add_argument("--k", type=_positive_int, default=5, help="top-k tokens per lens (default: %(default)s)")
    r.add_argument("--batch-size", type=_positive_int, default=DEFAULT_BATCH_SIZE,
                   help="images per forward (default: %(default)s)")
    r.add_argument("--limit", metavar="N", type=_positive_int, default=None,
                   help="only the first N records (default: all)")
    r.add_argument("--shard", metavar="I/N", default=None,
                   help="I/N: run only records I, I+N, ... (one process per GPU, same --out)")
    r.add_argument("--overwrite", action="store_true", help="discard a previous run in --out instead of resuming it")
    r.add_argument("--out", metavar="DIR", default="mech-vtokens-run", help="the store's folder (default: %(default)s)")
    _progress_option(r)
    r.set_defaults(fn=run_cmd)
    s = sub.add_parser("sites", help="list a model's sites in forward order")
    s.add_argument("--model", metavar="ID_OR_PATH", default=None,
                   help="hub id or local directory (default: the embedded model, as in `demo`)")
    s.set_defaults(fn=sites)
    return ap


@contextlib.contextmanager
def _library_bars(show: bool):
    """transformers' weight-loading bar (and huggingface_hub's download bars) follow ``--no-progress`` too; the
    previous setting comes back after the command (main() may run several times in one process)."""
    if show:
        yield
        return
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as hf_logging

    had_tf, had_hub = hf_logging.is_progress_bar_enabled(), not are_progress_bars_disabled()
    hf_logging.disable_progress_bar()
    disable_progress_bars()
    try:
        yield
    finally:
        if had_tf:
            hf_logging.enable_progress_bar()
        if had_hub:
            enable_progress_bars()


def main(argv=None) -> int:
    import os

    os.environ.setdefault("MPLBACKEND", "Agg")  # the CLI only writes files; a backend set by the user wins
    args = parser().parse_args(argv)
    from .errors import InputError

    try:
        with _library_bars(not getattr(args, "no_progress", False)):
            return args.fn(args)
    except InputError as err:
        print(f"mech-vtokens: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
