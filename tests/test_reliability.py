"""Reliability sweep: a catalogue of bad inputs across the public API (each an InputError whose message names the
fix), no residue after every intervention and after exceptions inside a trace, 1000 traces without memory growth or
reference cycles of ours, sockets blocked, identical results twice with seeded controls."""

import gc
import json
import os
import socket

import nnsight
import pandas as pd
import pytest
import torch

import mech_vtokens as mv
from mech_vtokens.interventions import (AllVisual, AttentionKnockout, Complement, Group, MatchedRandom, Positions,
                                        Prune, Rescale, VisualEntry, VisualExit, ZeroSublayer, applied)
from mech_vtokens.token_sets import as_token_set
from mech_vtokens import data as D
from mech_vtokens import testing as T
from mech_vtokens.component import Probe
from mech_vtokens.errors import InputError
from mech_vtokens.evaluate import HarnessModel, evaluate
from mech_vtokens.runner import Store, run_dataset
from mech_vtokens.probes import EmbedLens, LabelMatching, LogitLens, NormTracker, SinkChannels
from mech_vtokens.probes.activations import Activations

P = T.prompt("llava")


def _img():
    return T.image(60)


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, vocab_size=50))


def _locked(vlm, out):
    """Another live process holds the writer lock of the (only) shard."""
    import subprocess
    import sys

    out.mkdir(parents=True, exist_ok=True)
    hold = ("import sys; from filelock import FileLock; lock = FileLock(sys.argv[1]); lock.acquire(); "
            "print('held', flush=True); sys.stdin.read()")
    proc = subprocess.Popen([sys.executable, "-c", hold, str(out / ".writer-0-of-1.lock")], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        return run_dataset(vlm, D.InMemory([_img()]), probes=["norms"], out=out, progress=False)
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)


def _other_settings(vlm, out):
    run_dataset(vlm, D.InMemory([_img()]), probes=["norms"], out=out, progress=False)
    return run_dataset(vlm, D.InMemory([_img()]), probes=["norms"], out=out, progress=False, k=3)


def _bad_manifest(vlm, out):
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").write_text("{truncated")
    return run_dataset(vlm, D.InMemory([_img()]), probes=["norms"], out=out, progress=False)


def _folder_without_images(tmp):
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "readme.txt").write_text("x")
    return D.ImageFolder(tmp)


def _vqa_file(tmp, lines):
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "q.jsonl").write_text("\n".join(lines))
    return tmp / "q.jsonl"


def _cli(argv):
    from mech_vtokens.cli import main

    assert main(argv) == 2  # the CLI turns the InputError into a message and exit code 2
    raise InputError("cli")


