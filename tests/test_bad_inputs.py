"""Issue 15: no silent wrong results. Each class of bad or unusual input (2: one image, two inputs; 3: arguments
validated at the API boundary; 6: thresholds a model can never reach; 7: bugs) is fed SEVERAL inputs and must give
the right result exactly, or an InputError raised before any forward whose message names the fix."""

import re

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import mech_vtokens as mv
from mech_vtokens import data as D
from mech_vtokens import testing as T
from mech_vtokens.errors import InputError
from mech_vtokens.ops import topk_rerank
from mech_vtokens.probes import NormTracker

P = T.prompt("llava")


@pytest.fixture()
def no_forward(tiny_vlm):
    """The tiny LLaVA; fails the test if its LM runs at all (errors must come before the forward)."""
    vlm = tiny_vlm("llava")
    calls = []
    h = vlm.hf.get_input_embeddings().register_forward_hook(lambda *a: calls.append(1))
    yield vlm
    h.remove()
    assert not calls, "the error must be raised before the forward"


# ---- class 7: bugs ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 5])
def test_topk_any_chunk_equals_unchunked(dtype, k):
    """The running top-k merge over vocabulary chunks gives the unchunked ids EXACTLY for every chunk size, also
    chunks smaller than the candidate count (which used to ask topk for more candidates than a chunk pair holds),
    with a bias, a -inf penalty and the log-sum-exp."""
    g = torch.Generator().manual_seed(1)
    vocab, d = 37, 16
    W = torch.randn(vocab, d, generator=g).to(dtype)
    h = torch.randn(6, d, generator=g).to(dtype)
    bias = torch.randn(vocab, generator=g)
    pen = torch.zeros(vocab)
    pen[[0, 3, 30]] = float("-inf")
    n_cand = max(2 * k, k + 3)
    ref_v, ref_i, _, ref_lse = topk_rerank(h, W, k, n_cand, vocab, bias=bias, penalty=pen, want_lse=True)
    exact = (h.float() @ W.float().T + bias + pen).topk(k, dim=1)
    assert torch.equal(ref_i, exact.indices)
    for chunk in sorted({1, 2, max(1, k - 1), k, n_cand - 1, vocab - 1, vocab, 10 * vocab}):
        v, i, _, lse = topk_rerank(h, W, k, n_cand, chunk, bias=bias, penalty=pen, want_lse=True)
        assert torch.equal(i, ref_i), chunk
        torch.testing.assert_close(v, ref_v, atol=1e-5, rtol=0)  # fp32 gemms of other shapes: rounding only
        torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-5)


# ---- class 2: one image, one input on every path ----------------------------------------------------------------

def _pil(mode, size, value, **info):
    im = Image.new(mode, size, value)
    im.info.update(info)
    return im


def _palette_with_transparent_index():
    im = Image.new("P", (60, 50), 0)
    im.putpalette([10, 20, 30, 200, 100, 0] + [0] * (3 * 254))
    im.paste(1, (30, 0, 60, 50))  # right half: palette entry 1 (opaque orange); left half: entry 0, transparent
    im.info["transparency"] = 0
    return im


# (input, the RGB pixels it must become, by the documented rule: 16-bit scaled by 255/65535, alpha on white)
PLANTED = [
    ("I;16 mid grey", lambda: _pil("I;16", (60, 50), 257 * 127), [(127, 127, 127)]),
    ("I;16 white", lambda: _pil("I;16", (60, 50), 65535), [(255, 255, 255)]),
    ("I 16-bit values", lambda: _pil("I", (60, 50), 257 * 40), [(40, 40, 40)]),
    ("F in [0, 1]", lambda: _pil("F", (60, 50), 0.2), [(51, 51, 51)]),
    ("RGBA transparent", lambda: _pil("RGBA", (60, 50), (200, 100, 0, 0)), [(255, 255, 255)]),
    ("RGBA opaque", lambda: _pil("RGBA", (60, 50), (200, 100, 0, 255)), [(200, 100, 0)]),
    ("RGBA 20 % alpha", lambda: _pil("RGBA", (60, 50), (200, 100, 0, 51)), [(244, 224, 204)]),
    ("LA transparent black", lambda: _pil("LA", (60, 50), (0, 0)), [(255, 255, 255)]),
    ("LA opaque black", lambda: _pil("LA", (60, 50), (0, 255)), [(0, 0, 0)]),
    ("P transparent index", _palette_with_transparent_index, [(255, 255, 255), (200, 100, 0)]),
    ("L grey", lambda: _pil("L", (60, 50), 90), [(90, 90, 90)]),
    ("CMYK blank", lambda: _pil("CMYK", (60, 50), (0, 0, 0, 0)), [(255, 255, 255)]),
    ("numpy HWC uint8", lambda: np.full((50, 60, 3), (1, 2, 3), np.uint8), [(1, 2, 3)]),
    ("numpy HW grey", lambda: np.full((50, 60), 77, np.uint8), [(77, 77, 77)]),
    ("numpy HWC float", lambda: np.full((50, 60, 3), (0.0, 0.2, 1.0)), [(0, 51, 255)]),
    ("numpy HW uint16", lambda: np.full((50, 60), 257 * 127, np.uint16), [(127, 127, 127)]),
    ("numpy HWC RGBA", lambda: np.full((50, 60, 4), (200, 100, 0, 51), np.uint8), [(244, 224, 204)]),
    ("numpy HWx1", lambda: np.full((50, 60, 1), 9, np.uint8), [(9, 9, 9)]),
    ("tensor CHW float", lambda: torch.tensor([0.0, 0.2, 1.0])[:, None, None].expand(3, 50, 60), [(0, 51, 255)]),
    ("tensor CHW uint8", lambda: torch.tensor([1, 2, 3], dtype=torch.uint8)[:, None, None].expand(3, 50, 60),
     [(1, 2, 3)]),
    ("tensor HW", lambda: torch.full((50, 60), 0.2), [(51, 51, 51)]),
    ("tensor 1HW bf16", lambda: torch.full((1, 50, 60), 0.5, dtype=torch.bfloat16), [(128, 128, 128)]),
]


