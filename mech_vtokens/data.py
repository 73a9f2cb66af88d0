"""Image sources for runs at scale: a folder, COCO-format instances JSON, a JSONL of VQA questions, or images in
memory. Every source is a sized iterable of :class:`Record` objects with a STABLE id (the key of the on-disk store:
a resumed run skips the ids it already has).

    from mech_vtokens.data import ImageFolder, CocoInstances, VqaJsonl, open_source
    src = CocoInstances("annotations/instances_val2017.json", "val2017/")   # labels + boxes per image
    rec = src[0]; image, note = rec.load()                                  # PIL RGB (or None) + why

Images are opened lazily (only when a batch needs them, so memory stays flat) by :func:`load_image`, which never
raises for a bad file: corrupt / truncated / missing files and absurd shapes are SKIPPED (image None, the reason in
``note``); grey, palette, 16-bit, CMYK and RGBA images are CONVERTED to RGB (alpha composited on white), tiny images
upscaled, huge ones downscaled — the conversion is named in ``note`` and logged by the runner.

Ids: folder — the file's path relative to the folder (posix); COCO — the image id; JSONL — the line's ``id`` /
``question_id`` field, else ``"line<n>"`` (1-based line number); in memory — the index or the ids you pass.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path

from .errors import InputError

log = logging.getLogger("mech_vtokens.data")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
MIN_SIDE = 28  # smaller sides are upscaled to this (Qwen's processor refuses sides below its 28-px merge factor)
MAX_SIDE = 4096  # larger sides are downscaled to this (decoding at reduced size when the format allows)
MAX_PIXELS = 180_000_000  # larger images are skipped: decoding them could exhaust memory (PIL's bomb limit is 179M)
MAX_ASPECT = 100.0  # wider/taller than this is skipped (processors refuse extreme aspect ratios)


class Record:
    """One item of a source: ``id`` (stable str), ``image`` (a path or a PIL image), ``question`` (or None: the
    runner's default), ``answers`` (list of str, for VQA), ``choices`` (list of str or None), ``labels`` (object
    names, for label matching), ``boxes`` (list of (label, x, y, w, h) in pixels), ``meta`` (dict)."""

    __slots__ = ("id", "image", "question", "answers", "choices", "labels", "boxes", "meta")

    def __init__(self, id, image, question=None, answers=(), choices=None, labels=(), boxes=(), meta=None):
        self.id = str(id)
        self.image = image
        self.question = question
        self.answers = [str(a) for a in answers]
        self.choices = None if choices is None else [str(c) for c in choices]
        self.labels = list(labels)
        self.boxes = list(boxes)
        self.meta = dict(meta or {})

    def load(self, min_side: int = MIN_SIDE, max_side: int = MAX_SIDE):
        """(RGB PIL image or None, note or None): never raises for a bad image."""
        return load_image(self.image, min_side=min_side, max_side=max_side)

    def __repr__(self) -> str:
        src = self.image if isinstance(self.image, (str, os.PathLike)) else type(self.image).__name__
        return f"Record({self.id!r}, {src!s}, labels={len(self.labels)}, answers={len(self.answers)})"


def load_image(src, min_side: int = MIN_SIDE, max_side: int = MAX_SIDE):
    """Open ``src`` (path or PIL image) as RGB. Returns ``(image, note)``: ``image`` None when skipped, ``note`` the
    reason (skipped) or the conversions done (None if the image was used as is)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    notes = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            if isinstance(src, Image.Image):
                im = src
            else:
                path = Path(src)
                if not path.is_file():
                    return None, f"skipped: file not found ({path})"
                im = Image.open(path)
            w, h = im.size
            if w < 1 or h < 1:
                return None, f"skipped: empty image ({w}x{h})"
            if w * h > MAX_PIXELS:
                return None, f"skipped: {w}x{h} = {w * h / 1e6:.0f} Mpx is over the {MAX_PIXELS / 1e6:.0f} Mpx limit"
            if max(w, h) / min(w, h) > MAX_ASPECT:
                return None, f"skipped: aspect ratio {max(w, h) / min(w, h):.0f}:1 over {MAX_ASPECT:.0f}:1 ({w}x{h})"
            if getattr(im, "n_frames", 1) > 1:
                im.seek(0)
                notes.append(f"first of {im.n_frames} frames")
            if max(w, h) > max_side and hasattr(im, "draft") and im.format == "JPEG":
                im.draft("RGB", (max_side, max_side))  # decode at reduced size: memory stays flat
            im.load()
            im = ImageOps.exif_transpose(im) or im
    except Image.DecompressionBombError as err:
        return None, f"skipped: too large to decode safely ({err})"
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as err:
        return None, f"skipped: not a readable image ({type(err).__name__}: {err})"
    mode = im.mode
    if mode != "RGB":
        im = _to_rgb(im)
        notes.append(f"converted {mode} to RGB" + (" (alpha on white)" if "A" in mode or "transparency" in im.info
                                                    else ""))
    w, h = im.size
    if max(w, h) > max_side:
        s = max_side / max(w, h)
        im = im.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BICUBIC)
        notes.append(f"downscaled {w}x{h} to {im.width}x{im.height}")
    w, h = im.size
    if min(w, h) < min_side:
        s = min_side / min(w, h)
        im = im.resize((max(min_side, round(w * s)), max(min_side, round(h * s))), Image.BICUBIC)
        notes.append(f"upscaled {w}x{h} to {im.width}x{im.height}")
    return im, ("; ".join(notes) or None)


