"""What the family-parametrised tests run on: the tiny fixture of each family (``mech_vtokens.testing``) and the
real-file fixtures (``mech_vtokens.fixtures.real``: the hub's config / processor / tokenizer settings and chat
template of real checkpoints, shrunk layers). ``tiny_vlm(name)`` / ``tiny_dir(name)`` (tests/conftest.py) take
either a family name or a real checkpoint id."""

from mech_vtokens import testing as T
from mech_vtokens.fixtures.real import hub_file

FAMILIES = T.FAMILIES
REAL = T.REAL_CHECKPOINTS
# one real checkpoint per model type (the first listed), for the heavier tests
ONE_REAL = tuple({hub_file(ck, "config.json")["model_type"]: ck for ck in reversed(REAL)}.values())[::-1]
ALL = FAMILIES + REAL
FAMILIES_AND_ONE_REAL = FAMILIES + ONE_REAL

# InternVL tiles at 448 px (up to max_patches + a thumbnail): real fixtures cap it at 2 tiles so a non-square test
# image stays a few hundred visual tokens (vlm.adapter.image_size_knob names the setting).
REAL_MAX_PATCHES = 2
# Idefics3 / SmolVLM resize the longest edge to 2048 px = 4 tiles of 512 (17 frames of 64 tokens for a square image):
# real fixtures resize to 2 tiles per side (5 frames, 320 tokens).
REAL_TILES_PER_SIDE = 2


def is_real(name: str) -> bool:
    return name.partition("@")[0] in REAL  # "<id>@float32": the real fixture loaded in fp32 (tests/conftest.py)


def prompt(vlm, name: str, question: str = "what color is the object ?") -> str:
    """The project's prompt builder (the chat template) for a real fixture; the tiny fixtures keep their plain
    prompts (they have no chat template)."""
    return vlm.prompt(question) if is_real(name) else T.prompt(name, question)
