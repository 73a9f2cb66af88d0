"""Issue 15, the wider sweep: 174 bad or unusual inputs across the public API, written as a user would
(``mv.load`` arguments, ``vlm.prompt`` / ``vlm.prepare`` images, prompts and processor options, every probe's and
intervention's constructor arguments, token sets, ``run`` / ``generate`` / ``run_dataset`` / ``evaluate`` /
``HarnessModel`` / ``loop.batches`` arguments, data sources, stores, CLI flags). Each entry asserts its exact outcome:
an ``InputError`` raised before any forward whose message names the fix (REFUSED: the fragment it must hold), or the
right result (WORKS: checked against the same call written the canonical way, or a value computed by hand).
The first run (its first 168 entries) found 29 raw tracebacks and 27 silent results, 14 of them wrong (``limit=-1``
dropping a record, ``k=0`` skipping every batch, truthy strings as flags, ``int()`` of floats, an unknown processor
option ignored); conditions whose layers are out of range skipped every batch of an evaluation.
CLI flags are in ``CLI`` (each refused before the model loads, exit 2, the message asserted)."""

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mech_vtokens as mv
from mech_vtokens import data as D
from mech_vtokens import testing as T
from mech_vtokens.errors import InputError
from mech_vtokens.evaluate import HarnessModel, evaluate
from mech_vtokens.interventions import (AllVisual, AttentionKnockout, Complement, Group, Kinds, MatchedRandom,
                                        Positions, Prune, Rescale, VisualEntry, VisualExit, ZeroSublayer)
from mech_vtokens.loop import batches
from mech_vtokens.probes import EmbedLens, LabelMatching, LogitLens, NormTracker, SinkChannels, ViTSinks
from mech_vtokens.probes.activations import Activations
from mech_vtokens.runner import Store, run_dataset

v = path = root = None  # set by the ``env`` fixture: the tiny LLaVA, its directory, a scratch folder
img = T.image(60)
P = T.prompt("llava")
CALLS = []


def NT():
    return [NormTracker()]


def src(n=2):
    return D.InMemory([T.image(60, seed=i) for i in range(n)], questions=["q"] * n, answers=[["a"]] * n)


def _imgdir():
    d = root / "cli-images"
    d.mkdir(exist_ok=True)
    img.save(d / "a.png")
    return str(d)


def analyze(*flags):
    return cli(["analyze", "--model", path, "--out", str(root / "report"), *flags])


def cli(argv):
    from mech_vtokens.cli import main

    return main(argv)


def run1(**kw):
    return mv.run(v, [img], [P], probes=NT(), **kw)


def ivrun(*ivs):
    return mv.run(v, [img], [P], probes=NT(), interventions=list(ivs))


def prun(*probes):
    return mv.run(v, [img], [P], probes=list(probes))


_n = [0]


def rd(name, **kw):
    _n[0] += 1
    kw.setdefault("probes", ["norms"])
    kw.setdefault("progress", False)
    return run_dataset(v, kw.pop("source", src()), out=root / f"rd{_n[0]}", **kw)