# (id, callable(vlm, tmp_path), regex that must match the message: the problem AND the fix)
CATALOGUE = [
    # load
    ("load-not-a-model", lambda v, t: mv.load(12345), r"takes a hub id, a local directory or a \*ForConditional"),
    ("load-missing-dir", lambda v, t: mv.load(str(t / "nope")), r"cannot load a config.*give a hub id that is "
                                                                  r"reachable or a local directory"),
    ("load-module-without-processor", lambda v, t: mv.load(T.build("llava")[0]),
     r"needs its processor: mech_vtokens.load\(model, processor\)"),
    ("load-unsupported-family", lambda v, t: mv.load(_llama(), processor=object()), r"unsupported model type "
                                                                                     r"'llama'.*To add one"),
    # prepare / run
    ("prompt-without-placeholder", lambda v, t: v.prepare([_img()], ["what is it ?"]),
     r"put the image placeholder '<image>' in the prompt"),
    ("images-prompts-mismatch", lambda v, t: v.prepare([_img(), _img()], [P]), r"pass one image .* per prompt"),
    ("image-not-pil", lambda v, t: v.prepare([[torch.zeros(3, 8, 8)]], [P]), r"open files with PIL.Image.open"),
    ("placeholder-without-image", lambda v, t: v.prepare([[]], [P]), r"pass an image for each"),
    ("nothing-to-run", lambda v, t: mv.run(v, [_img()], [P]), r"nothing to run: pass probes=\[...\]"),
    ("intervention-as-probe", lambda v, t: mv.run(v, [_img()], [P], probes=[Prune()]),
     r"not a Probe; pass interventions with interventions=\[...\]"),
    ("remote-true-local-dir", lambda v, t: mv.run(v, [_img()], [P], probes=[NormTracker()], remote=True),
     r"load it with mech_vtokens.load\('<org>/<name>'\) or use remote='local'"),
    # probes
    ("activations-no-site", lambda v, t: Activations([]), r"at least one site name \(see vlm.sites\)"),
    ("site-out-of-range", lambda v, t: mv.run(v, [_img()], [P], probes=[Activations(["blocks.9.hook_resid_post"])]),
     r"layer 9 is out of range"),
    ("lens-k-zero", lambda v, t: EmbedLens(k=0), r"give a positive integer number of tokens \(e.g. k=5\)"),
    ("lens-k-over-vocab", lambda v, t: mv.run(v, [_img()], [P], probes=[LogitLens(k=10 ** 6)]), r"use k <="),
    ("norms-nothing", lambda v, t: NormTracker(vision=False, lm=False), r"enable at least one tower"),
    ("sinks-threshold", lambda v, t: SinkChannels(threshold=-1), r"give a positive ratio \(the paper uses 20\)"),
    ("label-not-one-token", lambda v, t: mv.run(v, [_img()], [P], probes=[LabelMatching([["zebra crossing"]])]),
     r"use rule='first' or rule='all'"),
    ("labels-per-image", lambda v, t: mv.run(v, [_img()], [P], probes=[LabelMatching([["red"], ["blue"]])]),
     r"give one list of label strings per image"),
    # interventions
    ("zero-sublayer-name", lambda v, t: ZeroSublayer(sublayer="ffn"), r"must be 'attn', 'mlp' or 'both'"),
    ("zero-layer-out-of-range", lambda v, t: mv.run(v, [_img()], [P], probes=[NormTracker()],
                                                    interventions=[ZeroSublayer(layers=7)]), r"use 0..2"),
    ("prune-positions", lambda v, t: Prune(positions="packed"), r"'original' .* or 'repacked'"),
    ("rescale-not-a-number", lambda v, t: Rescale(factor="big"), r"factor must be a number"),
    ("token-set-type", lambda v, t: as_token_set(3.5), r"pass 'all', a TokenSet, a bool mask"),
    ("position-outside-visual-span", lambda v, t: mv.run(v, [_img()], [P], probes=[NormTracker()],
                                                         interventions=[ZeroSublayer(Positions([999]))]),
     r"outside the visual span 0..35"),
    ("group-mask-shape", lambda v, t: mv.run(v, [_img()], [P], probes=[NormTracker()],
                                             interventions=[Prune(Group(torch.ones(3, dtype=torch.bool)))]),
     r"one entry per visual token \(36\)"),
    ("prune-and-zero-same-tokens", lambda v, t: mv.run(v, [_img()], [P], probes=[NormTracker()],
                                                       interventions=[Prune(Positions([0])),
                                                                      ZeroSublayer(Positions([0]))]),
     r"make the token sets disjoint \(e.g. Complement"),
    ("empty-token-set", lambda v, t: mv.run(v, [_img()], [P], probes=[NormTracker()],
                                            interventions=[Prune(Complement(AllVisual()))]),
     r"selects no token in this batch"),
    ("knockout-kind", lambda v, t: AttentionKnockout(kind="tt"), r"'vv' \(visual->visual\) or 'vt'"),
    # views
    ("overlay-image-index", lambda v, t: __import__("mech_vtokens.views", fromlist=["PatchOverlay"]).PatchOverlay(
        v.prepare([_img()], [P]), 3), r"out of range: the batch has 1 image"),
    ("overlay-values-count", lambda v, t: __import__("mech_vtokens.views", fromlist=["PatchOverlay"]).PatchOverlay(
        v.prepare([_img()], [P]), 0, values=[1.0, 2.0]), r"pass one per token"),
    # data sources
    ("folder-missing", lambda v, t: D.ImageFolder(t / "missing"), r"not a directory; give a folder of image files"),
    ("folder-without-images", lambda v, t: _folder_without_images(t / "f"), r"no image files in .*looked for"),
    ("duplicate-ids", lambda v, t: D.InMemory([_img(), _img()], ids=["a", "a"]), r"give each item its own id"),
    ("coco-not-json", lambda v, t: D.CocoInstances(_vqa_file(t, ["{x"]).rename(t / "i.json")),
     r"not valid JSON .*pass a COCO instances file"),
    ("vqa-no-usable-line", lambda v, t: D.VqaJsonl(_vqa_file(t, ['{"image": "a.png"}'])),
     r"each needs 'image' and 'question'"),
    ("source-type", lambda v, t: D.open_source(42), r"pass a folder, a COCO instances .json, a VQA .jsonl"),
    # runner
    ("runner-batch-size", lambda v, t: run_dataset(v, D.InMemory([_img()]), probes=["norms"], out=t,
                                                   batch_size=0), r"give a positive int \(images per forward\)"),
    ("runner-no-probes", lambda v, t: run_dataset(v, D.InMemory([_img()]), out=t), r"needs probes=\[...\]"),
    ("runner-unknown-probe-name", lambda v, t: run_dataset(v, D.InMemory([_img()]), probes=["lens"], out=t),
     r"names are the suite's probes \(embed_lens"),
    ("runner-intervention-as-probe", lambda v, t: run_dataset(v, D.InMemory([_img()]), probes=[Prune()], out=t),
     r"is it meant for interventions=\[...\]"),
    ("runner-other-settings", lambda v, t: _other_settings(v, t), r"resume with the same settings, use a new out "
                                                                  r"directory, or pass overwrite=True"),
    ("runner-locked", lambda v, t: _locked(v, t), r"wait for it to finish or use another out directory"),
    ("runner-corrupt-manifest", lambda v, t: _bad_manifest(v, t), r"move it away or pass overwrite=True"),
    ("store-empty-dir", lambda v, t: Store(t), r"run mech_vtokens.runner.run_dataset\(.*\) first"),
    ("runner-shard", lambda v, t: run_dataset(v, D.InMemory([_img()]), probes=["norms"], out=t, shard=(2, 2)),
     r"give \(i, n\) with 0 <= i < n"),
    ("runner-dtype-with-loaded-model", lambda v, t: run_dataset(v, D.InMemory([_img()]), probes=["norms"], out=t,
                                                                device_map="auto"),
     r"pass a hub id or directory as vlm, or give them to mech_vtokens.load"),
    # evaluation
    ("eval-conditions-type", lambda v, t: evaluate(v, D.InMemory([_img()]), [Prune()]),
     r"give a dict \{name: \[interventions\]\}"),
    ("eval-probe-as-condition", lambda v, t: HarnessModel(v, [NormTracker()]),
     r"probes do not change answers; pass interventions such as Prune"),
    ("eval-scorer", lambda v, t: evaluate(v, D.InMemory([_img()]), {"b": []}, scorer="fuzzy"),
     r"choose one of \('exact', 'contains', 'choice', 'auto'\)"),
    ("eval-no-questions", lambda v, t: evaluate(v, D.InMemory([_img()]), {"b": []}),
     r"use a VQA .jsonl \(image / question / answer\)"),
    # CLI (exit code 2 + message on stderr; checked in the test)
    ("cli-unknown-probe", lambda v, t: _cli(["analyze", "--model", "x", "--images", str(t), "--probes", "bogus"]),
     r"cli"),
    ("cli-missing-model", lambda v, t: _cli(["sites", "--model", str(t / "nope")]), r"cli"),
]
CLI_MESSAGES = {"cli-unknown-probe": "choose from embed_lens", "cli-missing-model": "give a hub id that is reachable"}


