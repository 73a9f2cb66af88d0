"""The embedded default model, demo inputs and prompts — what the demo, notebooks and README examples use offline."""

from __future__ import annotations

from pathlib import Path

MAX_NEW_TOKENS = 20
"""The ONE default answer length (new tokens) of every generating function: ``mech_vtokens.generate``,
``evaluate.evaluate`` / ``answer_batch`` / ``HarnessModel`` and ``single_patch.answer``. Pass ``max_new_tokens=``
to change it per call; a job whose answers are one word passes its own (``single_patch``'s CLI: 3)."""


def default_model() -> tuple[str, str]:
    """(path, description) of the embedded default: the shipped organism if present, else a tiny seeded LLaVA
    (built offline into ~/.cache/mech-vtokens on first use)."""
    from .organism import CHECKPOINT_DIR

    if (Path(CHECKPOINT_DIR) / "config.json").exists():
        return str(CHECKPOINT_DIR), "the shipped model organism (tiny LLaVA trained on synthetic scenes)"
    from . import testing as T

    cache = Path.home() / ".cache" / "mech-vtokens" / "tiny-llava"
    return T.tiny_model("llava", cache), "a tiny random LLaVA fixture (random weights: no semantics)"


def prompt(vlm, question: str, n_images: int = 1) -> str:
    """``vlm.prompt(question, n_images)``: the processor's chat template when the checkpoint has one, else the plain
    ``"<image span> question"`` (what the shipped organism was trained on)."""
    return vlm.prompt(question, n_images)


def demo_inputs(n: int = 3, seed: int = 1234):
    """(images, questions, objects): ``n`` synthetic scenes from the organism's world with a question each and the
    objects drawn (labels for label matching)."""
    from .organism.world import make_samples

    samples = make_samples(n, seed)
    images = [s.image for s in samples]
    questions = [s.qa[0][1] for s in samples]
    objects = [[o.colour if o.shape == "text" else o.shape for o in s.objects] for s in samples]
    return images, questions, objects


def demo_boxes(n: int = 3, seed: int = 1234):
    """COCO-style boxes of the objects in :func:`demo_inputs`' scenes: per image ``[{"bbox": [x, y, w, h],
    "label": ...}]`` (shape name, or the character for text)."""
    from .organism.world import make_samples

    out = []
    for s in make_samples(n, seed):
        out.append([{"bbox": [o.cx - o.r, o.cy - o.r, 2 * o.r, 2 * o.r],
                     "label": o.char if o.shape == "text" and o.char else o.shape} for o in s.objects])
    return out


def demo_qa(n: int = 3, seed: int = 1234, kinds=("count", "colour", "shape", "background")):
    """(images, questions, answers): :func:`demo_inputs`' scenes (same ``n`` / ``seed``: the same images), image i
    asked its question of kind ``kinds[i % len(kinds)]`` ("count", "colour", "shape", "position", "background"; the
    count question where the scene has none of that kind), with the ground-truth answer."""
    from .organism.world import make_samples

    images, questions, answers = [], [], []
    for i, s in enumerate(make_samples(n, seed)):
        want = kinds[i % len(kinds)]
        _, q, a = next((qa for qa in s.qa if qa[0] == want), s.qa[0])
        images.append(s.image)
        questions.append(q)
        answers.append(a)
    return images, questions, answers