@pytest.mark.parametrize("name,make,colours", PLANTED, ids=[p[0] for p in PLANTED])
def test_to_rgb_planted_pixels(name, make, colours):
    im = D.to_rgb(make())
    assert im.mode == "RGB" and im.size == (60, 50)
    assert sorted(set(im.getdata())) == sorted(colours)


@pytest.mark.parametrize("name,make,colours", PLANTED, ids=[p[0] for p in PLANTED])
def test_one_image_is_one_input_on_every_path(name, make, colours, tiny_vlm, tmp_path):
    """prepare(image), the loader's image (in memory and, for PIL images, through a file) and prepare of the
    expected RGB image built by hand give bit-identical pixel values."""
    vlm = tiny_vlm("llava")
    expected = Image.new("RGB", (60, 50), colours[0])
    if len(colours) > 1:
        expected.paste(Image.new("RGB", (30, 50), colours[1]), (30, 0))
    ref = vlm.prepare([expected], [P]).inputs["pixel_values"]
    assert torch.equal(vlm.prepare([make()], [P]).inputs["pixel_values"], ref)
    assert torch.equal(vlm.prepare(make(), P).inputs["pixel_values"], ref)
    loaded, _ = D.load_image(make())
    assert torch.equal(vlm.prepare([loaded], [P]).inputs["pixel_values"], ref)
    im = make()
    if isinstance(im, Image.Image) and im.mode not in ("F", "I", "CMYK"):  # a PNG holds it as is
        im.save(tmp_path / "x.png")
        rec, = D.ImageFolder(tmp_path)
        loaded, _ = rec.load()
        assert torch.equal(vlm.prepare([loaded], [P]).inputs["pixel_values"], ref)


BAD_IMAGES = [
    ("numpy CHW", lambda: np.zeros((3, 50, 60), np.uint8), r"channels-first: pass a.transpose\(1, 2, 0\)"),
    ("numpy 2 channels", lambda: np.zeros((50, 60, 2), np.uint8), r"numpy images are HxWxC \(C = 1, 3 or 4\)"),
    ("numpy batch", lambda: np.zeros((2, 50, 60, 3), np.uint8), r"for a batch pass a list of images"),
    ("numpy float 0..255", lambda: np.full((50, 60, 3), 200.0), r"float images must lie in \[0, 1\] \(divide"),
    ("numpy NaN", lambda: np.full((50, 60, 3), np.nan), r"holds NaN values"),
    ("numpy negative ints", lambda: np.full((50, 60), -3), r"must lie in 0..255"),
    ("numpy complex", lambda: np.zeros((50, 60), np.complex64), r"not an image dtype"),
    ("tensor HWC", lambda: torch.zeros(50, 60, 3), r"channels-last: pass t.permute\(2, 0, 1\)"),
    ("tensor batch", lambda: torch.zeros(2, 3, 50, 60), r"for a batch pass a list of images"),
    ("tensor 0..255 floats", lambda: torch.full((3, 50, 60), 255.0), r"float images must lie in \[0, 1\]"),
    ("tensor empty", lambda: torch.zeros(3, 0, 60), r"is empty"),
    ("path string", lambda: "cat.png", r"open files with PIL.Image.open\(path\)"),
    ("F out of range", lambda: _pil("F", (60, 50), 3.0), r"float images must lie in \[0, 1\]"),
]


@pytest.mark.parametrize("name,make,fix", BAD_IMAGES, ids=[b[0] for b in BAD_IMAGES])
def test_bad_images_refused_before_the_forward(name, make, fix, no_forward):
    with pytest.raises(InputError, match=fix):
        mv.run(no_forward, [make()], [P], probes=[NormTracker()])
    with pytest.raises(InputError, match=fix):
        D.to_rgb(make())
    if name != "path string":  # a loader reads paths; anything else bad is skipped with the reason
        im, note = D.load_image(make())
        assert im is None and re.search(fix, note), note


def test_one_image_not_in_a_list_is_one_image(tiny_vlm):
    """mv.run(vlm, image, prompt) with ONE array / tensor / PIL image runs that image once (a bare array is not
    iterated row by row), with the same result as the list of one."""
    vlm = tiny_vlm("llava")
    arr = np.asarray(T.image(60))
    ref, = mv.run(vlm, [T.image(60)], [P], probes=[NormTracker()])
    for one in (arr, torch.from_numpy(arr).permute(2, 0, 1), T.image(60)):
        r, = mv.run(vlm, one, P, probes=[NormTracker()])
        pd.testing.assert_frame_equal(r.to_pandas(), ref.to_pandas())