def ev(conds=None, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("max_new_tokens", 1)
    return evaluate(v, kw.pop("source", src()), conds if conds is not None else {"b": []}, **kw)


# (id, the call) -- every entry is either REFUSED or WORKS below
E = [
 ("load-dtype-torch-int8", lambda: mv.load(path, dtype=torch.int8)),
 ("load-dtype-int", lambda: mv.load(path, dtype=3)),
 ("load-dtype-float", lambda: mv.load(path, dtype="float")),
 ("load-dtype-auto", lambda: mv.load(path, dtype="auto")),
 ("load-device-map-int", lambda: mv.load(path, device_map=5)),
 ("load-device-map-dict", lambda: mv.load(path, device_map={"": "cpu"})),
 ("load-attn-flash", lambda: mv.load(path, attn_implementation="flash_attention_2")),
 ("load-attn-empty", lambda: mv.load(path, attn_implementation="")),
 ("load-none", lambda: mv.load(None)),
 ("load-path-obj", lambda: mv.load(Path(path))),
 ("load-processor-str", lambda: mv.load(path, processor="x")),
 ("load-kwarg-typo", lambda: mv.load(path, dtpye="bfloat16")),
 ("load-empty-str", lambda: mv.load("")),
 ("prompt-not-str", lambda: v.prompt(123)),
 ("prompt-n-neg", lambda: v.prompt("q", n_images=-1)),
 ("prompt-n-bool", lambda: v.prompt("q", n_images=True)),
 ("prompt-n-float", lambda: v.prompt("q", n_images=1.0)),
 ("prompt-system-int", lambda: v.prompt("q", system=5)),
 ("prepare-single", lambda: v.prepare(img, P)),
 ("prepare-list-img-str-prompt", lambda: v.prepare([img], P)),
 ("prepare-none-images", lambda: v.prepare(None, P)),
 ("prepare-padding-side-bogus", lambda: v.prepare([img], [P], padding_side="middle")),
 ("prepare-return-tensors", lambda: v.prepare([img], [P], return_tensors="np")),
 ("prepare-unknown-kw", lambda: v.prepare([img], [P], bogus_kw=1)),
 ("prepare-text-kw", lambda: v.prepare([img], [P], text=["x"])),
 ("prepare-no-prompts", lambda: v.prepare([img], [])),
 ("prepare-empty", lambda: v.prepare([], [])),
 ("prepare-two-ph-one-img", lambda: v.prepare([img], [P.replace("<image>", "<image> <image>")])),
 ("prepare-two-img-one-ph", lambda: v.prepare([[img, img]], [P])),
 ("prepare-nan-array", lambda: v.prepare(np.full((8, 8, 3), np.nan), P)),
 ("prepare-bool-tensor", lambda: v.prepare(torch.ones(40, 40, dtype=torch.bool), P)),
 ("prepare-int32-300", lambda: v.prepare(np.full((40, 40, 3), 300, np.int32), P)),
 ("prepare-str-image", lambda: v.prepare("cat.png", P)),
 ("prepare-path-image", lambda: v.prepare(Path("cat.png"), P)),
 ("prepare-bytes-image", lambda: v.prepare(b"\x89PNG", P)),
 ("prepare-bytes-prompt", lambda: v.prepare(img, P.encode())),
 ("prepare-none-prompt", lambda: v.prepare(img, None)),
 ("prepare-int-prompt", lambda: v.prepare(img, 5)),
 ("prepare-tuple-prompts", lambda: v.prepare((img,), (P,))),
 ("prepare-4ch-array-float", lambda: v.prepare(np.random.rand(40, 40, 4), P)),
 ("prepare-complex-array", lambda: v.prepare(np.zeros((40, 40, 3), complex), P)),
 ("prepare-2ch-array", lambda: v.prepare(np.zeros((40, 40, 2), np.uint8), P)),
 ("prepare-generator-images", lambda: v.prepare((x for x in [img]), [P])),
 ("embed-k-float", lambda: EmbedLens(k=2.5)),
 ("embed-k-bool", lambda: EmbedLens(k=True)),
 ("embed-k-str", lambda: EmbedLens(k="5")),
 ("embed-sites-str", lambda: prun(EmbedLens(k=2, sites="blocks.1.hook_resid_post"))),
 ("embed-sites-bogus", lambda: prun(EmbedLens(k=2, sites=["blocks.x"]))),
 ("embed-positions-bogus", lambda: EmbedLens(positions="bogus")),
 ("embed-positions-all", lambda: prun(EmbedLens(k=2, positions="all"))),
 ("embed-chunk-zero", lambda: EmbedLens(chunk=0)),
 ("embed-chunk-float", lambda: EmbedLens(chunk=2.5)),
 ("embed-candidates-lt-k", lambda: prun(EmbedLens(k=3, candidates=1))),
 ("logit-logprobs-str", lambda: LogitLens(logprobs="yes")),
 ("act-str", lambda: Activations("hook_embed")),
 ("act-dup", lambda: prun(Activations(["hook_embed", "hook_embed"]))),
 ("act-vision-oob", lambda: prun(Activations(["vision.blocks.99.hook_resid_post"]))),
 ("act-neg", lambda: prun(Activations(["blocks.-1.hook_resid_post"]))),
 ("act-case", lambda: prun(Activations(["Blocks.1.hook_resid_post"]))),
 ("act-hf-name", lambda: prun(Activations(["model.language_model.layers.1"]))),
 ("norms-groups-bogus", lambda: prun(NormTracker(groups="bogus"))),
 ("norms-vision-str", lambda: NormTracker(vision="no")),
 ("sinks-dims-oob", lambda: prun(SinkChannels(dims=[999999]))),
 ("sinks-dims-preset", lambda: prun(SinkChannels(dims="llama7b"))),
 ("sinks-threshold-nan", lambda: SinkChannels(threshold=float("nan"))),
 ("sinks-threshold-str", lambda: SinkChannels(threshold="20")),
 ("sinks-top-zero", lambda: SinkChannels(top=0)),
 ("sinks-ref-site-bogus", lambda: prun(SinkChannels(dims=[0], reference_site="bogus"))),
 ("vit-layer-oob", lambda: prun(ViTSinks(layer=99))),
 ("vit-threshold-neg", lambda: ViTSinks(threshold=-3)),
 ("vit-layer-float", lambda: ViTSinks(layer=1.5)),
 ("label-empty", lambda: prun(LabelMatching([]))),
 ("label-str", lambda: prun(LabelMatching("cat"))),
 ("label-flat-list", lambda: prun(LabelMatching(["red"]))),
 ("label-rule", lambda: LabelMatching([["red"]], rule="bogus")),
 ("label-lenses", lambda: LabelMatching([["red"]], lenses=("Foo",))),
 ("zero-layers-empty", lambda: ivrun(ZeroSublayer(layers=[]))),
 ("zero-layers-float", lambda: ivrun(ZeroSublayer(layers=1.5))),
 ("zero-layers-str", lambda: ivrun(ZeroSublayer(layers="all"))),
 ("zero-layers-neg", lambda: ivrun(ZeroSublayer(layers=-1))),
 ("zero-layers-dup", lambda: ivrun(ZeroSublayer(layers=[0, 0]))),
 ("zero-every-str", lambda: ZeroSublayer(every_step="yes")),
 ("rescale-nan", lambda: Rescale(factor=float("nan"))),
 ("rescale-inf", lambda: Rescale(factor=float("inf"))),
 ("rescale-bool", lambda: Rescale(factor=True)),
 ("rescale-tensor", lambda: ivrun(Rescale(factor=torch.tensor(2.0)))),
 ("rescale-site-oob", lambda: ivrun(Rescale(site="blocks.99.hook_resid_post"))),
 ("rescale-site-bogus", lambda: Rescale(site="bogus")),
 ("rescale-every-int", lambda: Rescale(every_step=1)),
 ("prune-str-tokens", lambda: Prune("some")),
 ("prune-empty-list", lambda: ivrun(Prune([]))),
 ("entry-neg", lambda: ivrun(VisualEntry(-1))),
 ("entry-oob", lambda: ivrun(VisualEntry(99))),
 ("entry-float", lambda: VisualEntry(1.5)),
 ("entry-str", lambda: VisualEntry("1")),
 ("entry-textpos", lambda: VisualEntry(1, text_positions="bogus")),
 ("exit-zero", lambda: ivrun(VisualExit(0))),
 ("knock-layers-oob", lambda: ivrun(AttentionKnockout("vv", 99))),
 ("knock-tokens-float", lambda: AttentionKnockout("vv", 0, tokens=3.5)),
 ("matched-seed-str", lambda: MatchedRandom(Positions([0]), seed="x")),
 ("matched-seed-float", lambda: MatchedRandom(Positions([0]), seed=1.5)),
 ("matched-all", lambda: ivrun(Prune(MatchedRandom(AllVisual())))),
 ("complement-all", lambda: ivrun(Prune(Complement("all")))),
 ("kinds-none", lambda: Kinds()),
 ("kinds-typo", lambda: Kinds("patches")),
 ("group-empty", lambda: ivrun(Prune(Group([])))),
 ("two-prunes", lambda: ivrun(Prune(Positions([0])), Prune(Positions([1])))),
 ("run-pk-str", lambda: run1(processor_kwargs="x")),
 ("run-single", lambda: mv.run(v, img, P, probes=NormTracker())),
 ("run-positional", lambda: mv.run(v, [img], [P], NormTracker())),
 ("run-remote-upper", lambda: run1(remote="LOCAL")),
 ("run-probe-typo", lambda: mv.run(v, [img], [P], probe=NT())),
 ("run-remote-none", lambda: run1(remote=None)),
 ("run-remote-false-str", lambda: run1(remote="false")),
 ("gen-max0", lambda: mv.generate(v, [img], [P], max_new_tokens=0)),
 ("gen-max-float", lambda: mv.generate(v, [img], [P], max_new_tokens=2.5)),
 ("gen-kw-typo", lambda: mv.generate(v, [img], [P], max_new_tokens=1, do_smaple=True)),
 ("gen-beams0", lambda: mv.generate(v, [img], [P], max_new_tokens=1, num_beams=0)),
 ("gen-probes-str", lambda: mv.generate(v, [img], [P], max_new_tokens=1, probes="norms")),
 ("rd-limit-neg", lambda: rd("x", limit=-1)),
 ("rd-limit-zero", lambda: rd("x", limit=0)),
 ("rd-limit-str", lambda: rd("x", limit="5")),
 ("rd-limit-float", lambda: rd("x", limit=1.5)),
 ("rd-k-zero", lambda: rd("x", probes=["embed_lens"], k=0)),
 ("rd-k-str", lambda: rd("x", probes=["embed_lens"], k="5")),
 ("rd-question-int", lambda: rd("x", question=5)),
 ("rd-on-error", lambda: rd("x", on_error="ignore")),
 ("rd-shard-str", lambda: rd("x", shard="0/2")),
 ("rd-overwrite-str", lambda: rd("x", overwrite="yes")),
 ("rd-progress-str", lambda: rd("x", progress="no")),
 ("rd-images-dir-missing", lambda: rd("x", source=str(path), images_dir=root / "missing")),
 ("rd-csv", lambda: rd("x", source=root / "x.csv")),
 ("rd-list-images", lambda: rd("x", source=[img, img])),
 ("rd-probes-str", lambda: rd("x", probes="norms")),
 ("rd-min-side", lambda: rd("x", min_side=10)),
 ("rd-remote-ndif", lambda: rd("x", remote="ndif")),
 ("rd-empty-source", lambda: rd("x", source=D.InMemory([]))),
 ("rd-batch-bool", lambda: rd("x", batch_size=True)),
 ("ev-layer-oob-upfront", lambda: ev({"b": [ZeroSublayer(layers=7)]})),
 ("ev-site-bogus-upfront", lambda: ev({"b": [Rescale(site="blocks.1.hook_bogus")]})),
 ("rd-layer-oob-upfront", lambda: rd("x", interventions=[ZeroSublayer(layers=[0, 9])])),
 ("rd-probe-site-upfront", lambda: rd("x", probes=[Activations(["blocks.5.hook_resid_post"])])),
 ("ev-paper-conditions-layers", lambda: ev(__import__("mech_vtokens.evaluate", fromlist=["x"]).paper_conditions(
     v, layers=[0, 3]))),
 ("ev-paper-conditions-seed", lambda: __import__("mech_vtokens.evaluate", fromlist=["x"]).paper_conditions(
     v, dead=Positions.each_image([0]), seed=0.5)),
 ("ev-max0", lambda: ev(max_new_tokens=0)),
 ("ev-seed-str", lambda: ev(seed="x")),
 ("ev-seed-float", lambda: ev(seed=1.5)),
 ("ev-limit-neg", lambda: ev(limit=-1)),
 ("ev-batch-bool", lambda: ev(batch_size=True)),
 ("ev-empty-conds", lambda: ev({})),
 ("ev-out-file", lambda: ev(out=_file(root / "f.txt"))),
 ("ev-cond-str", lambda: ev({"b": "Prune"})),
 ("ev-on-error", lambda: ev(on_error="ignore")),
 ("ev-shard-bad", lambda: ev(shard=(0, 0))),
 ("harness-max0", lambda: HarnessModel(v, max_new_tokens=0)),
 ("harness-batch0", lambda: HarnessModel(v, batch_size=0)),
 ("batches-bs0", lambda: list(batches(v, [img], None, batch_size=0))),
 ("store-missing", lambda: Store(root / "missing")),
 ("coco-missing", lambda: D.CocoInstances(root / "missing.json")),
 ("vqa-dir", lambda: D.VqaJsonl(root)),
 ("inmem-mismatch", lambda: D.InMemory([img], questions=["a", "b"])),
 ("folder-file", lambda: D.ImageFolder(path + "/config.json")),
 ("open-source-txt", lambda: D.open_source(root / "x.txt")),
 ("load-image-int", lambda: D.load_image(123)),
 ("load-image-none", lambda: D.load_image(None)),
 ("cli-k0", lambda: analyze("--images", _imgdir(), "--k", "0")),
 ("cli-bs0", lambda: analyze("--images", _imgdir(), "--batch-size", "0")),
 ("cli-images-missing", lambda: analyze("--images", str(root / "nope"))),
 ("cli-dtype-bogus", lambda: analyze("--images", _imgdir(), "--dtype", "bogus")),
 ("cli-probes-empty", lambda: analyze("--images", _imgdir(), "--probes", "")),
 ("cli-remote-bogus", lambda: analyze("--images", _imgdir(), "--remote", "x")),
 ("cli-device-map", lambda: analyze("--images", _imgdir(), "--device-map", "cuda:7")),
 ("cli-demo-images0", lambda: cli(["demo", "--n-images", "0", "--out", str(root / "demo")])),
 ("cli-demo-k0", lambda: cli(["demo", "--k", "0", "--out", str(root / "demo2")])),

]

REFUSED = {name: fix for name, fix in [
    ("load-dtype-torch-int8", 'needs a quantization_config'),
    ("load-dtype-int", 'is not a dtype a model can be loaded in'),
    ("load-device-map-int", "this machine has 0 cuda device(s); use one of 'cpu'"),
    ("load-attn-flash", "install it or use 'sdpa' (or 'eager' for attenti"),
    ("load-attn-empty", "use one of 'eager', 'flash_attention_4', 'flash_"),
    ("load-none", 'load() takes a hub id, a local directory or a *F'),
    ("load-processor-str", 'give a loaded processor (transformers.AutoProces'),
    ("load-kwarg-typo", "did you mean 'dtype'?"),
    ("load-empty-str", "cannot load a config from '': give a hub id that"),
    ("prompt-not-str", 'pass the question text'),
    ("prompt-n-neg", 'give the number of images (0 or more) the prompt'),
    ("prompt-n-bool", 'give the number of images (0 or more) the prompt'),
    ("prompt-n-float", 'give the number of images (0 or more) the prompt'),
    ("prompt-system-int", 'give the system text as a string (or None for no'),
    ("prepare-none-images", 'pass an image for each of its 1 placeholder(s),'),
    ("prepare-padding-side-bogus", "fix the option (see the processor's documentatio"),
    ("prepare-return-tensors", 'processor option return_tensors= is set by prepa'),
    ("prepare-unknown-kw", 'is not one LlavaProcessor takes (it would be ignored)'),
    ("prepare-text-kw", "pass it as prepare's prompts argument"),
    ("prepare-no-prompts", 'give at least one prompt (vlm.prompt(question) b'),
    ("prepare-empty", 'give at least one prompt (vlm.prompt(question) b'),
    ("prepare-two-ph-one-img", 'use exactly one placeholder per image'),
    ("prepare-two-img-one-ph", 'use exactly one placeholder per image'),
    ("prepare-nan-array", 'give finite pixel values (floats in [0, 1])'),
    ("prepare-int32-300", 'integer images other than uint16 must lie in 0..'),
    ("prepare-str-image", 'open files with PIL.Image.open(path) (or mech_vt'),
    ("prepare-path-image", 'open files with PIL.Image.open(path) (or mech_vt'),
    ("prepare-bytes-image", 'open files with PIL.Image.open(path) (or mech_vt'),
    ("prepare-bytes-prompt", 'give a prompt string or a list of them (vlm.prom'),
    ("prepare-none-prompt", 'give a prompt string or a list of them (vlm.prom'),
    ("prepare-int-prompt", 'give a prompt string or a list of them (vlm.prom'),
    ("prepare-complex-array", 'give uint8, uint16, bool or floats in [0, 1]'),
    ("prepare-2ch-array", 'numpy images are HxWxC (C = 1, 3 or 4)'),
    ("embed-k-float", 'give a positive integer number of tokens (e.g. k'),
    ("embed-k-bool", 'give a positive integer number of tokens (e.g. k'),
    ("embed-k-str", 'give a positive integer number of tokens (e.g. k'),
    ("embed-sites-bogus", "unknown site 'blocks.x'"),
    ("embed-positions-bogus", "use 'visual', 'text', 'all' or a list of sequenc"),
    ("embed-chunk-zero", 'give a positive vocabulary chunk (e.g. 8192)'),
    ("embed-chunk-float", 'give a positive vocabulary chunk (e.g. 8192)'),
    ("embed-candidates-lt-k", 'candidates must be at least k (or None)'),
    ("logit-logprobs-str", 'pass True (log-probabilities) or False (logits)'),
    ("act-vision-oob", 'this llava model has 2 vision layers (use 0..1,'),
    ("act-case", "unknown site 'Blocks.1.hook_resid_post'"),
    ("act-hf-name", 'Valid sites:'),
    ("norms-groups-bogus", 'give one label per visual token'),
    ("norms-vision-str", 'give True or False'),
    ("sinks-dims-oob", "pass this model's channels or dims='auto'"),
    ("sinks-dims-preset", "give 'auto', a preset (llava-hf/llava-1.5-7b-hf,"),
    ("sinks-threshold-nan", 'the paper uses 20)'),
    ("sinks-threshold-str", 'the paper uses 20)'),
    ("sinks-top-zero", 'top=0: give a positive number of BOS-similar tok'),
    ("sinks-ref-site-bogus", "unknown site 'bogus'"),
    ("vit-layer-oob", 'this llava model has 2 vision layers (use 0..1,'),
    ("vit-threshold-neg", 'give a positive L2 norm (the paper uses 75)'),
    ("vit-layer-float", 'give a vision layer index (negative counts from'),
    ("label-empty", 'give one list of label strings per image (1 imag'),
    ("label-str", 'give one list of label strings per image (1 imag'),
    ("label-rule", "choose one of ('whole_word', 'first', 'all')"),
    ("label-lenses", "choose from ('EmbedLens', 'LogitLens')"),
    ("zero-layers-empty", 'give at least one layer'),
    ("zero-layers-float", 'layers must be ints, got 1.5'),
    ("zero-layers-str", "layers must be ints, got 'all'"),
    ("zero-every-str", 'give True or False'),
    ("rescale-nan", 'factor must be finite, got nan'),
    ("rescale-inf", 'factor must be finite, got inf'),
    ("rescale-bool", 'give the number the tokens are multiplied by (e.'),
    ("rescale-site-oob", 'this llava model has 3 decoder layers (use 0..2,'),
    ("rescale-every-int", 'give True or False'),
    ("prune-str-tokens", "pass 'all', a TokenSet, a bool mask over visual"),
    ("prune-empty-list", 'the token set Positions(positions=[]) selects no'),
    ("entry-oob", 'this llava model has 3 decoder layers (use 0..2,'),
    ("entry-textpos", "text_positions must be 'repacked' (the text as i"),
    ("exit-zero", 'use 1..n_layers-1'),
    ("knock-layers-oob", 'this llava model has 3 decoder layers (use 0..2,'),
    ("knock-tokens-float", "pass 'all', a TokenSet, a bool mask over visual"),
    ("matched-seed-str", 'give an int (the seed of the draw, e.g. seed=0)'),
    ("matched-seed-float", 'give an int (the seed of the draw, e.g. seed=0)'),
    ("matched-all", 'match a smaller set'),
    ("complement-all", 'the token set Complement(of=AllVisual()) selects'),
    ("kinds-none", "name one or more token kinds of ('patch', 'thumb"),
    ("kinds-typo", "name one or more token kinds of ('patch', 'thumb"),
    ("group-empty", 'give a boolean mask over the 36 visual tokens or'),
    ("two-prunes", 'combine their token sets into one intervention'),
    ("run-pk-str", "run: processor_kwargs='x'; give a dict of proces"),
    ("run-positional", 'probes=[...], interventions=[...], ...)'),
    ("run-remote-upper", 'use remote=False (here), remote=True (NDIF) or r'),
    ("run-probe-typo", 'did you mean probes=? (processor options go in p'),
    ("run-remote-false-str", 'use remote=False (here), remote=True (NDIF) or r'),
    ("gen-beams0", "num_beams=0: give an int >= 1"),
    ("gen-max0", 'max_new_tokens must be a positive int, got 0'),
    ("gen-max-float", 'max_new_tokens must be a positive int, got 2.5'),
    ("gen-kw-typo", 'its keywords are vlm, images, prompts, probes, i'),
    ("gen-probes-str", 'give a list of components (or one), e.g. probes='),
    ("rd-limit-neg", 'give an int >= 1 (the number of records to run,'),
    ("rd-limit-zero", 'give an int >= 1 (the number of records to run,'),
    ("rd-limit-str", 'give an int >= 1 (the number of records to run,'),
    ("rd-limit-float", 'give an int >= 1 (the number of records to run,'),
    ("rd-k-zero", "give an int >= 1 (the top-k of the suite's lense"),
    ("rd-k-str", "give an int >= 1 (the top-k of the suite's lense"),
    ("rd-question-int", 'give the prompt text as a string (or None for th'),
    ("rd-on-error", "choose 'skip' (record a failing batch and go on)"),
    ("rd-shard-str", 'records i, i+n, i+2n, ...), e.g. shard=(int(os.e'),
    ("rd-overwrite-str", 'give True or False'),
    ("rd-progress-str", 'give True or False'),
    ("rd-images-dir-missing", 'no image files in'),
    ("rd-csv", 'pass a folder of images, a COCO instances .json'),
    ("rd-list-images", 'pass a folder, a COCO instances .json, a VQA .js'),
    ("rd-min-side", 'its keywords are vlm, source, probes, interventi'),
    ("rd-remote-ndif", 'use remote=False (here), remote=True (NDIF) or r'),
    ("rd-empty-source", 'pass a list of images (PIL, numpy arrays or tens'),
    ("rd-batch-bool", 'give a positive int (images per forward)'),
    ("ev-layer-oob-upfront", "layer 7 is out of range"),
    ("ev-site-bogus-upfront", "no hook 'hook_bogus' per block; valid hooks: hook_resid_pre"),
    ("rd-layer-oob-upfront", "layer 9 is out of range"),
    ("rd-probe-site-upfront", "layer 5 is out of range"),
    ("ev-paper-conditions-layers", "layer 3 is out of range"),
    ("ev-paper-conditions-seed", "seed=0.5: give an int"),
    ("ev-max0", 'give a positive int'),
    ("ev-seed-str", "evaluate: seed='x': give an int"),
    ("ev-seed-float", 'evaluate: seed=1.5: give an int'),
    ("ev-limit-neg", 'give an int >= 1 (the number of records to run,'),
    ("ev-batch-bool", 'give a positive int'),
    ("ev-empty-conds", 'give a dict {name: [interventions]}'),
    ("ev-out-file", 'give a directory path (created if missing) or mo'),
    ("ev-cond-str", 'pass interventions such as Prune(...), ZeroSubla'),
    ("ev-on-error", "choose 'skip' (record the failing batch and go o"),
    ("ev-shard-bad", 'records i, i+n, i+2n, ...), e.g. shard=(int(os.e'),
    ("harness-max0", 'give a positive int'),
    ("harness-batch0", 'give a positive int'),
    ("batches-bs0", 'give a positive int (images per forward)'),
    ("store-missing", 'run mech_vtokens.runner.run_dataset('),
    ("coco-missing", 'pass the instances_*.json file'),
    ("vqa-dir", 'pass a .jsonl file with one JSON object per line'),
    ("inmem-mismatch", 'pass one per image'),
    ("folder-file", 'give a folder of image files (.png, .jpg, .jpeg,'),
    ("open-source-txt", 'pass a folder of images, a COCO instances .json'),
]}


def _file(p):
    p.write_text("x")
    return p


def _same_inputs(a, b):
    assert a.inputs.keys() == b.inputs.keys()
    for k in a.inputs:
        assert torch.equal(a.inputs[k], b.inputs[k]), k


def _same_results(a, b):
    for (ka, ra), (kb, rb) in zip(a.items(), b.items()):
        assert ka == kb
        fa, fb = ra.to_pandas(), rb.to_pandas()
        num = fa.select_dtypes("number").columns
        assert list(fa.columns) == list(fb.columns) and len(fa) == len(fb)
        np.testing.assert_allclose(fa[num].to_numpy(float), fb[num].to_numpy(float), rtol=1e-5, atol=1e-6)


def _blocks_value(res, site):
    return res["activations"][site]


def _composite(a):  # RGBA floats in [0, 1] on white, by the documented rule: floats -> 8 bit, then alpha / 255
    a8 = np.rint(a * 255.0)
    rgb, alpha = a8[..., :3], a8[..., 3:] / 255.0
    return Image.fromarray(np.rint(rgb * alpha + 255.0 * (1 - alpha)).astype(np.uint8), "RGB")


RGBA = np.random.default_rng(0).random((40, 40, 4))

# name -> check(result): the right result, against the canonical call or a value by hand
WORKS = {
    "load-dtype-float": lambda r: r.hf.dtype == torch.float32,
    "load-dtype-auto": lambda r: r.hf.dtype == v.hf.dtype,
    "load-device-map-dict": lambda r: {p.device.type for p in r.hf.parameters()} == {"cpu"},
    "load-path-obj": lambda r: r.source == str(path) and r.family == "llava",
    "prepare-single": lambda r: _same_inputs(r, v.prepare([img], [P])) is None,
    "prepare-list-img-str-prompt": lambda r: _same_inputs(r, v.prepare([img], [P])) is None,
    "prepare-bool-tensor": lambda r: _same_inputs(r, v.prepare([Image.new("L", (40, 40), 255).convert("RGB")],
                                                               [P])) is None,
    "prepare-tuple-prompts": lambda r: _same_inputs(r, v.prepare([img], [P])) is None,
    "prepare-4ch-array-float": lambda r: True,  # checked exactly in test_sweep_works_values (random input)
    "prepare-generator-images": lambda r: _same_inputs(r, v.prepare([img], [P])) is None,
    "embed-sites-str": lambda r: _same_results(r, prun(EmbedLens(k=2, sites=["blocks.1.hook_resid_post"]))) is None,
    "embed-positions-all": lambda r: len(r["embed_lens"].to_pandas()) > len(prun(EmbedLens(k=2))["embed_lens"]
                                                                                .to_pandas()),
    "act-str": lambda r: r.site_names == ["hook_embed"],
    "act-dup": lambda r: torch.equal(r["activations"]["hook_embed"],
                                     prun(Activations(["hook_embed"]))["activations"]["hook_embed"]),
    "act-neg": lambda r: torch.equal(r["activations"]["blocks.2.hook_resid_post"],
                                     prun(Activations(["blocks.2.hook_resid_post"]))["activations"]
                                     ["blocks.2.hook_resid_post"]),
    "label-flat-list": lambda r: _same_results(r, prun(LabelMatching([["red"]]))) is None,
    "zero-layers-neg": lambda r: _same_results(r, ivrun(ZeroSublayer(layers=2))) is None,
    "zero-layers-dup": lambda r: _same_results(r, ivrun(ZeroSublayer(layers=[0]))) is None,
    "rescale-tensor": lambda r: _same_results(r, ivrun(Rescale(factor=2.0))) is None,
    "rescale-site-bogus": lambda r: isinstance(r, Rescale),  # refused at the run (rescale-site-oob, below)
    "entry-neg": lambda r: _same_results(r, ivrun(VisualEntry(2))) is None,
    "entry-float": lambda r: isinstance(r, VisualEntry),  # refused at the run: test_sweep_late_refusals
    "entry-str": lambda r: isinstance(r, VisualEntry),
    "run-single": lambda r: _same_results(r, run1()) is None,
    "run-remote-none": lambda r: _same_results(r, run1()) is None,
    "rd-probes-str": lambda r: len(r.frame("norms")) == len(rd("x", probes=["norms"]).frame("norms")),
    "load-image-int": lambda r: r[0] is None and "is no image source" in r[1],
    "load-image-none": lambda r: r[0] is None and "is no image source" in r[1],
}
# CLI flags: what stderr says (exit code 2, before any model loads)
CLI = {"cli-k0": "--k: 0 is not positive", "cli-bs0": "--batch-size: 0 is not positive",
       "cli-images-missing": "not a directory", "cli-dtype-bogus": "is not a dtype a model can be loaded in",
       "cli-device-map": "this machine has 0 cuda device(s)", "cli-remote-bogus": "invalid choice",
       "cli-demo-images0": "--n-images: 0 is not positive", "cli-demo-k0": "--k: 0 is not positive",
       "cli-probes-empty": "no probe name"}
# counts are argparse types now (cli._positive_int): refused before any model loads, no longer after it
RAW_LEFT = set()  # raw tracebacks left: none


@pytest.fixture(scope="module")
def env(tiny_vlm, tiny_dir, tmp_path_factory):
    global v, path, root
    v, path, root = tiny_vlm("llava"), tiny_dir("llava"), tmp_path_factory.mktemp("sweep")
    h = v.hf.get_input_embeddings().register_forward_hook(lambda *a: CALLS.append(1))
    yield v
    h.remove()


def test_sweep_is_wide_and_every_entry_has_its_outcome():
    names = [n for n, _ in E]
    assert len(names) >= 150 and len(set(names)) == len(names)
    assert set(names) == set(REFUSED) | set(WORKS) | set(CLI) | RAW_LEFT
    assert not set(REFUSED) & set(WORKS)
    areas = {n.split("-")[0] for n in names}
    assert {"load", "prompt", "prepare", "embed", "act", "sinks", "zero", "rescale", "entry", "matched", "run",
            "gen", "rd", "ev", "harness", "cli"} <= areas


@pytest.mark.parametrize("name,call", [e for e in E if e[0] in REFUSED], ids=[e[0] for e in E if e[0] in REFUSED])
def test_sweep_refused_before_any_forward(name, call, env, capsys):
    CALLS.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(InputError) as err:
            call()
    assert REFUSED[name] in str(err.value), str(err.value)
    assert not CALLS, f"{name}: refused only after a forward"


@pytest.mark.parametrize("name,call", [e for e in E if e[0] in WORKS], ids=[e[0] for e in E if e[0] in WORKS])
def test_sweep_works_exactly(name, call, env):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = call()
        assert WORKS[name](got) is not False, name


def test_sweep_works_values(env):
    """The entries whose right value is computed by hand: an RGBA float array composited on white."""
    _same_inputs(v.prepare(RGBA, P), v.prepare(_composite(RGBA), P))


def test_sweep_late_refusals(env):
    """Constructor arguments refused when the run resolves them (before its forward)."""
    for iv, says in ((VisualEntry(1.5), "layer must be one int"), (VisualEntry("1"), "layer must be one int"),
                     (Rescale(site="bogus"), "unknown site 'bogus'")):
        CALLS.clear()
        with pytest.raises(InputError, match=says):
            ivrun(iv)
        assert not CALLS


@pytest.mark.parametrize("name", sorted(CLI))
def test_sweep_cli_flags(name, env, capsys):
    call = dict(E)[name]
    try:
        code = call()
    except SystemExit as err:  # argparse's own refusal of a choice
        code = err.code
    err = capsys.readouterr().err
    assert code == 2, name
    assert CLI[name] in err
