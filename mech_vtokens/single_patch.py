"""The single-patch benchmark (paper Sec. 7.1, App. E), for any supported model.

Images whose target — a coloured shape, a character or short word on white padding, or text on a coloured
background — lies inside exactly ONE visual token's patch after the model's own resize. The patch is taken from the
adapter's geometry (``batch.tokens["box"]`` of a blank image of the same size), so LLaVA's grid, Qwen's merged
cells and InternVL's tiles are all handled by the same code; the target is drawn inside that box with a margin so
resampling cannot spill it into a neighbour.

Three kinds (as App. E): ``object`` (a shape in a colour; questions: shape, colour, count), ``ocr`` (a character or
short word on white padding; question: what is written) and ``ocr_color`` (text in one colour on a patch-sized
background of ANOTHER colour; questions: what is written, what colour is the text). The scorer reports the paper's
three insights as numbers: multi-attribute decoding from one patch (shape AND colour right on the same image),
sub-word OCR limits (accuracy on strings that are one token vs several), contextual colour bias (how often the colour
answer names the background instead of the text colour).
"""

from __future__ import annotations

import random

from PIL import Image, ImageDraw

from .defaults import MAX_NEW_TOKENS
from .errors import InputError
from .loop import DEFAULT_BATCH_SIZE, keywords
from .organism.world import CHARACTERS, COLOURS, SHAPES, Obj, _draw_obj

KINDS = ("object", "ocr", "ocr_color")
WORDS = ("cat", "sky", "red", "box", "sun", "car")  # short words for the sub-word OCR insight


class SinglePatchSample:
    """One benchmark image: ``image``, ``clean`` (the same without the target), the target's visual ``token``
    (index into the batch's visual tokens of a one-image batch), its ``box`` and the questions with answers."""

    def __init__(self, kind, image, clean, token, box, qa, truth):
        self.kind, self.image, self.clean, self.token, self.box = kind, image, clean, token, box
        self.qa = qa  # [(question kind, question, answer)]
        self.truth = truth

    def __repr__(self) -> str:
        return f"SinglePatchSample({self.kind}, token {self.token}, box {tuple(round(v) for v in self.box)})"


