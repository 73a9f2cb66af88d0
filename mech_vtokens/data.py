"""Image sources for runs at scale: a folder, COCO-format instances JSON, a JSONL of VQA questions, or images in
memory. Every source is a sized iterable of :class:`Record` objects with a STABLE id (the key of the on-disk store:
a resumed run skips the ids it already has).

    from mech_vtokens.data import ImageFolder, CocoInstances, VqaJsonl, open_source
    src = CocoInstances("annotations/instances_val2017.json", "val2017/")   # labels + boxes per image
    rec = src[0]; image, note = rec.load()                                  # PIL RGB (or None) + why

Images are opened lazily (only when a batch needs them, so memory stays flat) by :func:`load_image`, which never
raises for a bad file: corrupt / truncated / missing files and absurd shapes are SKIPPED (image None, the reason in
``note``); grey, palette, 16-bit, CMYK and RGBA images, numpy arrays and tensors are CONVERTED to RGB by
:func:`to_rgb` — the ONE conversion, also used by ``vlm.prepare`` and the CLI, so an image is the same input on every
path (16-bit scaled, alpha composited on white, arrays' layout checked) — and brought into ``MIN_SIDE..MAX_SIDE`` by
:func:`fit_side`, the ONE size policy, also applied by ``vlm.prepare`` (tiny images upscaled, huge ones downscaled);
the conversion is named in ``note`` and logged by the runner.

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
MAX_SIDE = 4096  # larger sides are downscaled to this (after a full decode, as PIL.Image.open + prepare would do)
# (both on EVERY path, fit_side: prepare and the loaders; not per call, so one image is one input)
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

    def load(self):
        """(RGB PIL image or None, note or None): never raises for a bad image."""
        return load_image(self.image)

    def __repr__(self) -> str:
        src = self.image if isinstance(self.image, (str, os.PathLike)) else type(self.image).__name__
        return f"Record({self.id!r}, {src!s}, labels={len(self.labels)}, answers={len(self.answers)})"


def load_image(src):
    """Open ``src`` (path, PIL image, numpy array or torch tensor) as the model's input by :func:`model_input`
    (:func:`to_rgb`, then :func:`fit_side`), the same rule ``vlm.prepare`` applies. Returns ``(image, note)``:
    ``image`` None when skipped, ``note`` the reason (skipped) or the conversions done (None if the image was used
    as is)."""
    im, notes = _open(src)
    if im is None:
        return None, notes
    mode, alpha = im.mode, im.mode in _ALPHA_MODES or "transparency" in im.info
    try:
        rgb = to_rgb(im)
        fitted, resized = fit_side(rgb)
    except InputError as err:
        return None, f"skipped: {err}"
    if rgb is not im:
        notes.append(f"converted {mode} to RGB" + (" (alpha on white)" if alpha else ""))
    if resized:
        notes.append(resized)
    return fitted, ("; ".join(notes) or None)


def fit_side(im):
    """``(image, note)``: the RGB PIL ``im`` with its sides brought into ``MIN_SIDE..MAX_SIDE`` (bicubic,
    aspect kept: the longest side down to :data:`MAX_SIDE`, else the shortest up to :data:`MIN_SIDE`), ``note``
    what was done (None: unchanged). The ONE size policy: ``vlm.prepare`` (through :func:`image_lists`) and every
    loader (:func:`load_image`) apply it, so an image reaches the processor at one size on every path; applying it
    twice changes nothing. An aspect ratio over :data:`MAX_ASPECT` (no size satisfies both bounds; processors
    refuse it) is an InputError."""
    from PIL import Image

    w, h = im.size
    if max(w, h) / max(1, min(w, h)) > MAX_ASPECT:
        raise InputError(f"the image is {w}x{h} px, an aspect ratio over {MAX_ASPECT:.0f}:1, which processors refuse; "
                         f"crop or pad it to a ratio of at most {MAX_ASPECT:.0f}:1")
    if max(w, h) > MAX_SIDE:
        s = MAX_SIDE / max(w, h)
        out = im.resize((max(MIN_SIDE, round(w * s)), max(MIN_SIDE, round(h * s))), Image.BICUBIC)
        return out, f"downscaled {w}x{h} to {out.width}x{out.height} (data.MAX_SIDE = {MAX_SIDE})"
    if min(w, h) < MIN_SIDE:
        s = MIN_SIDE / min(w, h)
        out = im.resize((max(MIN_SIDE, round(w * s)), max(MIN_SIDE, round(h * s))), Image.BICUBIC)
        return out, f"upscaled {w}x{h} to {out.width}x{out.height} (data.MIN_SIDE = {MIN_SIDE})"
    return im, None


def model_input(image, what: str = "image"):
    """``image`` as the processor receives it on every path: :func:`to_rgb`, then :func:`fit_side` (InputError
    naming the fix for what neither can take)."""
    return fit_side(to_rgb(image, what))[0]


def _open(src):
    """(decoded PIL image, notes) or (None, why skipped)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    notes = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            if isinstance(src, Image.Image):
                im = src
            elif getattr(src, "ndim", None) is not None:  # a numpy array or torch tensor
                im = to_rgb(src, "the array")
            elif not isinstance(src, (str, os.PathLike)):
                return None, (f"skipped: a {type(src).__name__} is no image source (give a path, a PIL image, a "
                              f"numpy array or a torch tensor)")
            else:
                path = Path(src)
                if not path.is_file():
                    return None, f"skipped: file not found ({path})"
                im = Image.open(path)
            why = _bad_size(*im.size)
            if why:
                return None, why
            if getattr(im, "n_frames", 1) > 1:
                im.seek(0)
                notes.append(f"first of {im.n_frames} frames")
            im.load()
            im = ImageOps.exif_transpose(im) or im
    except InputError as err:
        return None, f"skipped: {err}"
    except Image.DecompressionBombError as err:
        return None, f"skipped: too large to decode safely ({err})"
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as err:
        return None, f"skipped: not a readable image ({type(err).__name__}: {err})"
    return im, notes