def test_catalogue_is_large_and_covers_every_area():
    assert len(CATALOGUE) >= 25 and len({c[0] for c in CATALOGUE}) == len(CATALOGUE)
    areas = {c[0].split("-")[0] for c in CATALOGUE}
    assert {"load", "prompt", "nothing", "lens", "zero", "overlay", "runner", "eval", "cli", "folder"} <= areas


@pytest.mark.parametrize("name,call,fix", CATALOGUE, ids=[c[0] for c in CATALOGUE])
def test_bad_input(name, call, fix, tiny_vlm, tmp_path, capsys):
    vlm = tiny_vlm("llava")
    with pytest.raises(InputError) as err:
        call(vlm, tmp_path)
    assert isinstance(err.value, InputError) and err.type is not ValueError
    import re

    assert re.search(fix, str(err.value)), str(err.value)
    if name in CLI_MESSAGES:
        assert CLI_MESSAGES[name] in capsys.readouterr().err


# ---- no residue -----------------------------------------------------------------------------------------------

def _hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


def _interventions(vlm):
    n = vlm.n_layers
    return [Prune(Positions([0, 5])), Prune(MatchedRandom(Positions([1, 2]), seed=3), positions="repacked"),
            ZeroSublayer("all", [0, n - 1], "both"), Rescale(factor=0.01), Rescale(Positions([3]), 5.0,
                                                                                  "blocks.1.hook_resid_pre"),
            VisualEntry(1), VisualExit(1)]