def _to_rgb(im):
    import numpy as np
    from PIL import Image

    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16-bit / int / float grey: stretch to 0..255
        a = np.asarray(im, dtype=np.float64)
        lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
        a = np.zeros_like(a) if hi <= lo else (a - lo) / (hi - lo) * 255.0
        return Image.fromarray(np.nan_to_num(a).astype(np.uint8), "L").convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return im.convert("RGB")


class Source:
    """A sized, indexable sequence of :class:`Record` with unique ids."""

    def __init__(self, records):
        self.records = list(records)
        seen, dup = set(), []
        for r in self.records:
            (dup.append(r.id) if r.id in seen else seen.add(r.id))
        if dup:
            raise InputError(f"{type(self).__name__}: record ids must be unique (they key the results on disk), but "
                             f"{dup[:3]} repeat; give each item its own id")

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self):
        return iter(self.records)

    def __getitem__(self, i):
        return self.records[i]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} records)"


class ImageFolder(Source):
    """Every image file under ``folder`` (``recursive``), sorted by relative path; id = that path."""

    def __init__(self, folder, question: str | None = None, recursive: bool = True):
        folder = Path(folder)
        if not folder.is_dir():
            raise InputError(f"ImageFolder: {folder} is not a directory; give a folder of image files "
                             f"({', '.join(IMAGE_SUFFIXES)})")
        files = folder.rglob("*") if recursive else folder.iterdir()
        paths = sorted(p for p in files if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not paths:
            raise InputError(f"ImageFolder: no image files in {folder} (looked for {', '.join(IMAGE_SUFFIXES)})")
        self.folder = folder
        super().__init__(Record(p.relative_to(folder).as_posix(), p, question) for p in paths)


class CocoInstances(Source):
    """COCO-format instances annotations: one record per image with its object labels (category names, unique, in
    first-seen order) and boxes ``(label, x, y, w, h)``. ``only_annotated``: drop images without annotations."""

    def __init__(self, annotations, images_dir=None, question: str | None = None, only_annotated: bool = False):
        path = Path(annotations)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise InputError(f"CocoInstances: {path} does not exist; pass the instances_*.json file") from None
        except json.JSONDecodeError as err:
            raise InputError(f"CocoInstances: {path} is not valid JSON ({err}); pass a COCO instances file") from None
        if not isinstance(data, dict) or not isinstance(data.get("images"), list):
            raise InputError(f"CocoInstances: {path} has no 'images' list; a COCO instances file has 'images', "
                             f"'annotations' and 'categories'")
        root = Path(images_dir) if images_dir is not None else path.parent
        split = path.parent.parent / path.stem.removeprefix("instances_")  # the standard annotations/ + val2017/
        if images_dir is None and path.parent.name == "annotations" and split.is_dir():
            root = split
        cats = {c["id"]: c["name"] for c in data.get("categories", [])}
        per_image: dict = {}
        for a in data.get("annotations", []):
            name = cats.get(a.get("category_id"))
            if name is None or "bbox" not in a:
                continue
            per_image.setdefault(a["image_id"], []).append((name, *[float(v) for v in a["bbox"]]))
        recs = []
        for im in data["images"]:
            boxes = per_image.get(im["id"], [])
            if only_annotated and not boxes:
                continue
            labels = list(dict.fromkeys(b[0] for b in boxes))
            meta = {k: im[k] for k in ("width", "height") if k in im}
            recs.append(Record(im["id"], root / im["file_name"], question, labels=labels, boxes=boxes,
                               meta=dict(meta, file_name=im["file_name"])))
        super().__init__(recs)


class VqaJsonl(Source):
    """A JSONL file, one question per line: ``{"image": path, "question": str, "answer": str | "answers": [str],
    "choices": [str] (optional), "id" | "question_id": optional}``; image paths relative to ``images_dir``
    (default: the file's folder). Lines that are not valid JSON or lack image/question are skipped with a logged
    reason (``self.bad_lines``)."""

    def __init__(self, path, images_dir=None):
        path = Path(path)
        if not path.is_file():
            raise InputError(f"VqaJsonl: {path} does not exist; pass a .jsonl file with one JSON object per line")
        root = Path(images_dir) if images_dir is not None else path.parent
        recs, self.bad_lines = [], {}
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    d = json.loads(line)
                    if not isinstance(d, dict) or "image" not in d or "question" not in d:
                        raise ValueError("needs 'image' and 'question'")
                except ValueError as err:
                    self.bad_lines[n] = str(err)
                    log.warning("VqaJsonl %s line %d skipped: %s", path.name, n, err)
                    continue
                answers = d.get("answers", d.get("answer", []))
                answers = [answers] if isinstance(answers, (str, int, float)) else list(answers)
                rid = d.get("id", d.get("question_id", f"line{n}"))
                recs.append(Record(rid, root / d["image"], d["question"], answers=answers, choices=d.get("choices"),
                                   labels=d.get("labels", ()), meta={"line": n}))
        if not recs:
            raise InputError(f"VqaJsonl: {path} holds no usable line (each needs 'image' and 'question')")
        super().__init__(recs)


class InMemory(Source):
    """PIL images (and optional per-image questions / labels / answers / ids) already in memory."""

    def __init__(self, images, questions=None, labels=None, answers=None, ids=None):
        images = list(images)
        n = len(images)
        for name, xs in (("questions", questions), ("labels", labels), ("answers", answers), ("ids", ids)):
            if xs is not None and len(xs) != n:
                raise InputError(f"InMemory: {len(xs)} {name} for {n} images; pass one per image")
        super().__init__(
            Record(ids[i] if ids is not None else i, im, questions[i] if questions is not None else None,
                   answers=(answers[i] if answers is not None else ()),
                   labels=(labels[i] if labels is not None else ()))
            for i, im in enumerate(images))


def open_source(spec, images_dir=None, question: str | None = None) -> Source:
    """A source from a path: a folder -> ImageFolder; ``*.json`` -> CocoInstances; ``*.jsonl`` -> VqaJsonl;
    a Source is returned as is."""
    if isinstance(spec, Source):
        return spec
    if not isinstance(spec, (str, os.PathLike)):
        raise InputError(f"cannot use {type(spec).__name__} as an image source: pass a folder, a COCO instances "
                         f".json, a VQA .jsonl, or a mech_vtokens.data Source (e.g. InMemory(images))")
    p = Path(spec)
    if p.is_dir():
        return ImageFolder(p, question)
    if p.suffix == ".json":
        return CocoInstances(p, images_dir, question)
    if p.suffix == ".jsonl":
        return VqaJsonl(p, images_dir)
    raise InputError(f"cannot tell what {p} is: pass a folder of images, a COCO instances .json or a VQA .jsonl "
                     f"(or build a mech_vtokens.data Source)")