def _bad_size(w, h):
    if w < 1 or h < 1:
        return f"skipped: empty image ({w}x{h})"
    if w * h > MAX_PIXELS:
        return f"skipped: {w}x{h} = {w * h / 1e6:.0f} Mpx is over the {MAX_PIXELS / 1e6:.0f} Mpx limit"
    if max(w, h) / min(w, h) > MAX_ASPECT:
        return f"skipped: aspect ratio {max(w, h) / min(w, h):.0f}:1 over {MAX_ASPECT:.0f}:1 ({w}x{h})"
    return None


# ---- the ONE image conversion (prepare, every loader, the CLI) -------------------------------------------------

BACKGROUND = (255, 255, 255)  # transparent pixels are composited on white, on every path
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")
_ORIENTATION = 0x0112  # the EXIF orientation tag
IMAGE_RULES = ("PIL images (any mode), numpy arrays HxW (grey) or HxWxC (C = 1, 3 or 4; uint8 0..255, uint16 "
               "0..65535, float 0..1) or torch tensors CxHxW as torchvision (or HxW; same dtypes)")


def is_image(x) -> bool:
    """True for one image as :func:`to_rgb` takes it: a PIL image, or a 2-D / 3-D numpy array or torch tensor."""
    from PIL import Image

    if isinstance(x, Image.Image):
        return True
    nd = getattr(x, "ndim", None)
    return nd in (2, 3) and type(x).__module__.split(".")[0] in ("numpy", "torch")


def _iterable_of_images(x) -> bool:
    """A generator / iterator (or other non-string iterable that is no path) of images."""
    return hasattr(x, "__iter__") and not isinstance(x, (str, bytes, os.PathLike, dict)) and not is_image(x)


def image_lists(images, n_prompts: int):
    """``vlm.prepare``'s ``images`` as one list of RGB PIL images per prompt (each by :func:`model_input`: the
    conversion and the size policy every loader applies too):
    None (no images), ONE image, one image per prompt, or a list of images per prompt."""
    if images is None:
        return [[] for _ in range(n_prompts)]
    if is_image(images) or not isinstance(images, (list, tuple)) and not _iterable_of_images(images):
        images = [images]  # one image; anything else that is no image is refused by to_rgb, naming it
    rows = []
    for r, im in enumerate(images):
        if im is None:
            rows.append([])
        elif is_image(im):
            rows.append([model_input(im, f"the image of prompt {r}")])
        elif isinstance(im, (list, tuple)):
            rows.append([model_input(x, f"image {j} of prompt {r}") for j, x in enumerate(im)])
        else:
            to_rgb(im, f"the image of prompt {r}")  # raises: not an image, nor a list of them
    return rows


