"""Issue 15 class 2: one image is one input on every path. The same image (in memory or as a file) given to
``vlm.prepare``, ``mv.run``, ``mv.generate``, ``loop.batches``, ``run_dataset`` (in memory and from a folder),
``evaluate`` and the CLI's folder loader reaches the processor as bit-identical ``pixel_values``: one conversion
(``data.to_rgb``) and one size policy (``data.fit_side``) on every path. Tiny and huge images are compared with an
independent resize by hand."""

import numpy as np
import pytest
import torch
from PIL import Image

import mech_vtokens as mv
from mech_vtokens import data as D
from mech_vtokens import testing as T
from mech_vtokens.errors import InputError
from mech_vtokens.evaluate import evaluate
from mech_vtokens.loop import batches
from mech_vtokens.probes import NormTracker
from mech_vtokens.runner import run_dataset


def _variants():
    """name -> a PIL image whose file (PNG) reopens as the same pixels."""
    base = T.image(80, seed=3)
    a16 = (np.arange(64 * 48).reshape(48, 64) * 21).astype(np.uint16)
    rgba = base.convert("RGBA")
    rgba.putalpha(Image.fromarray((np.arange(80 * 80).reshape(80, 80) % 256).astype(np.uint8)))
    la = base.convert("LA")
    return {
        "rgb": base,
        "tiny": T.image(60, seed=4).resize((12, 20)),  # upscaled to MIN_SIDE on every path
        "huge": Image.fromarray(np.tile(np.asarray(T.image(60, seed=5)), (2, 70, 1))),  # 4200x120: downscaled
        "grey16": Image.fromarray(a16),
        "rgba": rgba,
        "la": la,
        "palette": base.convert("P"),
    }


@pytest.fixture()
def seen(tiny_vlm, monkeypatch):
    """The pixel_values of every processor call (the processor class's __call__, wrapped)."""
    vlm = tiny_vlm("llava")
    calls = []
    cls = type(vlm.processor)
    orig = cls.__call__

    def recorded(self, *a, **k):
        out = orig(self, *a, **k)
        if "pixel_values" in out:
            calls.append(out["pixel_values"].detach().clone())
        return out

    monkeypatch.setattr(cls, "__call__", recorded)
    return vlm, calls


def _last(calls):
    assert calls, "the processor saw no image"
    return calls[-1]


@pytest.mark.parametrize("name", list(_variants()))
def test_one_image_reaches_the_processor_as_the_same_pixels_on_every_path(seen, tmp_path, name):
    vlm, calls = seen
    im = _variants()[name]
    folder = tmp_path / "imgs"
    folder.mkdir()
    im.save(folder / f"{name}.png")
    q = "describe the image ."
    prompt = vlm.prompt(q)

    vlm.prepare(im, prompt)
    want = _last(calls)
    got = {}
    mv.run(vlm, [im], [prompt], probes=[NormTracker()])
    got["run"] = _last(calls)
    mv.generate(vlm, [im], [prompt], max_new_tokens=1)
    got["generate"] = _last(calls)
    next(batches(vlm, [im], [prompt]))
    got["loop.batches"] = _last(calls)
    vlm.prepare(Image.open(folder / f"{name}.png"), prompt)
    got["prepare(Image.open(file))"] = _last(calls)
    run_dataset(vlm, D.InMemory([im], questions=[q]), probes=["norms"], out=tmp_path / "r1", progress=False)
    got["run_dataset(InMemory)"] = _last(calls)
    run_dataset(vlm, folder, probes=["norms"], out=tmp_path / "r2", progress=False, question=q)
    got["run_dataset(folder)"] = _last(calls)
    evaluate(vlm, D.InMemory([im], questions=[q], answers=[["red"]]), {"baseline": []}, max_new_tokens=1,
             progress=False)
    got["evaluate"] = _last(calls)
    from mech_vtokens.cli import _load_folder

    ims, _ = _load_folder(folder)
    vlm.prepare(ims[0], prompt)
    got["cli loader"] = _last(calls)
    for path, pv in got.items():
        assert pv.shape == want.shape and torch.equal(pv, want), (name, path)


def test_the_size_policy_equals_a_resize_by_hand_and_is_applied_once(seen):
    vlm, calls = seen
    prompt = vlm.prompt("describe the image .")
    tiny = T.image(60, seed=4).resize((12, 20))
    huge = Image.fromarray(np.tile(np.asarray(T.image(60, seed=5)), (2, 70, 1)))  # 4200 x 120
    hand = {"tiny": tiny.resize((28, round(20 * 28 / 12)), Image.BICUBIC),
            "huge": huge.resize((D.MAX_SIDE, round(120 * D.MAX_SIDE / 4200)), Image.BICUBIC)}
    for name, im in (("tiny", tiny), ("huge", huge)):
        b = vlm.prepare(im, prompt)
        got = _last(calls)
        vlm.processor(text=[prompt], images=[hand[name]], return_tensors="pt")
        assert torch.equal(got, _last(calls)), name
        assert b.image_sizes == [hand[name].size]  # boxes are in the image the processor received
        again, note = D.fit_side(hand[name])
        assert again is hand[name] and note is None  # idempotent: a loaded image is not resized again by prepare
    assert D.load_image(tiny)[1].startswith("upscaled 12x20 to 28x47")


def test_an_aspect_no_size_satisfies_is_refused_before_any_work(no_forward):
    vlm = no_forward
    for size in ((3000, 10), (5, 900)):
        with pytest.raises(InputError, match="aspect ratio over 100:1.*crop or pad"):
            vlm.prepare(Image.new("RGB", size), vlm.prompt("describe the image ."))
    assert D.load_image(Image.new("RGB", (3000, 10)))[0] is None  # a loader skips it with the reason instead
