"""Shared fixtures: tiny models of every family, built from configs, and the real-file fixtures of real checkpoints
(mech_vtokens/fixtures/real.py), saved and loaded back through ``load``. Both take a family name or a real
checkpoint id (tests/families.py)."""

import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

from mech_vtokens import testing as T  # noqa: E402
from netguard import block_network  # noqa: E402

block_network()  # the whole suite runs offline: non-loopback socket connects raise (tests/netguard.py)

FAMILIES = T.FAMILIES


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")

    def make(name: str) -> str:
        if name in T.REAL_CHECKPOINTS:
            # 3 decoder layers, as the tiny fixtures: tests name layers up to 2 (e.g. VisualEntry(2) in test_generate)
            return T.real_model(name, root / name.replace("/", "__"), layers=3)
        return T.tiny_model(name, root / name)

    return make


@pytest.fixture(scope="session")
def tiny_vlm(tiny_dir):
    import mech_vtokens as mv

    cache = {}

    def get(name: str):
        """``name``: a family, a real checkpoint id, or ``"<id>@float32"`` (that fixture loaded in fp32, for tests
        whose reference tolerances are fp32's)."""
        if name not in cache:
            base, _, dtype = name.partition("@")
            vlm = mv.load(tiny_dir(base), dtype=getattr(torch, dtype) if dtype else None)
            if base in T.REAL_CHECKPOINTS and hasattr(vlm.processor.image_processor, "max_patches"):
                from families import REAL_MAX_PATCHES

                vlm.processor.image_processor.max_patches = REAL_MAX_PATCHES  # see tests/families.py
            if base in T.REAL_CHECKPOINTS and hasattr(vlm.processor.image_processor, "max_image_size"):
                from families import REAL_TILES_PER_SIDE

                tile = vlm.processor.image_processor.max_image_size["longest_edge"]  # see tests/families.py
                vlm.processor.image_processor.size = {"longest_edge": REAL_TILES_PER_SIDE * tile}
            cache[name] = vlm
        return cache[name]

    return get


@pytest.fixture(autouse=True)
def _network_blocked():
    """Every test runs with non-loopback sockets blocked (re-applied if a test un-patched it)."""
    block_network()
    yield


@pytest.fixture()
def no_forward(tiny_vlm):
    """The tiny LLaVA; fails the test if its LM runs at all (errors must come before the forward)."""
    vlm = tiny_vlm("llava")
    calls = []
    h = vlm.hf.get_input_embeddings().register_forward_hook(lambda *a: calls.append(1))
    yield vlm
    h.remove()
    assert not calls, "the error must be raised before the forward"
