"""Issue 15: no silent wrong results. Each class of bad or unusual input (2: one image, two inputs; 3: arguments
validated at the API boundary; 6: thresholds a model can never reach; 7: bugs) is fed SEVERAL inputs and must give
the right result exactly, or an InputError raised before any forward whose message names the fix."""

import re
from pathlib import Path

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
    ("PIL empty", lambda: Image.new("RGB", (0, 5)), r"is empty \(0x5 px\)|empty image \(0x5\)"),
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
    ref = _norms(mv.run(vlm, [T.image(60)], [P], probes=[NormTracker()]))
    for one in (arr, torch.from_numpy(arr).permute(2, 0, 1), T.image(60)):
        r = _norms(mv.run(vlm, one, P, probes=[NormTracker()]))
        pd.testing.assert_frame_equal(r.to_pandas(), ref.to_pandas())


# ---- class 3: arguments validated at the API boundary, naming the valid values -----------------------------------

@pytest.mark.parametrize("alias,want", [("bf16", torch.bfloat16), ("BF16", torch.bfloat16), ("fp16", torch.float16),
                                        ("half", torch.float16), ("fp32", torch.float32), ("float", torch.float32),
                                        ("torch.bfloat16", torch.bfloat16), ("bfloat16", torch.bfloat16),
                                        (torch.float16, torch.float16), ("auto", "auto"), (None, None)])
def test_dtype_aliases_load_that_dtype(alias, want):
    from mech_vtokens.placement import check_dtype

    assert check_dtype(alias) == want


@pytest.mark.parametrize("kw,fix", [
    ({"dtype": "bfloat61"}, r"did you mean 'bfloat16'\?.*use one of 'auto', 'float32'"),
    ({"dtype": "flaot16"}, r"did you mean 'float16'\?"),
    ({"dtype": "int8"}, r"needs a quantization_config, e.g. BitsAndBytesConfig"),
    ({"dtype": torch.int8}, r"needs a quantization_config"),
    ({"dtype": "torch.uint8"}, r"needs a quantization_config"),
    ({"dtype": 16}, r"is not a dtype a model can be loaded in; use one of"),
    ({"attn_implementation": "eagre"}, r"did you mean 'eager'\?.*use one of 'eager'"),
    ({"attn_implementation": "spda"}, r"did you mean 'sdpa'\?"),
    ({"attn_implementation": 3}, r"is not an attention implementation; use one of"),
    ({"device_map": "cuda:7"}, r"this machine has \d+ cuda device\(s\); use one of 'cpu'"),
    ({"device_map": {"": "cuda:7"}}, r"device_map\[''\]='cuda:7': this machine has"),
    ({"device_map": "gpu"}, r"is not a device; use one of 'cpu'"),
    ({"device_map": "disk"}, r"places no module where it can run"),
    ({"torch_dtype": "bf16"}, r"torch_dtype='bf16': pass dtype='bf16'"),
])
def test_load_arguments_refused_before_any_weight_is_read(kw, fix, tiny_dir, monkeypatch):
    import transformers

    def no_weights(*a, **k):
        raise AssertionError("weights were read before the argument check")

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", no_weights)
    with pytest.raises(InputError, match=fix):
        mv.load(tiny_dir("llava"), **kw)


def test_model_dir_without_processor_files_names_them(tiny_dir, tmp_path):
    import shutil

    src = tiny_dir("llava")
    for drop, fix in [(("processor_config.json",), r"lacks a image processor config \(preprocessor_config.json or "
                                                     r"processor_config.json\)"),
                      (("tokenizer.json",), r"lacks a tokenizer \(tokenizer.json or tokenizer.model"),
                      (("processor_config.json", "tokenizer.json", "tokenizer_config.json"),
                       r"image processor config .*; a tokenizer .*save_pretrained.*processor=")]:
        d = tmp_path / "_".join(drop)
        shutil.copytree(src, d, ignore=shutil.ignore_patterns(*drop))
        with pytest.raises(InputError, match=fix):
            mv.load(d)
    d = tmp_path / "corrupt"
    shutil.copytree(src, d)
    (d / "tokenizer.json").write_text("{not json")
    with pytest.raises(InputError, match=r"cannot load the processor of .*JSONDecodeError.*repair its files or pass"):
        mv.load(d)