def _canvas_size(vlm) -> tuple[int, int]:
    """An image size the model takes without cropping: the vision config's square side (CLIP, InternVL tile), or a
    Qwen size inside the processor's pixel range."""
    native = vlm.geometry.native_size()  # the family's geometry knows one (Gemma 4: resized only off the grid)
    if native is not None:
        return native
    vc = vlm.hf.config.vision_config
    side = vc.image_size[0] if isinstance(getattr(vc, "image_size", None), (list, tuple)) else getattr(
        vc, "image_size", None)
    # a processor that resizes the longest edge to a multiple of the tile (Idefics3): that size, unresized
    if side and not vlm.adapter.geometry.variable_resolution:  # GLM-4V: image_size is its position table
        longest = dict(getattr(vlm.processor.image_processor, "size", None) or {}).get("longest_edge")
        if longest and longest % int(side) == 0:
            return int(longest), int(longest)
        return int(side), int(side)
    ip = vlm.processor.image_processor
    unit = vc.patch_size * vc.spatial_merge_size
    lo = dict(ip.size).get("shortest_edge", unit * unit * 4)
    hi = dict(ip.size).get("longest_edge", unit * unit * 64)
    n = max(2, min(16, int((hi ** 0.5) // unit)))
    while (n * unit) ** 2 < lo:
        n += 1
    return n * unit, n * unit


def make_samples(vlm, n: int = 30, seed: int = 0, kinds=KINDS, background=(128, 128, 128)):
    """``n`` samples per kind for ``vlm`` (seeded). Each target sits inside one visual token's patch."""
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise InputError(f"unknown single-patch kinds {bad}; choose from {KINDS}")
    if n < 1:
        raise InputError(f"n={n}: generate at least one sample per kind")
    w, h = _canvas_size(vlm)
    blank = Image.new("RGB", (w, h), background)
    batch = vlm.prepare([blank], [vlm.image_placeholder])
    t = batch.tokens
    first_tile = [j for j in range(len(t["image"])) if int(t["tile"][j]) in (-1, 0)]
    rows, cols = int(t["row"][first_tile].max()) + 1, int(t["col"][first_tile].max()) + 1
    inner = [j for j in first_tile if 0 < int(t["row"][j]) < rows - 1 and 0 < int(t["col"][j]) < cols - 1]
    if not inner:
        raise InputError(f"the {vlm.family} grid ({rows}x{cols}) has no interior patch for a single-patch target")
    rng = random.Random(seed)
    colours = [c for c in COLOURS if COLOURS[c] != background]
    out = []
    for kind in kinds:
        for _ in range(n):
            j = rng.choice(inner)
            x0, y0, x1, y1 = (float(v) for v in t["box"][j])
            side = min(x1 - x0, y1 - y0)
            margin = max(1.0, 0.12 * side)
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            img = blank.copy()
            d = ImageDraw.Draw(img)
            if kind == "object":
                shape, colour = rng.choice(SHAPES), rng.choice(colours)
                _draw_obj(d, Obj(shape, colour, cx, cy, side / 2 - margin, angle=0.0), COLOURS[colour])
                qa = [("shape", f"what shape is the {colour} object ?", shape),
                      ("colour", f"what color is the {shape} ?", colour),
                      ("count", "how many shapes are there ?", "one")]
                truth = {"shape": shape, "colour": colour}
            else:
                text = rng.choice(CHARACTERS) if rng.random() < 0.6 else rng.choice(WORDS)
                if kind == "ocr":
                    pad, ink, bg_name = (255, 255, 255), (0, 0, 0), "white"
                else:
                    bg_name, ink_name = rng.sample(colours, 2)
                    pad, ink = COLOURS[bg_name], COLOURS[ink_name]
                d.rectangle([x0 + margin / 2, y0 + margin / 2, x1 - margin / 2, y1 - margin / 2], fill=pad)
                r = (side / 2 - margin) / max(1, len(text) * 0.6)
                _draw_obj(d, Obj("text", "", cx, cy, r, char=text), ink)
                qa = [("text", "what is written ?", text.lower())]
                truth = {"text": text, "background": bg_name}
                if kind == "ocr_color":
                    qa.append(("colour", "what color is the text ?", ink_name))
                    truth["colour"] = ink_name
            out.append(SinglePatchSample(kind, img, blank, j, (x0, y0, x1, y1), qa, truth))
    return out


@keywords
def answer(vlm, samples, *, interventions=(), max_new_tokens: int = MAX_NEW_TOKENS,
           batch_size: int = DEFAULT_BATCH_SIZE):
    """Greedy answers to every question of ``samples``: a list of (sample index, question kind, answer, predicted)."""
    import torch

    jobs = [(i, kind, q, a) for i, s in enumerate(samples) for kind, q, a in s.qa]
    out = []
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start:start + batch_size]
        batch = vlm.prepare([samples[i].image for i, *_ in chunk], [vlm.prompt(q) for _, _, q, _ in chunk])
        ctx = None
        if interventions:
            from mech_vtokens.interventions import applied

            ctx = applied(vlm, batch, interventions=list(interventions))
            ctx.__enter__()
        try:
            with torch.no_grad():
                gen = vlm.hf.generate(**batch.inputs, max_new_tokens=max_new_tokens, do_sample=False)
        finally:
            if ctx is not None:
                ctx.__exit__(None, None, None)
        n_in = batch.visual_mask.shape[1]
        for (i, kind, _, a), g in zip(chunk, gen):
            pred = vlm.tokenizer.decode(g[n_in:], skip_special_tokens=True).strip().lower()
            out.append((i, kind, a, pred))
    return out


def score(vlm, samples, answers) -> dict:
    """The paper's three insights as numbers, plus accuracy per kind and question."""
    import pandas as pd

    df = pd.DataFrame(answers, columns=["sample", "question", "answer", "predicted"])
    df["kind"] = [samples[i].kind for i in df["sample"]]
    df["correct"] = [a.lower() in p.split() or p == a.lower() for a, p in zip(df["answer"], df["predicted"])]
    acc = df.groupby(["kind", "question"])["correct"].mean().rename("accuracy").reset_index()
    obj = df[df.kind == "object"].pivot_table(index="sample", columns="question", values="correct", aggfunc="first")
    both = float((obj.get("shape", False) & obj.get("colour", False)).mean()) if len(obj) else float("nan")
    ocr = df[(df.question == "text")].copy()
    ocr["pieces"] = [len(vlm.tokenizer.encode(samples[i].truth["text"].lower(), add_special_tokens=False))
                     for i in ocr["sample"]]
    single = float(ocr[ocr.pieces == 1]["correct"].mean()) if (ocr.pieces == 1).any() else float("nan")
    multi = float(ocr[ocr.pieces > 1]["correct"].mean()) if (ocr.pieces > 1).any() else float("nan")
    col = df[(df.kind == "ocr_color") & (df.question == "colour")]
    bg = [samples[i].truth["background"] in p.split() for i, p in zip(col["sample"], col["predicted"])]
    return {
        "accuracy": acc,
        "multi_attribute_both_right": both,
        "ocr_single_token_accuracy": single,
        "ocr_multi_token_accuracy": multi,
        "colour_answer_is_background": float(sum(bg) / len(bg)) if bg else float("nan"),
        "colour_answer_is_text_colour": float(col["correct"].mean()) if len(col) else float("nan"),
    }


def main(argv=None) -> int:
    """``python -m mech_vtokens.single_patch [--model ID_OR_PATH] [--n 40] [--seed 0]``: run and print the insights."""
    import argparse
    import json

    import mech_vtokens as mv

    from .defaults import default_model

    ap = argparse.ArgumentParser(prog="python -m mech_vtokens.single_patch", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="hub id or local directory (default: the embedded model)")
    ap.add_argument("--n", type=int, default=40, help="samples per kind (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    vlm = mv.load(args.model or default_model()[0])
    samples = make_samples(vlm, n=args.n, seed=args.seed)
    # one-word answers: 3 new tokens (a longer continuation lets score()'s `answer in predicted.split()` match a word
    # said after the answer)
    res = score(vlm, samples, answer(vlm, samples, max_new_tokens=3))
    print(res.pop("accuracy").to_string(index=False))
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