def to_rgb(image, what: str = "image"):
    """``image`` as an 8-bit RGB PIL image, by ONE rule used by ``vlm.prepare``, every data loader and the CLI:

    - PIL: an EXIF rotation flag applied first; RGB as is; 16-bit grey (``I;16*``, and ``I``: read as
      0..65535) scaled by 255/65535, rounded; ``F`` (float) read as 0..1 (else refused); alpha (``RGBA``, ``LA``,
      ``PA``, palette or grey/RGB with a transparent colour) composited on :data:`BACKGROUND` (white):
      ``c = round(c * a + 255 * (1 - a))``, ``a = alpha / 255``; palette, ``1``, ``L``, ``CMYK``, ``YCbCr``,
      ``LAB``, ``HSV`` by PIL's ``convert("RGB")``.
    - numpy: HxW grey or HxWxC (channels LAST, C = 1 / 3 / 4 = grey / RGB / RGBA); a 3-D array whose first axis
      is 1 / 3 / 4 and whose last is not is channels-first and refused (``a.transpose(1, 2, 0)``).
    - torch: CxHxW (channels FIRST, as torchvision) or HxW; a 3-D tensor whose last axis is 1 / 3 / 4 and whose
      first is not is channels-last and refused (``t.permute(2, 0, 1)``); batches (4-D) are refused.
    - dtypes: uint8 as is; uint16 scaled by 255/65535; other integers must lie in 0..255; bool: 0 / 255; floats
      must lie in [0, 1] (scaled by 255, rounded); NaN is refused.

    InputError (naming the rule and the fix) for anything else, before any work."""
    import numpy as np
    from PIL import Image

    if isinstance(image, Image.Image):
        return _pil_to_rgb(image, what)
    mod = type(image).__module__.split(".")[0]
    if mod == "torch" and hasattr(image, "permute"):
        return _array_to_rgb(_tensor_to_hwc(image, what), what)
    if isinstance(image, np.ndarray):
        return _array_to_rgb(_ndarray_to_hwc(image, what), what)
    raise InputError(f"{what} is a {type(image).__name__}; images must be {IMAGE_RULES}; open files with "
                     f"PIL.Image.open(path) (or mech_vtokens.data.load_image(path))")


def _tensor_to_hwc(t, what):
    if t.ndim == 2:
        return t.detach().cpu().float().numpy() if t.is_floating_point() else t.detach().cpu().numpy()
    if t.ndim != 3:
        raise InputError(f"{what} is a tensor of shape {tuple(t.shape)}; give ONE image CxHxW (or HxW)"
                         + ("; for a batch pass a list of images (list(t))" if t.ndim == 4 else ""))
    c_first, c_last = t.shape[0] in (1, 3, 4), t.shape[-1] in (1, 3, 4)
    if not c_first:
        hint = "; it looks channels-last: pass t.permute(2, 0, 1)" if c_last else ""
        raise InputError(f"{what} is a tensor of shape {tuple(t.shape)}; tensors are CxHxW as torchvision "
                         f"(C = 1, 3 or 4){hint}")
    t = t.detach().cpu().permute(1, 2, 0)
    return t.float().numpy() if t.is_floating_point() else t.numpy()


def _ndarray_to_hwc(a, what):
    if a.ndim == 2:
        return a
    if a.ndim != 3:
        raise InputError(f"{what} is an array of shape {a.shape}; give ONE image HxWxC (or HxW)"
                         + ("; for a batch pass a list of images (list(a))" if a.ndim == 4 else ""))
    if a.shape[-1] not in (1, 3, 4):
        hint = "; it looks channels-first: pass a.transpose(1, 2, 0)" if a.shape[0] in (1, 3, 4) else ""
        raise InputError(f"{what} is an array of shape {a.shape}; numpy images are HxWxC (C = 1, 3 or 4){hint}")
    return a


def _to_uint8(a, what):
    import numpy as np

    if a.dtype == np.uint8:
        return a
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * 255
    if a.dtype == np.uint16:
        return np.rint(a.astype(np.float64) * (255.0 / 65535.0)).astype(np.uint8)
    if np.issubdtype(a.dtype, np.integer):
        lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
        if lo < 0 or hi > 255:
            raise InputError(f"{what}: {a.dtype} values span {lo}..{hi}; integer images other than uint16 must lie "
                             f"in 0..255 (give uint8, uint16 for 16-bit, or floats in [0, 1])")
        return a.astype(np.uint8)
    if np.issubdtype(a.dtype, np.floating):
        if np.isnan(a).any():
            raise InputError(f"{what} holds NaN values; give finite pixel values (floats in [0, 1])")
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if lo < 0 or hi > 1:
            raise InputError(f"{what}: float values span {lo:g}..{hi:g}; float images must lie in [0, 1] (divide "
                             f"0..255 values by 255, or give uint8)")
        return np.rint(a.astype(np.float64) * 255.0).astype(np.uint8)
    raise InputError(f"{what}: dtype {a.dtype} is not an image dtype; give uint8, uint16, bool or floats in [0, 1]")