@pytest.mark.parametrize("remote,fix", [("ndif", r"\"ndif\" is the CLI's spelling .*remote=True"),
                                        ("NDIF", r"CLI's spelling"), ("locla", r"did you mean 'local'\?"),
                                        ("remote", r"is not a backend; use remote=False \(here\), remote=True"),
                                        (1, r"is not a backend"), ("true", r"is not a backend")])
def test_remote_values_refused_before_the_forward(remote, fix, no_forward):
    with pytest.raises(InputError, match=fix):
        mv.run(no_forward, [T.image(60)], [P], probes=[NormTracker()], remote=remote)
    with pytest.raises(InputError, match=fix):
        mv.generate(no_forward, [T.image(60)], [P], max_new_tokens=1, remote=remote)


def _run(*args, **kwargs):
    """mv.run's results in probe order, whether it returns a list or a mapping keyed by probe name."""
    from collections.abc import Mapping

    res = mv.run(*args, **kwargs)
    return list(res.values()) if isinstance(res, Mapping) else list(res)


def _norms(results):
    """The NormTracker result of a run (a list of results, or a mapping of them)."""
    from collections.abc import Mapping

    rs = results.values() if isinstance(results, Mapping) else results
    return next(r for r in rs if type(r).__name__ == "NormResult")


def test_one_component_is_a_list_of_one_everywhere(tiny_vlm):
    """probes= / interventions= take one component or a list, in run, generate, forward, applied and an
    Experiment: the same results as the list of one."""
    from mech_vtokens.interventions import Rescale, applied
    from mech_vtokens.loop import forward

    vlm = tiny_vlm("llava")
    im = T.image(60)
    ref = _norms(mv.run(vlm, [im], [P], probes=[NormTracker()], interventions=[Rescale(factor=0.5)]))
    one = _norms(mv.run(vlm, [im], [P], probes=NormTracker(), interventions=Rescale(factor=0.5)))
    pd.testing.assert_frame_equal(one.to_pandas(), ref.to_pandas())
    batch = vlm.prepare([im], [P])
    fw = _norms(forward(vlm, batch, NormTracker(), Rescale(factor=0.5)))
    pd.testing.assert_frame_equal(fw.to_pandas(), ref.to_pandas())
    g1 = mv.generate(vlm, [im], [P], interventions=Rescale(factor=0.5), max_new_tokens=3)
    g2 = mv.generate(vlm, [im], [P], interventions=[Rescale(factor=0.5)], max_new_tokens=3)
    assert g1.text == g2.text
    with applied(vlm, batch, interventions=Rescale(factor=0.5)):
        a = vlm.hf(**batch.inputs).logits
    with applied(vlm, batch, interventions=[Rescale(factor=0.5)]):
        b = vlm.hf(**batch.inputs).logits
    assert torch.equal(a, b)
    for bad, fix in [({"probes": 3}, r"probes=3: give a list of components \(or one\)"),
                     ({"probes": "norms"}, r"probes='norms': give a list of components"),
                     ({"interventions": 0.5, "probes": [NormTracker()]}, r"interventions=0.5: give a list")]:
        with pytest.raises(InputError, match=fix):
            mv.run(vlm, [im], [P], **bad)


@pytest.mark.parametrize("kind", ["file", "file-parent", "unwritable"])
def test_out_dir_that_cannot_be_written(kind, tiny_vlm, tmp_path):
    from mech_vtokens.runner import run_dataset
    from mech_vtokens.suite import analyze

    vlm = tiny_vlm("llava")
    if kind == "file":
        out, fix = tmp_path / "f", r"f is a file, not a directory; give a directory path"
        out.write_text("x")
    elif kind == "file-parent":
        (tmp_path / "f").write_text("x")
        out, fix = tmp_path / "f" / "sub", r"f is a file, not a directory"
    else:
        out, fix = Path("/proc/mech-vtokens-test/out"), r"cannot create the directory .*give a directory you can write"
    with pytest.raises(InputError, match=fix):
        run_dataset(vlm, D.InMemory([T.image(60)]), probes=["norms"], out=out, progress=False)
    with pytest.raises(InputError, match=fix):
        analyze(vlm, [T.image(60)], [P], probes=["norms"], out=out, progress=False)


# ---- class 7: SinkChannels' BOS is the first TEXT token, never a visual one ---------------------------------------

