"""Seeded synthetic world for the model organism.

Images are ``IMAGE_SIZE`` x ``IMAGE_SIZE`` RGB pictures made with PIL only:

* *scene* images: 1-4 shapes (circle, square, triangle, star, cross, diamond) in 8 colours, each placed in its own
  cell of a 3x3 grid (with jitter and a random size), on a gray, white or black background;
* *text* images (``TEXT_FRACTION`` of them): one large coloured character (letter or digit) on a background.

Every image comes with a caption and a few question/answer pairs of five kinds: ``shape``, ``colour``, ``count``,
``text`` and ``position``. Everything is deterministic from the seed. ``Sample.patch_cover`` (computed on demand)
gives, for each object, the fraction of every ``PATCH`` x ``PATCH`` patch it covers; the EmbedLens evaluation uses it
to decide which visual tokens "contain" a colour or a shape.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFont

IMAGE_SIZE = 96
PATCH = 16
GRID = IMAGE_SIZE // PATCH  # 6 x 6 = 36 visual tokens
CELLS = 3  # objects live in a 3 x 3 grid of cells
CELL = IMAGE_SIZE // CELLS

SHAPES = ["circle", "square", "triangle", "star", "cross", "diamond"]
SHAPE_PLURAL = {s: s + "s" for s in SHAPES}
SHAPE_PLURAL["cross"] = "crosses"
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "orange": (245, 140, 20),
    "purple": (140, 40, 180),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}
BACKGROUNDS = {"gray": (128, 128, 128), "white": (255, 255, 255), "black": (0, 0, 0)}
CHARACTERS = list("ABCDEHKMRSX") + list("23479")
NUMBERS = ["one", "two", "three", "four"]
POSITIONS = [  # (row, col) of the 3x3 cell -> position words
    ["top left", "top", "top right"],
    ["left", "center", "right"],
    ["bottom left", "bottom", "bottom right"],
]
TEXT_FRACTION = 0.2
QUESTION_KINDS = ["shape", "colour", "count", "text", "position"]


@dataclass
class Obj:
    shape: str  # a shape name, or "text" for a character
    colour: str
    cx: float
    cy: float
    r: float  # radius (half size) in pixels
    cell: tuple[int, int] | None = None  # (row, col) for shapes
    char: str | None = None
    angle: float = 0.0

    @property
    def position(self) -> str:
        return POSITIONS[self.cell[0]][self.cell[1]] if self.cell is not None else "center"


@dataclass
class Sample:
    image: Image.Image
    background: str
    objects: list[Obj]
    caption: str
    qa: list[tuple[str, str, str]]  # (kind, question, answer)
    kind: str  # "scene" or "text"
    _cover: np.ndarray | None = field(default=None, repr=False)

    def patch_cover(self) -> np.ndarray:
        """(n_objects, GRID, GRID) fraction of each patch covered by each object (rendered alone)."""
        if self._cover is None:
            covers = []
            for o in self.objects:
                m = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
                _draw_obj(ImageDraw.Draw(m), o, 255)
                a = np.asarray(m, dtype=np.float32) / 255.0
                covers.append(a.reshape(GRID, PATCH, GRID, PATCH).mean(axis=(1, 3)))
            self._cover = np.stack(covers) if covers else np.zeros((0, GRID, GRID), np.float32)
        return self._cover


_FONT_CACHE: dict[int, ImageFont.FreeTypeFont] = {}


def _font(size: int):
    if size not in _FONT_CACHE:
        _FONT_CACHE[size] = ImageFont.load_default(size=size)
    return _FONT_CACHE[size]


def _star(cx, cy, r, angle, n=5, inner=0.45):
    pts = []
    for i in range(2 * n):
        rr = r if i % 2 == 0 else r * inner
        a = angle - math.pi / 2 + i * math.pi / n
        pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
    return pts


def _draw_obj(d: ImageDraw.ImageDraw, o: Obj, fill) -> None:
    cx, cy, r = o.cx, o.cy, o.r
    if o.shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif o.shape == "square":
        s = r * 0.88
        d.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    elif o.shape == "triangle":
        d.polygon([(cx, cy - r), (cx + r * 0.95, cy + r * 0.8), (cx - r * 0.95, cy + r * 0.8)], fill=fill)
    elif o.shape == "star":
        d.polygon(_star(cx, cy, r * 1.1, o.angle), fill=fill)
    elif o.shape == "cross":
        w = r * 0.36
        d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    elif o.shape == "diamond":
        d.polygon([(cx, cy - r * 1.1), (cx + r * 0.8, cy), (cx, cy + r * 1.1), (cx - r * 0.8, cy)], fill=fill)
    elif o.shape == "text":
        f = _font(int(r * 2))
        d.text((cx, cy), o.char, font=f, fill=fill, anchor="mm", stroke_width=max(1, int(r) // 8), stroke_fill=fill)
    else:  # pragma: no cover
        raise ValueError(o.shape)


def _count_phrase(n: int, colour: str, shape: str) -> str:
    if n == 1:
        return f"a {colour} {shape}"
    return f"{NUMBERS[n - 1]} {colour} {SHAPE_PLURAL[shape]}"


def _scene(rng: random.Random) -> Sample:
    bg = rng.choice(list(BACKGROUNDS))
    n = rng.randint(1, 4)
    cells = rng.sample([(r, c) for r in range(CELLS) for c in range(CELLS)], n)
    objs = []
    colours_ok = [c for c in COLOURS if c != bg]
    for cell in cells:
        r = rng.uniform(10.0, 15.0)
        jit = CELL / 2 - r
        cx = cell[1] * CELL + CELL / 2 + rng.uniform(-jit, jit) * 0.6
        cy = cell[0] * CELL + CELL / 2 + rng.uniform(-jit, jit) * 0.6
        objs.append(Obj(rng.choice(SHAPES), rng.choice(colours_ok), cx, cy, r, cell, angle=rng.uniform(-0.3, 0.3)))
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUNDS[bg])
    d = ImageDraw.Draw(img)
    for o in objs:
        _draw_obj(d, o, COLOURS[o.colour])

    # caption: groups of identical (colour, shape), reading order, then the positions of single objects
    groups: dict[tuple[str, str], list[Obj]] = {}
    for o in sorted(objs, key=lambda o: o.cell):
        groups.setdefault((o.colour, o.shape), []).append(o)
    parts = []
    for (col, shp), os_ in groups.items():
        p = _count_phrase(len(os_), col, shp)
        if len(os_) == 1 and rng.random() < 0.7:
            p += f" at the {os_[0].position}"
        parts.append(p)
    body = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    caption = f"{body} on a {bg} background"

    qa: list[tuple[str, str, str]] = []
    shape_counts: dict[str, int] = {}
    colour_counts: dict[str, int] = {}
    for o in objs:
        shape_counts[o.shape] = shape_counts.get(o.shape, 0) + 1
        colour_counts[o.colour] = colour_counts.get(o.colour, 0) + 1
    qa.append(("count", "how many shapes are there ?", NUMBERS[n - 1]))
    order = list(objs)
    rng.shuffle(order)
    for o in order:
        if shape_counts[o.shape] == 1:
            qa.append(("colour", f"what color is the {o.shape} ?", o.colour))
            break
    for o in order:
        if colour_counts[o.colour] == 1:
            qa.append(("shape", f"what shape is the {o.colour} object ?", o.shape))
            break
    for o in order:
        if sum(1 for p in objs if p.shape == o.shape and p.colour == o.colour) == 1:
            qa.append(("position", f"where is the {o.colour} {o.shape} ?", o.position))
            break
    if n == 1:
        o = objs[0]
        qa.append(rng.choice([("colour", "what color is the shape ?", o.colour),
                              ("shape", "what shape is it ?", o.shape)]))
    qa.append(("background", "what color is the background ?", bg))
    return Sample(img, bg, objs, caption, qa, "scene")


def _text(rng: random.Random) -> Sample:
    bg = rng.choice(list(BACKGROUNDS))
    col = rng.choice([c for c in COLOURS if c != bg])
    ch = rng.choice(CHARACTERS)
    r = rng.uniform(20.0, 30.0)
    cx = IMAGE_SIZE / 2 + rng.uniform(-10, 10)
    cy = IMAGE_SIZE / 2 + rng.uniform(-10, 10)
    o = Obj("text", col, cx, cy, r, None, char=ch)
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUNDS[bg])
    _draw_obj(ImageDraw.Draw(img), o, COLOURS[col])
    what = "letter" if ch.isalpha() else "digit"
    caption = f"the {what} {ch} written in {col} on a {bg} background"
    qa = [
        ("text", "what is written ?", ch),
        ("colour", "what color is the text ?", col),
        ("background", "what color is the background ?", bg),
    ]
    return Sample(img, bg, [o], caption, qa, "text")


def make_sample(rng: random.Random) -> Sample:
    return _text(rng) if rng.random() < TEXT_FRACTION else _scene(rng)


def make_samples(n: int, seed: int) -> list[Sample]:
    """``n`` samples, deterministic from ``seed`` (sample ``i`` depends only on ``seed`` and ``i``)."""
    return [make_sample(random.Random(f"{seed}:{i}")) for i in range(n)]


def images_to_array(samples: list[Sample]) -> np.ndarray:
    """uint8 array (n, H, W, 3)."""
    return np.stack([np.asarray(s.image, dtype=np.uint8) for s in samples])


def vocabulary() -> list[str]:
    """Every ordinary word the world can produce (captions, questions, answers, prompts), sorted."""
    words = set(SHAPES) | set(SHAPE_PLURAL.values()) | set(COLOURS) | set(BACKGROUNDS) | set(CHARACTERS)
    words |= set(NUMBERS)
    for row in POSITIONS:
        for p in row:
            words |= set(p.split())
    words |= set("a at the on and , background letter digit written in".split())
    words |= set("how many shapes are there ? what color is shape object it where".split())
    words |= set("describe image .".split())
    return sorted(words)


# words that the EmbedLens evaluation looks for
COLOUR_WORDS = list(COLOURS)
SHAPE_WORDS = list(SHAPES)