def _array_to_rgb(a, what):
    from PIL import Image

    a = _to_uint8(a, what)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if min(a.shape[:2]) < 1:
        raise InputError(f"{what} is empty (shape {a.shape}); give an image with pixels")
    mode = "L" if a.ndim == 2 else ("RGB" if a.shape[-1] == 3 else "RGBA")
    return _pil_to_rgb(Image.fromarray(a.copy(), mode), what)


def _composite(rgba):
    import numpy as np
    from PIL import Image

    a = np.asarray(rgba, dtype=np.float64)
    alpha = a[..., 3:] / 255.0
    bg = np.asarray(BACKGROUND, dtype=np.float64)
    return Image.fromarray(np.rint(a[..., :3] * alpha + bg * (1.0 - alpha)).astype(np.uint8), "RGB")


def _pil_to_rgb(im, what="image"):
    import numpy as np
    from PIL import Image

    if min(im.size) < 1:
        raise InputError(f"{what} is empty ({im.width}x{im.height} px); give an image with pixels")
    if im.getexif().get(_ORIENTATION, 1) != 1:  # a camera's rotation flag: applied on every path
        from PIL import ImageOps

        im = ImageOps.exif_transpose(im)
    if im.mode == "RGB" and "transparency" not in im.info:
        return im
    if im.mode in _SIXTEEN_BIT or im.mode == "I":
        a = np.clip(np.asarray(im, dtype=np.float64), 0, 65535)
        return Image.fromarray(np.rint(a * (255.0 / 65535.0)).astype(np.uint8), "L").convert("RGB")
    if im.mode == "F":
        return _array_to_rgb(np.asarray(im, dtype=np.float64), what)
    try:
        if im.mode in _ALPHA_MODES or "transparency" in im.info:
            return _composite(im.convert("RGBA"))
        return im.convert("RGB")
    except ValueError as err:
        raise InputError(f"{what}: PIL cannot convert mode {im.mode} ({err}); convert it to RGB or RGBA "
                         f"first") from None


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
        if not n:
            raise InputError("InMemory: no images given; pass a list of images (PIL, numpy arrays or tensors)")
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


def writable_dir(path, what: str = "out"):
    """``path`` as a directory that exists and can be written (created with its parents if missing), or an
    InputError naming the problem (a file in the way, no permission) and the fix, before any work."""
    path = Path(path)
    blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise InputError(f"{what}={str(path)!r}: {blocker} is a file, not a directory; give a directory path "
                         f"(created if missing) or move the file away")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"{what}={str(path)!r}: cannot create the directory ({err.strerror or err}); give a "
                         f"directory you can write to") from None
    probe = path / f".mech_vtokens-write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise InputError(f"{what}={str(path)!r} is not writable ({err.strerror or err}); give a directory you can "
                         f"write to (or fix its permissions)") from None
    return path


def check_labels(source, tokenizer) -> None:
    """For the ``"labels"`` probe (label matching) of a run over ``source``: InputError when no record carries a
    label this tokenizer can match (an image folder or VQA file without labels would give an empty table); a
    warning naming how many records have no usable label otherwise."""
    from mech_vtokens.probes.label_matching import label_token_ids

    usable = [any(label_token_ids(tokenizer, str(lab)) for lab in r.labels) for r in source]
    if not any(usable):
        some = any(r.labels for r in source)
        why = ("none of its labels is a token of this model's vocabulary" if some else
               f"its {type(source).__name__} records carry no labels")
        raise InputError(f"probe 'labels' (label matching) needs object labels per image, but {why}: use a COCO "
                         f"instances file (CocoInstances), InMemory(images, labels=[[...], ...]) or a JSONL with a "
                         f"'labels' field, or drop 'labels' from probes")
    missing = usable.count(False)
    if missing:
        log.warning("probe 'labels': %d of %d records have no usable label; their label-matching rows are empty",
                    missing, len(usable))
        warnings.warn(f"probe 'labels': {missing} of {len(usable)} records have no label this model's vocabulary "
                      f"holds; label matching skips them", stacklevel=3)
