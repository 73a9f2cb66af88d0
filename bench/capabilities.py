"""The family x capability table: what each model family can do today, tried for real on its tiny fixture.

    python bench/capabilities.py                    # every family in testing.FAMILIES -> bench/CAPABILITIES.md
    python bench/capabilities.py --real             # + every real-file fixture (fixtures/real.py)
    python bench/capabilities.py --only llava --out -   # one family, table on stdout

For every family (``mech_vtokens.testing.FAMILIES``, so a family added there appears here with no edit) it builds the
tiny fixture, loads it (``mv.load``) and tries, each on its own so one refusal does not hide the next:
sites listing, every probe in ONE forward, each intervention alone (Prune, ZeroSublayer, Rescale, VisualEntry,
VisualExit, AttentionKnockout and HeadKnockout on an eager-attention load, PatchActivations between two rows of one
image; the answer metrics run in the probes forward), ``mv.generate`` plain and under Prune (a
sequence-changing intervention), the partition (calibrate + classify), ``remote="local"`` (probes + an intervention
through the whole remote path, offline), the geometry (every region token's box inside its image, the others NaN)
and the patch overlay. A cell is ✓, or the ``InputError`` the library refuses with (shortened): a refusal names
its reason, which is the point. Any other exception is shown as ✗ with its type: that is a bug.

It checks that each capability RUNS and is refused only with a clear message; the numbers (each probe vs a
plain-torch reference, each intervention vs a hand-built forward, generation vs re-running the intervened forward,
sites vs TransformerLens) are the test suite's job (tests/test_probes.py, test_interventions.py,
test_generate.py, test_tl_bridge.py ...).
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import torch

import mech_vtokens as mv
from mech_vtokens import testing as T
from mech_vtokens.errors import InputError

OK = "✓"
WIDTH = 70  # a refusal's message is cut to this many characters in the table


def _inputs(vlm):
    """Two small images, two prompts (a wide and a square image: anyres families tile the wide one)."""
    ims = [T.image(112, 0).resize((140, 84)), T.image(84, 1)]
    prs = [vlm.prompt("what color is the object ?"), vlm.prompt("is the red circle left ?")]
    return ims, prs


def _probes(vlm):
    from mech_vtokens.probes import (Activations, AnswerLogProb, ChoiceProb, EmbedLens, KLToClean, LabelMatching,
                                     LogitDiff, LogitLens, NormTracker, SinkChannels, ViTSinks)

    label = "red"  # rule="first": its first token (byte-level BPE vocabularies have no single-token "red")
    a, b = 5, 6  # two token ids: the answer metrics take ids as well as single-token words
    return [Activations(["hook_embed", "blocks.0.hook_resid_post"]), EmbedLens(k=3), LogitLens(k=3),
            NormTracker(), SinkChannels(threshold=3.0), ViTSinks(threshold=1.0),
            LabelMatching([[label], [label]], k=3, rule="first"), AnswerLogProb(a), LogitDiff(a, b),
            ChoiceProb([a, b]), KLToClean(0)]


def _interventions():
    from mech_vtokens.interventions import (AllVisual, AttentionKnockout, HeadKnockout, PatchActivations, Positions,
                                            Prune, Rescale, VisualEntry, VisualExit, ZeroSublayer)

    return {"Prune": lambda: Prune(Positions([0, 2])), "ZeroSublayer": lambda: ZeroSublayer(layers=1),
            "Rescale": lambda: Rescale(factor=0.5), "VisualEntry": lambda: VisualEntry(1),
            "VisualExit": lambda: VisualExit(2), "AttentionKnockout": lambda: AttentionKnockout("vt", layers=1),
            "HeadKnockout": lambda: HeadKnockout([0], layers=1),
            "PatchActivations": lambda: PatchActivations("blocks.0.hook_resid_post", AllVisual(), {1: 0})}


# the interventions that need eager attention (the post-softmax pattern), and those that need two rows of one image
_EAGER = ("AttentionKnockout", "HeadKnockout")
_SAME_IMAGE = ("PatchActivations",)


def _sites(ctx):
    vlm = ctx["vlm"]
    must = ["hook_embed", "vision_projector.hook_out", "blocks.0.hook_resid_pre", "blocks.0.hook_attn_out",
            "blocks.0.hook_resid_mid", "blocks.0.hook_mlp_out", "blocks.0.hook_resid_post", "unembed.hook_out"]
    missing = [s for s in must if s not in vlm.sites]
    assert not missing, f"sites missing: {missing}"


def _all_probes(ctx):
    vlm, ims, prs = ctx["vlm"], *ctx["inputs"]
    res = mv.run(vlm, ims, prs, probes=_probes(vlm))
    for name in res:
        res[name].to_pandas()


def _intervention(name):
    def check(ctx):
        vlm = ctx["eager"] if name in _EAGER else ctx["vlm"]
        ims, prs = ctx["inputs"]
        if name in _SAME_IMAGE:  # a source row and a target row with the same token geometry
            ims, prs = [ims[1], ims[1]], [prs[0], prs[1]]
        from mech_vtokens.probes import LogitLens

        res = mv.run(vlm, ims, prs, probes=[LogitLens(k=2, sites=["blocks.2.hook_resid_post"])],
                     interventions=[_interventions()[name]()])
        assert torch.isfinite(res["logit_lens"].scores["blocks.2.hook_resid_post"]).all() or name in (
            "Prune", "VisualExit"), "non-finite lens scores"
    check.__name__ = name
    return check


def _generate(ctx):
    vlm, ims, prs = ctx["vlm"], *ctx["inputs"]
    out = mv.generate(vlm, ims, prs, max_new_tokens=3)
    assert len(out.text) == 2


def _generate_pruned(ctx):
    vlm, ims, prs = ctx["vlm"], *ctx["inputs"]
    out = mv.generate(vlm, ims, prs, interventions=[_interventions()["Prune"]()], max_new_tokens=3)
    assert len(out.text) == 2


def _partition(ctx):
    from mech_vtokens.partition import calibrate, sink_thresholds

    vlm, (ims, prs) = ctx["vlm"], ctx["inputs"]
    cal = [T.image(84, s) for s in range(4)]
    th = sink_thresholds(vlm, cal, prs[0])  # None: no outlier stands out on this random model -> no sinks
    part = calibrate(vlm, cal, prs[0], vit_threshold=th["vit"] or 1e9, phi_threshold=th["phi"] or 1e9)
    res = part.classify(ims, prs[0])
    assert len(res.codes) == vlm.prepare(ims, [prs[0]] * 2).n_visual
    res.fractions()


def _remote_local(ctx):
    from mech_vtokens.interventions import Rescale
    from mech_vtokens.probes import EmbedLens, NormTracker

    vlm, ims, prs = ctx["vlm"], *ctx["inputs"]
    local = mv.run(vlm, ims, prs, probes=[EmbedLens(k=2), NormTracker(vision=False)],
                   interventions=[Rescale(factor=0.5)])
    remote = mv.run(vlm, ims, prs, probes=[EmbedLens(k=2), NormTracker(vision=False)],
                    interventions=[Rescale(factor=0.5)], remote="local")
    for s, ids in local["embed_lens"].ids.items():
        assert torch.equal(ids, remote["embed_lens"].ids[s]), f"remote='local' differs at {s}"


def _geometry(ctx):
    vlm, (ims, prs) = ctx["vlm"], ctx["inputs"]
    batch = vlm.prepare(ims, prs)
    box, img, kinds = batch.tokens["box"], batch.tokens["image"], batch.kinds
    for j, kind in enumerate(kinds):
        w, h = batch.image_sizes[int(img[j])]
        if kind in ("patch", "thumbnail"):
            x0, y0, x1, y1 = box[j].tolist()
            assert 0 <= x0 < x1 <= w + 1e-3 and 0 <= y0 < y1 <= h + 1e-3, f"token {j} ({kind}) box {box[j].tolist()}"
        else:
            assert torch.isnan(box[j]).all(), f"token {j} ({kind}) has a box"


def _overlay(ctx):
    from mech_vtokens.views import PatchOverlay

    vlm, (ims, prs) = ctx["vlm"], ctx["inputs"]
    batch = vlm.prepare(ims, prs)
    for image in range(len(ims)):
        ov = PatchOverlay(batch, image, values=torch.arange(batch.n_visual).float().numpy())
        assert len(ov.data()["cells"]) > 0, f"image {image}: no overlay cell"
        assert "mvt-overlay" in ov.html


def columns() -> dict:
    """Column name -> check(ctx); ctx holds vlm, eager (the eager-attention load), inputs."""
    cols = {"sites": _sites, "probes (one forward)": _all_probes}
    cols.update({name: _intervention(name) for name in _interventions()})
    cols.update({"generate": _generate, "generate + Prune": _generate_pruned, "partition": _partition,
                 'remote="local"': _remote_local, "geometry (boxes)": _geometry, "overlay": _overlay})
    return cols


def _cell(fn, ctx) -> str:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fn(ctx)
        return OK
    except InputError as e:
        msg = " ".join(str(e).split()).replace("|", "/")
        return "refused: " + (msg if len(msg) <= WIDTH else msg[:WIDTH - 1] + "…")
    except Exception as e:  # noqa: BLE001 - a crash is what the table must show, not hide
        msg = " ".join(str(e).split()).replace("|", "/")
        return f"✗ {type(e).__name__}: {msg[:WIDTH]}"


def row(name: str, path: str, cols: dict | None = None) -> dict:
    """The capability cells of the model at ``path`` (its row name ``name``)."""
    cols = cols or columns()
    out = {}
    try:
        vlm = mv.load(path)
        eager = mv.load(path, attn_implementation="eager")
    except InputError as e:
        return {c: "refused at load: " + str(e)[:WIDTH] for c in cols}
    ctx = {"vlm": vlm, "eager": eager, "inputs": _inputs(vlm)}
    for c, fn in cols.items():
        out[c] = _cell(fn, ctx)
    return out


def table(rows: dict) -> str:
    """Markdown: one row per family, one column per capability."""
    cols = list(next(iter(rows.values())))
    lines = ["| family | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, cells in rows.items():
        lines.append(f"| {name} | " + " | ".join(cells[c] for c in cols) + " |")
    return "\n".join(lines)


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--real", action="store_true", help="also every real-file fixture (fixtures/real.py)")
    ap.add_argument("--only", default=None, help="comma-separated families / checkpoint ids to run")
    ap.add_argument("--out", default=str(Path(__file__).with_name("CAPABILITIES.md")),
                    help="markdown file to write ('-': stdout only)")
    args = ap.parse_args(argv)
    names = list(T.FAMILIES) + (list(T.REAL_CHECKPOINTS) if args.real else [])
    if args.only:
        want = args.only.split(",")
        unknown = [w for w in want if w not in names and w not in T.REAL_CHECKPOINTS]
        if unknown:
            raise SystemExit(f"--only {unknown}: not a family of {T.FAMILIES} nor a real checkpoint")
        names = want
    rows, t0, c0 = {}, time.perf_counter(), time.process_time()
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            d = Path(tmp) / name.replace("/", "__")
            path = (T.real_model(name, d, layers=3) if name in T.REAL_CHECKPOINTS else T.tiny_model(name, d))
            rows[name] = row(name, path)
            print(f"{name}: {sum(v == OK for v in rows[name].values())}/{len(rows[name])} ✓", flush=True)
    md = table(rows)
    took, cpu = time.perf_counter() - t0, time.process_time() - c0
    doc = ("# Capabilities: family × what it can do\n\n"
           "Written by `bench/capabilities.py` (tiny fixtures" + (" and real-file fixtures" if args.real else "") +
           f", {len(rows)} models, {took:.0f} s wall / {cpu:.0f} s CPU on a shared 2-core machine). "
           "✓: it ran; `refused: ...`: the library refuses it "
           "before any work with that InputError (shortened); ✗: a crash (a bug). It checks that each capability "
           "runs; the numbers are the tests' job (see the script's docstring).\n\n" + md + "\n")
    if args.out != "-":
        Path(args.out).write_text(doc)
    print(md)
    return md


if __name__ == "__main__":
    main()
