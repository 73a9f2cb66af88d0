"""Shared fixtures: tiny models of every family, built from configs, saved, and loaded back through ``load``."""

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

    def make(family: str) -> str:
        return T.tiny_model(family, root / family)

    return make


@pytest.fixture(scope="session")
def tiny_vlm(tiny_dir):
    import mech_vtokens as mv

    cache = {}

    def get(family: str):
        if family not in cache:
            cache[family] = mv.load(tiny_dir(family))
        return cache[family]

    return get


@pytest.fixture(autouse=True)
def _network_blocked():
    """Every test runs with non-loopback sockets blocked (re-applied if a test un-patched it)."""
    block_network()
    yield