class Boom(Probe):
    """A probe that raises inside the trace."""

    def sites(self, vlm):
        return ["blocks.1.hook_resid_post"]

    def at(self, site, value, ctx, out):
        raise RuntimeError("boom inside the trace")


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_no_residue_after_interventions_and_exceptions(tiny_vlm, family):
    vlm = tiny_vlm(family)
    batch = vlm.prepare([T.image(70, seed=1), T.image(50, seed=2)], [T.prompt(family)] * 2)
    mv.run(vlm, batch.images, batch.prompts, probes=[Activations(["hook_embed"])])  # nnsight's own lasting hooks
    hooks = _hooks(vlm.hf)

    def clean():
        with torch.no_grad():
            return vlm.hf(**batch.inputs).logits

    ref = clean()
    for iv in _interventions(vlm):
        mv.run(vlm, batch.images, batch.prompts, probes=[Activations(["hook_embed"])], interventions=[iv])
        assert torch.equal(clean(), ref) and _hooks(vlm.hf) == hooks, f"residue after {iv!r} (nnsight)"
        with applied(vlm, batch, interventions=[iv]), torch.no_grad():
            changed = vlm.hf(**batch.inputs).logits
        assert changed.shape != ref.shape or not torch.equal(changed, ref), f"{iv!r} changed nothing"
        assert torch.equal(clean(), ref) and _hooks(vlm.hf) == hooks, f"residue after {iv!r} (applied)"
        with pytest.raises(RuntimeError, match="raised in the body"):
            with applied(vlm, batch, interventions=[iv]):
                raise RuntimeError("raised in the body")
        assert _hooks(vlm.hf) == hooks and torch.equal(clean(), ref)
    with pytest.raises(Exception, match="boom inside the trace"):
        mv.run(vlm, batch.images, batch.prompts, probes=[Boom()], interventions=[ZeroSublayer("all", 0)])
    assert torch.equal(clean(), ref) and _hooks(vlm.hf) == hooks
    with pytest.raises(ValueError, match="user error"):
        with vlm.trace(**batch.inputs):
            vlm.model.model.language_model.layers[0].output[0][:] = 0
            raise ValueError("user error")
    assert torch.equal(clean(), ref) and _hooks(vlm.hf) == hooks
    with pytest.raises(RuntimeError, match="boom"):  # inside applied: the hook raises mid-forward
        with applied(vlm, batch, interventions=[ZeroSublayer("all", 0)], probes=[Boom()]), torch.no_grad():
            vlm.hf(**batch.inputs)
    assert torch.equal(clean(), ref) and _hooks(vlm.hf) == hooks
    # and the nnsight path still works afterwards, equal to the plain forward
    a = mv.run(vlm, batch.images, batch.prompts, probes=[Activations(["unembed.hook_out"])])["activations"]
    assert torch.equal(a["unembed.hook_out"], ref)


# ---- 1000 traces ----------------------------------------------------------------------------------------------