SINK_PROMPTS = [
    ("image first, no BOS", ["<image> what color is the object ?"]),
    ("text first", ["USER : <image> what color is the object ? ASSISTANT :"]),
    ("explicit BOS", ["<s> <image> what color is it ?"]),
    ("padded batch of both", ["<image> what color is the object ?", "USER : <image> what is it ? ASSISTANT :"]),
]


@pytest.mark.parametrize("name,prompts", SINK_PROMPTS, ids=[s[0] for s in SINK_PROMPTS])
def test_sink_channels_bos_is_the_first_text_token(name, prompts, tiny_vlm):
    """bos_cos and the discovered sink dims use each row's first attended TEXT token (checked against the hidden
    states read by Activations), also when the prompt starts with the image and the tokenizer adds no BOS."""
    from mech_vtokens.probes import SinkChannels
    from mech_vtokens.probes.activations import Activations

    vlm = tiny_vlm("llava")
    assert vlm.tokenizer("what").input_ids[0] != vlm.tokenizer.bos_token_id  # the fixture adds no BOS
    sites = ["hook_embed", "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    ims = [T.image(60, seed=i) for i in range(len(prompts))]
    sc, act = _run(vlm, ims, prompts, probes=[SinkChannels(threshold=2.0, sites=sites,
                                                           reference_site=sites[-1]), Activations(sites)])
    batch = vlm.prepare(ims, prompts)
    att = batch.inputs["attention_mask"].bool()
    text = att & ~batch.visual_mask
    df = sc.to_pandas()
    dims = set()
    for row in range(len(prompts)):
        first_text = int(text[row].nonzero()[0, 0])
        assert not batch.visual_mask[row, first_text]
        for s in sites:
            x = act[s][row].float()
            want = torch.nn.functional.cosine_similarity(x, x[first_text][None], dim=-1)
            got = df[(df.row == row) & (df.site == s)].sort_values("position")
            pos = torch.as_tensor(got.position.to_numpy())
            torch.testing.assert_close(torch.as_tensor(got.bos_cos.to_numpy()), want[pos], atol=1e-5, rtol=0)
            bos = x[first_text]
            dims |= set(((bos.abs() / bos.pow(2).mean().sqrt()) >= 2.0).nonzero()[:, 0].tolist())
    assert sc.sink_dims == sorted(dims)
    if name.startswith("image first"):
        assert int(text[0].nonzero()[0, 0]) == batch.n_visual  # the BOS role went past the image, to "what"


def test_sink_channels_refuses_a_prompt_without_text(no_forward):
    from mech_vtokens.probes import SinkChannels

    with pytest.raises(InputError, match=r"prompt\(s\) \[0\] hold no text token: add the question text"):
        mv.run(no_forward, [T.image(60)], ["<image>"], probes=[SinkChannels(threshold=2.0)])


# ---- class 7: "labels" on a source without labels; tiny_model's cache ----------------------------------------------

def _folder(tmp, n=2):
    tmp.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        T.image(60, seed=i).save(tmp / f"{i}.png")
    return tmp


@pytest.mark.parametrize("source,fix", [
    (lambda t: _folder(t / "imgs"), r"ImageFolder records carry no labels: use a COCO instances file"),
    (lambda t: D.InMemory([T.image(60)]), r"InMemory records carry no labels"),
    (lambda t: D.InMemory([T.image(60)], labels=[["zebra-crossing"]]),
     r"none of its labels is a token of this model's vocabulary"),
])
def test_labels_probe_on_an_unlabelled_source_is_refused(source, fix, no_forward, tmp_path):
    from mech_vtokens.runner import run_dataset

    with pytest.raises(InputError, match=fix):
        run_dataset(no_forward, source(tmp_path), probes=["labels"], out=tmp_path / "out", progress=False)


def test_labels_probe_on_a_labelled_source_still_runs(tiny_vlm, tmp_path):
    from mech_vtokens.runner import run_dataset

    vlm = tiny_vlm("llava")
    store = run_dataset(vlm, D.InMemory([T.image(60), T.image(60, seed=1)], labels=[["red"], []]),
                        probes=["labels"], out=tmp_path / "out", progress=False)
    df = store.frame("labels")
    assert len(df) and set(df.record_id) == {"0"}


def test_tiny_model_cache_checks_family_and_seed(tmp_path):
    import json

    path = tmp_path / "m"
    T.tiny_model("llava", path)
    assert json.loads((path / "config.json").read_text())["model_type"] == "llava"
    w0 = (path / "model.safetensors").read_bytes()
    assert T.tiny_model("llava", path) == str(path) and (path / "model.safetensors").read_bytes() == w0  # cached
    T.tiny_model("qwen2_vl", path)  # another family at the same path: rebuilt, not the cached LLaVA
    assert json.loads((path / "config.json").read_text())["model_type"] == "qwen2_vl"
    T.tiny_model("llava", path, seed=1)  # another seed: rebuilt with that seed's weights
    w1 = (path / "model.safetensors").read_bytes()
    assert w1 != w0
    T.tiny_model("llava", path)
    assert (path / "model.safetensors").read_bytes() == w0  # seed 0 again: bit-identical to the first build
    (path / "tiny_model.json").unlink()  # a model tiny_model did not mark: refused, never returned as another
    with pytest.raises(InputError, match=r"already holds a 'llava' model that tiny_model did not mark"):
        T.tiny_model("internvl", path)
    with pytest.raises(InputError, match=r"unknown family 'lava'; choose one of llava"):
        T.tiny_model("lava", tmp_path / "x")


# ---- class 6: thresholds a model can never reach -----------------------------------------------------------------

@pytest.fixture()
def forward_raises(tiny_vlm):
    """The tiny LLaVA (d = 64, sqrt(d) = 8) whose LM raises when it runs: a warning seen before that came first."""
    vlm = tiny_vlm("llava")

    def boom(*a):
        raise RuntimeError("the forward ran")

    h = vlm.hf.get_input_embeddings().register_forward_hook(boom)
    yield vlm
    h.remove()


def _unreachable_cases():
    from mech_vtokens.partition import calibrate
    from mech_vtokens.probes import SinkChannels

    ims = [T.image(60), T.image(60, seed=1)]
    run = lambda v, p: mv.run(v, ims, [P, P], probes=[p])  # noqa: E731
    return [
        ("default 20", lambda v: run(v, SinkChannels()), r"φ > 20 is out of reach .*sqrt\(d\) = 8.0 \(d = 64\)"),
        ("exactly sqrt(d)", lambda v: run(v, SinkChannels(threshold=8.0)), r"φ > 8 is out of reach"),
        ("above, given dims", lambda v: run(v, SinkChannels(dims=[1, 2], threshold=100.0)), r"φ > 100"),
        ("discover_ratio", lambda v: run(v, SinkChannels(threshold=3.0, discover_ratio=9.0)),
         r"discover_ratio=...\): the sink threshold φ > 9"),
        ("calibrate", lambda v: calibrate(v, ims, [P, P]), r"calibrate: the sink threshold φ > 20 is out of reach"),
    ]


@pytest.mark.parametrize("case", range(5))
def test_unreachable_phi_threshold_is_warned_before_the_forward(case, forward_raises):
    from mech_vtokens.errors import ThresholdWarning

    name, call, fix = _unreachable_cases()[case]
    with pytest.warns(ThresholdWarning, match=fix) as rec:
        with pytest.raises(RuntimeError, match="the forward ran"):
            call(forward_raises)
    assert "sink_thresholds(vlm, images)['phi']" in str(rec[0].message)


def test_reachable_threshold_no_warning_and_result_says_which(tiny_vlm):
    import warnings

    from mech_vtokens.errors import ThresholdWarning
    from mech_vtokens.probes import SinkChannels

    vlm = tiny_vlm("llava")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        ok, = _run(vlm, [T.image(60)], [P], probes=[SinkChannels(threshold=7.9)])
        bad, = _run(vlm, [T.image(60)], [P], probes=[SinkChannels(threshold=20.0)])
    assert [str(w.message)[:12] for w in rec if issubclass(w.category, ThresholdWarning)] == ["SinkChannels"]
    assert ok.reachable and not bad.reachable and bad.phi_bound == pytest.approx(8.0)
    assert not bad.to_pandas().sink.any()


def test_sink_thresholds_find_the_planted_sinks(tmp_path):
    """On a model with planted ViT and LLM sinks, the data-calibrated thresholds flag exactly the planted tokens."""
    from mech_vtokens.partition import sink_thresholds
    from mech_vtokens.probes import SinkChannels, ViTSinks

    path, truth = T.planted_partition_model("llava", tmp_path / "planted")
    vlm = mv.load(path)
    ims = [T.planted_image(truth, seed=s)[0] for s in range(3)]
    prs = [T.prompt("llava")] * 3
    t = sink_thresholds(vlm, ims, prs, vit_layer=-1)
    assert t["phi"] is not None and t["vit"] is not None and t["phi"] < t["phi_bound"]
    assert t["n_forwards"] == 1 and t["n_images"] == 3
    sc, vs = _run(vlm, ims, prs, probes=[SinkChannels(threshold=t["phi"], sites=[t["llm_site"]],
                                                      reference_site=t["llm_site"]),
                                         ViTSinks(layer=-1, threshold=t["vit"])])
    g = truth["grid"]
    want_vit = torch.zeros(g, g, dtype=torch.bool)
    want_llm = torch.zeros(g, g, dtype=torch.bool)
    for r, c in truth["vit"]:
        want_vit[r, c] = True
    for r, c in truth["llm"]:
        want_llm[r, c] = True
    df = sc.to_pandas()
    vis = df[df.visual_index >= 0].sort_values(["row", "visual_index"])
    assert torch.equal(torch.as_tensor(vis.sink.to_numpy()), want_llm.flatten().repeat(3))
    assert sorted(sc.sink_dims) == sorted(truth["sink_dims"])
    assert torch.equal(vs.sinks, want_vit.flatten().repeat(3))


def test_the_report_says_why_and_uses_calibrated_thresholds(tiny_vlm, tmp_path):
    import json

    from mech_vtokens.suite import analyze

    vlm = tiny_vlm("llava")
    ims = [T.image(60, seed=i) for i in range(3)]
    import warnings

    from mech_vtokens.errors import ThresholdWarning

    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        _, report = analyze(vlm, ims, [P] * 3, probes=["sinks", "vit_sinks"], out=tmp_path, progress=False,
                            overlays=0)
    assert not [w for w in rec if issubclass(w.category, ThresholdWarning)]  # the report says it once instead
    th = json.loads((tmp_path / "thresholds.json").read_text())
    assert th["calibrated"] and "out of reach for this model" in th["text"] and "sqrt(d) = 8.0" in th["text"]
    html = open(report).read()
    assert "sqrt(d) = 8.0, d = 64" in html and "sink_thresholds" in html
    for ok in (["norms"],):  # no sink probe: no threshold forwards, the paper's numbers stated
        analyze(vlm, ims, [P] * 3, probes=ok, out=tmp_path / "n", progress=False, overlays=0)
        assert not json.loads((tmp_path / "n" / "thresholds.json").read_text())["calibrated"]


def test_vit_sinks_says_why_it_found_none(tiny_vlm):
    from mech_vtokens.errors import ThresholdWarning
    from mech_vtokens.probes import ViTSinks

    vlm = tiny_vlm("llava")
    with pytest.warns(ThresholdWarning, match=r"no visual token's L2 norm exceeds 1e\+06 .*CLIP ViT-L/14's number"):
        none, = _run(vlm, [T.image(60)], [P], probes=[ViTSinks(threshold=1e6)])
    assert not none.sinks.any() and "sink_thresholds(vlm, images)['vit']" in none.note
    some, = _run(vlm, [T.image(60)], [P], probes=[ViTSinks(threshold=float(none.l2.median()))])
    assert some.sinks.any() and some.note is None


# ---- class 7: LLaVA token boxes against the processor's own resize + centre crop ----------------------------------

@pytest.mark.parametrize("size", [(97, 61), (61, 97), (85, 85), (301, 123), (84, 85), (123, 84)])
def test_llava_boxes_match_the_processors_crop_on_odd_sizes(size, tiny_vlm):
    """With nearest resampling every model-input pixel IS one original pixel; the processor's own output (coordinate-
    coded images) says which. Each token's box must put that pixel's centre in the same original pixel: an offset
    off by half a pixel (a float centre crop where the processor uses integer sizes and //) fails on odd sizes."""
    import copy

    vlm = tiny_vlm("llava")
    ip = copy.deepcopy(vlm.processor.image_processor)
    ip.resample, ip.do_normalize, ip.do_rescale = 0, False, False  # nearest; raw 0..255 values
    w, h = size
    xs, ys = np.meshgrid(np.arange(w), np.arange(h))
    coded = [np.stack([c % 256, c // 256, np.zeros_like(c)], -1).astype(np.uint8) for c in (xs, ys)]
    out = [ip(Image.fromarray(a), return_tensors="pt")["pixel_values"][0] for a in coded]
    col = (out[0][0] + 256 * out[0][1]).round().long()  # (side, side): original column sampled at each input pixel
    row = (out[1][0] + 256 * out[1][1]).round().long()
    tokens = vlm.prepare([Image.new("RGB", size)], [P]).tokens
    p = vlm.hf.config.vision_config.patch_size
    checked = 0
    for j in range(len(tokens["image"])):
        r, c = int(tokens["row"][j]), int(tokens["col"][j])
        x0, y0, x1, y1 = (float(v) for v in tokens["box"][j])
        for u in range(c * p, (c + 1) * p):  # every input pixel of the token: its centre's original pixel
            assert int(np.floor(x0 + (u - c * p + 0.5) * (x1 - x0) / p)) == int(col[0, u])
        for v in range(r * p, (r + 1) * p):
            assert int(np.floor(y0 + (v - r * p + 0.5) * (y1 - y0) / p)) == int(row[v, 0])
        checked += 1
    assert checked == len(tokens["image"]) == (vlm.hf.config.vision_config.image_size // p) ** 2


def test_lenses_with_tiny_chunks_equal_the_default(tiny_vlm):
    """EmbedLens / LogitLens with chunk 1, 2, k-1, k (which used to crash) give the default chunk's ids."""
    from mech_vtokens.probes import EmbedLens, LogitLens

    vlm = tiny_vlm("llava")
    k = 4
    ref = _run(vlm, [T.image(60)], [P], probes=[EmbedLens(k=k), LogitLens(k=k)])
    for chunk in (1, 2, k - 1, k):
        got = _run(vlm, [T.image(60)], [P], probes=[EmbedLens(k=k, chunk=chunk), LogitLens(k=k, chunk=chunk)])
        for a, b in zip(got, ref):
            for site in b.ids:
                assert torch.equal(a.ids[site], b.ids[site]), (chunk, site)


def test_group_refuses_values_it_would_read_with_another_meaning(tiny_vlm):
    """Issue 15 class 1: a 0/1 mask cast to int or float, a float score, a NaN-holed mask and repeated indices are
    refused (read as indices they would prune tokens 0 and 1 only); a bool mask (torch or numpy) and distinct
    indices still work."""
    import numpy as np
    import torch

    from mech_vtokens.token_sets import Group, resolve

    vlm = tiny_vlm("llava")
    b = vlm.prepare([T.image()], [P])
    n = b.n_visual
    mask = np.zeros(n, dtype=bool)
    mask[[3, 5, 7, 11]] = True
    nan = mask.astype(float)
    nan[0] = np.nan
    for bad, says in ((mask.astype(int), "mask cast to int"), (torch.as_tensor(mask).long(), "mask cast to int"),
                      (mask.astype(float), "float64"), (nan, "NaN"), (np.linspace(0, 1, n), "float64"),
                      ([1, 1, 2], "repeated"), ([[0, 1], [0, 1]], "repeated")):
        with pytest.raises(InputError, match=says):
            resolve(Group(bad), b)
    want = torch.as_tensor(mask)
    for good in (mask, torch.as_tensor(mask), [3, 5, 7, 11], np.array([3, 5, 7, 11])):
        got = resolve(Group(good), b)
        assert got[b.visual_mask].equal(want) and int(got.sum()) == 4


def test_positions_counts_the_batch_visual_tokens(tiny_vlm):
    """The unit of Positions' ints is the batch's visual index (row 0's tokens first), said in the error."""
    import torch

    from mech_vtokens.token_sets import Positions, resolve

    vlm = tiny_vlm("llava")
    b = vlm.prepare([T.image(), T.image(seed=1)], [P, P])
    per = b.n_visual // 2
    got = resolve(Positions([per]), b)  # the first visual token of row 1
    assert got[1].nonzero().flatten().tolist() == [b.visual_positions[per, 1].item()] and not got[0].any()
    with pytest.raises(InputError, match="not one image's"):
        resolve(Positions([2 * per]), b)
    assert torch.equal(resolve(Positions([(1, int(b.visual_positions[per, 1]))]), b), got)