def _rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_1000_traces_flat_memory_and_no_cycles_of_ours(tiny_vlm):
    vlm = tiny_vlm("llava")
    batch = vlm.prepare([T.image(42)], [P])
    probe = Activations(["hook_embed"], visual_only=True)

    def trace():
        exp = vlm.experiment(batch, probes=[probe])
        with vlm.trace(**batch.inputs):
            raw = nnsight.save(exp.execute(vlm.model))
        return exp.results(raw)[probe]["hook_embed"].shape

    for _ in range(50):  # warm-up: allocator pools, caches, lazy imports
        trace()
    gc.collect()
    rss0, objs0 = _rss(), len(gc.get_objects())
    for _ in range(1000):
        assert trace() == (36, 64)
    gc.collect()
    growth = (_rss() - rss0) / rss0
    assert growth < 0.05, f"RSS grew {growth:.1%} over 1000 traces"
    assert len(gc.get_objects()) - objs0 < 500  # no per-trace object accumulation (1000 traces)
    assert not gc.garbage
    # cycles: the only cyclic garbage a trace leaves is nnsight 0.8.1's own self-referencing `skip` closure
    # (tracing/tracer.py skip_context, 5 objects, freed by gc); none from this package
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for _ in range(20):
            trace()
        gc.collect()
        funcs = [o for o in gc.garbage if callable(o) and hasattr(o, "__code__")]
        ours = [f.__qualname__ for f in funcs if "site-packages" not in f.__code__.co_filename]
        assert not ours, ours
        assert {f"{f.__code__.co_filename.split('site-packages/')[-1]}:{f.__qualname__}" for f in funcs} <= \
            {"nnsight/tracing/tracer.py:skip_context.<locals>.skip"}
        assert len(gc.garbage) <= 5 * 20
    finally:
        gc.set_debug(0)
        gc.garbage.clear()


# ---- sockets blocked ------------------------------------------------------------------------------------------

def test_sockets_are_blocked_except_loopback():
    from netguard import NetworkBlocked

    with pytest.raises(NetworkBlocked, match="only loopback and unix sockets"):
        socket.create_connection(("192.0.2.1", 80), timeout=0.5)
    with pytest.raises(NetworkBlocked):
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", ("8.8.8.8", 53))
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    try:
        c = socket.create_connection(srv.getsockname(), timeout=2)  # loopback stays open
        c.close()
    finally:
        srv.close()


# ---- the same inputs give identical results twice -------------------------------------------------------------

def test_identical_twice_with_seeded_controls(tiny_vlm):
    vlm = tiny_vlm("qwen2_5_vl")
    imgs = [T.image(112, seed=1), T.image(140, seed=2)]
    prompts = [T.prompt("qwen2_5_vl")] * 2
    batch = vlm.prepare(imgs, prompts)
    m1 = MatchedRandom(Positions([0, 1]), seed=7).visual(batch)
    assert torch.equal(m1, MatchedRandom(Positions([0, 1]), seed=7).visual(batch))
    assert not torch.equal(m1, MatchedRandom(Positions([0, 1]), seed=8).visual(batch))

    def once():
        probes = [EmbedLens(k=3), LogitLens(k=3), NormTracker(), SinkChannels()]
        ivs = [Prune(MatchedRandom(Positions([0, 1]), seed=7))]
        return [r.to_pandas() for r in mv.run(vlm, imgs, prompts, probes=probes, interventions=ivs).values()]

    for a, b in zip(once(), once()):
        pd.testing.assert_frame_equal(a, b)


def test_bad_jsonl_lines_are_skipped_not_fatal(tmp_path):
    T.image(60).save(tmp_path / "a.png")
    path = _vqa_file(tmp_path, ['{"image": "a.png", "question": "q ?", "answer": "x"}', "{broken", "[1, 2]",
                                json.dumps({"image": "missing.png", "question": "q ?", "answer": "y"})])
    src = D.VqaJsonl(path)
    assert [r.id for r in src] == ["line1", "line4"] and sorted(src.bad_lines) == [2, 3]
    assert src[1].load()[0] is None
