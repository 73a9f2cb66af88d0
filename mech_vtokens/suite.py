"""The full suite on a set of images: every probe in ONE forward per batch, then an HTML report.

Used by ``mech-vtokens demo`` and ``mech-vtokens analyze``; callable from Python as ``analyze(vlm, images, ...)``.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path

from .errors import InputError
from .loop import DEFAULT_BATCH_SIZE, batches as _batches, counting, forward, keywords

ALL_PROBES = ("embed_lens", "logit_lens", "norms", "sinks", "vit_sinks", "labels", "partition")


def build_probes(vlm, names, k: int = 5, labels=None, thresholds=None):
    """Probe objects for ``names`` (see ALL_PROBES); 'labels' needs per-image object labels. ``thresholds``:
    ``{"phi": ..., "vit": ...}`` for SinkChannels / ViTSinks (default: the paper's 20 / 75)."""
    th = thresholds or {}
    from mech_vtokens.probes import EmbedLens, LabelMatching, LogitLens, NormTracker, SinkChannels, ViTSinks

    unknown = [n for n in names if n not in ALL_PROBES]
    if unknown:
        raise InputError(f"unknown probe name(s) {unknown}; choose from {', '.join(ALL_PROBES)}")
    out = {}
    if "embed_lens" in names:
        out["embed_lens"] = EmbedLens(k=k)
    if "logit_lens" in names:
        out["logit_lens"] = LogitLens(k=k)
    if "norms" in names:
        out["norms"] = NormTracker()
    if "sinks" in names:
        out["sinks"] = SinkChannels(threshold=th.get("phi", 20.0))
    if "vit_sinks" in names:
        out["vit_sinks"] = ViTSinks(threshold=th.get("vit", 75.0))
    if "labels" in names and labels is not None:
        out["labels"] = LabelMatching(labels, k=k)
    return out


@keywords
def analyze(vlm, images, prompts, *, probes=ALL_PROBES, labels=None, k: int = 5, batch_size: int = DEFAULT_BATCH_SIZE,
            out: str | Path = "mech-vtokens-report", remote=False, overlays: int = 3, progress: bool = True,
            boxes=None, calibration: int = 20, planted="auto"):
    """Run the suite over ``images`` in batches (one forward each), write tables (CSV) and ``report.html`` into
    ``out``; return ({probe name: [result per batch]}, report path).

    "partition" calibrates a sink / dead / alive partition on the first ``calibration`` images (statistical rule),
    then classifies every image in the same forward as the other probes. ``boxes``: COCO-style
    ``[{"bbox": [x, y, w, h], "label": ...}]`` per image, for the semantic-sparsity figure. The report states how
    many forwards the whole analysis ran (``forwards.json`` too; per phase in ``forwards_by_phase.json``), each
    phase with its progress bar.
    ``planted``: also show the partition of the planted-structure fixture (clearly labelled; its forwards counted
    apart) — "auto" (default): when this model's partition puts every token in one group, so a reader sees what a
    partition looks like. ``overlays``: kept for compatibility; the report shows every image."""
    if len(images) != len(prompts):
        raise InputError(f"{len(images)} images for {len(prompts)} prompts; pass one prompt per image")
    if not images:
        raise InputError("no images to analyze")
    if labels is not None and len(labels) != len(images):
        raise InputError(f"{len(labels)} label lists for {len(images)} images; pass one list per image")
    names = list(probes)
    build_probes(vlm, names, k, labels)  # validates names before any forward
    out = Path(out)
    from .data import writable_dir

    writable_dir(out)  # a file in the way / no permission: InputError naming the fix, before any forward
    if "partition" in names and len(images) < 2:
        raise InputError("the partition needs at least 2 images (cross-image statistics); drop 'partition' or add "
                         "images")
    with counting() as forwards, _report_states_thresholds(vlm, names):
        results, batches, extra = _analysis(vlm, images, prompts, names, labels, k, batch_size, remote, progress,
                                            boxes, calibration, planted)
    n_planted = extra["planted"]["forwards"] if "planted" in extra else 0
    extra["forwards"] = forwards.n - n_planted
    (out / "forwards.json").write_text(json.dumps({"forwards": extra["forwards"]}))
    (out / "forwards_by_phase.json").write_text(json.dumps({**extra["phases"], "planted fixture (another model)":
                                                            n_planted}))
    th = extra["thresholds"]
    (out / "thresholds.json").write_text(json.dumps({k: th[k] for k in ("phi", "vit", "calibrated", "text")}))
    _write_tables(results, out)
    for name in ("summary", "sparsity", "clusters"):
        if name in extra:
            extra[name].to_pandas().to_csv(out / f"{name}.csv", index=False)
    report = _report(vlm, results, batches, overlays, extra)
    path = report.save(out / "report.html")
    return results, path


def _analysis(vlm, images, prompts, names, labels, k, batch_size, remote, progress, boxes, calibration, planted):
    """Every forward of :func:`analyze`: (results per probe name, [(start, batch)], extra results). Each phase has
    its own progress bar and its forwards counted in ``extra["phases"]``."""
    results: dict[str, list] = {}
    phases: dict[str, int] = {}
    with counting() as c:
        extra: dict = {"thresholds": _thresholds(vlm, images, prompts, names, batch_size, remote, calibration,
                                                 progress)}
    phases["sink thresholds (calibration on data)"] = c.n
    extra["phases"] = phases
    th = extra["thresholds"]
    part = None
    if "partition" in names:
        from .partition import calibrate, cluster_dominance, summarize

        n_cal = max(2, min(calibration, len(images)))
        extra["n_calibration"] = n_cal
        with counting() as c:
            part = calibrate(vlm, images[:n_cal], prompts[:n_cal], batch_size=batch_size, remote=remote,
                             phi_threshold=th["phi"], progress=progress)  # its ViT rule reads the last block
        phases["partition calibration"] = c.n
        extra["partition"] = part
        with counting() as c:
            extra["summary"] = summarize(vlm, images[:n_cal], prompts[:n_cal], partition=part, batch_size=batch_size,
                                         remote=remote, progress=progress)
        phases["partition summary"] = c.n
        with counting() as c:
            extra["clusters"] = cluster_dominance(vlm, images[:n_cal], prompts[:n_cal], batch_size=batch_size,
                                                  remote=remote, progress=progress)
        phases["anchor clusters"] = c.n
    if boxes is not None:
        from .partition import semantic_sparsity

        with counting() as c:
            extra["sparsity"] = semantic_sparsity(vlm, images, prompts, annotations=boxes, k=k,
                                                  batch_size=batch_size, remote=remote, progress=progress)
        phases["semantic sparsity"] = c.n
    batches = []
    with counting() as c:
        for start, batch in _batches(vlm, images, prompts, batch_size, progress, desc="all probes"):
            sl = slice(start, start + batch_size)
            ps = build_probes(vlm, names, k, labels[sl] if labels is not None else None, thresholds=th)
            if part is not None:
                ps["partition"] = part
            res = forward(vlm, batch, list(ps.values()), remote=remote)
            for name, p in ps.items():
                results.setdefault(name, []).append(res[p])
            batches.append((start, batch))
    phases["every probe, one forward per batch"] = c.n
    if "partition" in names and _wants_planted(planted, results.get("partition")):
        extra["planted"] = _planted_reference(progress)
    return results, batches, extra


def _wants_planted(planted, partition_results) -> bool:
    """``planted``: True / False, or "auto": when the model's partition put every visual token in ONE group (there
    is no partition to look at)."""
    if planted in (True, False):
        return planted
    if planted != "auto":
        raise InputError(f"planted={planted!r}: pass True, False or 'auto'")
    if not partition_results:
        return False
    import torch

    codes = torch.cat([r.codes for r in partition_results])
    return len(torch.unique(codes)) <= 1


def _planted_reference(progress, n_cal: int = 12, n_show: int = 4) -> dict:
    """The sink / dead / alive analysis on the planted-structure fixture (a tiny LLaVA whose weights plant a known
    partition, :mod:`mech_vtokens.fixtures.planted`): calibrated on ``n_cal`` planted images, shown on ``n_show``
    others, with the token accuracy against the planted truth. Its forwards are not the user's model's and are
    counted apart."""
    import tempfile

    import numpy as np

    from .vlm import load
    from .fixtures.planted import planted_image, planted_partition_model
    from .partition import calibrate, summarize
    from .testing import prompt as fixture_prompt

    with counting() as c, tempfile.TemporaryDirectory() as tmp:
        path, truth = planted_partition_model("llava", Path(tmp) / "planted")
        pvlm = load(path)
        drawn = [planted_image(truth, seed=i, content=0.6) for i in range(n_cal + n_show)]
        ims = [im for im, _ in drawn]
        prs = [fixture_prompt("llava", "what is in the image ?")] * len(ims)  # first token USER: its BOS-role sink
        part = calibrate(pvlm, ims[:n_cal], prs[:n_cal], vit_threshold=truth["vit_threshold"],
                         phi_threshold=truth["phi_threshold"], progress=progress)
        summary = summarize(pvlm, ims[:n_cal], prs[:n_cal], partition=part, progress=progress)
        batch = pvlm.prepare(ims[n_cal:], prs[n_cal:])
        res = forward(pvlm, batch, [part])[part]
    want = np.concatenate([np.array(lab).reshape(-1) for _, lab in drawn[n_cal:]])
    return {"partition": part, "summary": summary, "batch": batch, "result": res, "truth": truth,
            "accuracy": float((np.array(res.labels) == want).mean()), "forwards": c.n, "n_cal": n_cal,
            "d_model": pvlm.adapter.d_model}


@contextlib.contextmanager
def _report_states_thresholds(vlm, names):
    """Where the report states the sink thresholds and why (the paper's φ > 20 out of reach), the probes' own
    ThresholdWarnings would repeat it once per batch: silenced inside the analysis."""
    from .errors import ThresholdWarning
    from .partition.calibrate import PAPER_PHI, phi_bound

    with warnings.catch_warnings():
        if PAPER_PHI >= phi_bound(vlm) and {"sinks", "vit_sinks", "partition"} & set(names):
            warnings.simplefilter("ignore", ThresholdWarning)
        yield


def _thresholds(vlm, images, prompts, names, batch_size, remote, calibration, progress=False) -> dict:
    """The suite's sink thresholds and the sentence the report states about them: the paper's φ > 20 / L2 > 75, or,
    where φ > 20 cannot happen (φ <= sqrt(d_model) < 20) and a sink probe runs, data-calibrated ones
    (:func:`mech_vtokens.partition.sink_thresholds` on the first ``calibration`` images; its forwards are counted)."""
    from .partition.calibrate import PAPER_PHI, PAPER_VIT, phi_bound, sink_thresholds

    out = {"phi": PAPER_PHI, "vit": PAPER_VIT, "calibrated": False,
           "text": f"Sink thresholds: the paper's φ > {PAPER_PHI:g} (Sec. 4.2) and ViT L2 > {PAPER_VIT:g} (Sec. 4.1)."}
    bound = phi_bound(vlm)
    if PAPER_PHI < bound or not {"sinks", "vit_sinks", "partition"} & set(names):
        return out
    if not {"sinks", "vit_sinks"} & set(names):  # the partition alone: say why, without extra forwards
        out["text"] = (f"Sink thresholds: the paper's φ > {PAPER_PHI:g} is out of reach for this model (φ <= sqrt(d) "
                       f"= {bound:.1f}, d = {vlm.adapter.d_model}): the partition finds no LLM sink by construction; "
                       f"add the 'sinks' probe (or use mech_vtokens.partition.sink_thresholds) for calibrated ones.")
        return out
    n_cal = max(1, min(calibration, len(images)))
    t = sink_thresholds(vlm, images[:n_cal], prompts[:n_cal], batch_size=batch_size, remote=remote,
                        progress=progress)
    bits = [f"Sink thresholds: the paper's φ > {PAPER_PHI:g} is out of reach for this model (φ(x) = max|x_d| / RMS(x) "
            f"<= sqrt(d) = {bound:.1f}, d = {vlm.adapter.d_model}), so it would report 0 sinks whatever the input; "
            f"this report calibrates the thresholds on data instead (mech_vtokens.partition.sink_thresholds on "
            f"{t['n_images']} images, {t['rule']}):"]
    if t["phi"] is not None:
        out["phi"] = t["phi"]
        bits.append(f"φ > {t['phi']:.2f} (median visual-token φ {t['phi_visual_median']:.2f}, BOS φ "
                    f"{t['phi_bos']:.2f} at {t['llm_site']});")
    else:
        bits.append(f"no φ threshold (the BOS token's φ {t['phi_bos']:.2f} does not stand out from the visual "
                    f"tokens' {t['phi_visual_median']:.2f}: no sink channels at {t['llm_site']}; φ > {PAPER_PHI:g} "
                    f"kept);")
    if t["vit"] is not None:
        out["vit"] = t["vit"]
        bits.append(f"ViT L2 > {t['vit']:.3g} for the ViT-sinks probe (median {t['vit_median']:.3g}, max "
                    f"{t['vit_max']:.3g} at the layer the LM receives).")
    else:
        bits.append(f"no ViT threshold (no high-norm outliers: max L2 {t['vit_max']:.3g} vs median "
                    f"{t['vit_median']:.3g}: no ViT sinks; L2 > {PAPER_VIT:g} kept).")
    out.update(calibrated=True, text=" ".join(bits), calibration=t)
    return out


def _frames(results):
    import pandas as pd

    for name, rs in results.items():
        frames = []
        for b, r in enumerate(rs):
            df = r.to_pandas()
            frames.append(df.assign(batch=b))
        yield name, pd.concat(frames, ignore_index=True)


def _write_tables(results, out: Path):
    for name, df in _frames(results):
        df.to_csv(out / f"{name}.csv", index=False)


def model_name(vlm) -> str:
    """A short name of the model for titles: a hub id as given, a local checkpoint by its last two folders (never
    the absolute path)."""
    src = str(vlm.source or type(vlm.hf).__name__)
    p = Path(src)
    return "/".join(p.parts[-2:]) if p.is_absolute() else src


def _lm_norms(norms) -> dict:
    """{LM site: L2 norm of every visual token} of a NormResult (the layer-dependent colouring of the viewer)."""
    df = norms.to_pandas()
    df = df[(df.tower == "lm") & (df.visual_index >= 0)]
    out = {}
    for site, d in df.groupby("site", sort=True, observed=True):
        out[str(site)] = d.sort_values("visual_index").l2.to_numpy()
    return out


def _report(vlm, results, batches, overlays: int, extra=None):  # noqa: C901 (one section after the other)
    import numpy as np
    import pandas as pd

    from .views import PatchOverlay, Report, TopWords

    extra = extra or {}
    n_img = sum(len(b.images) for _, b in batches)
    name = model_name(vlm)
    phases = extra.get("phases", {})
    per_phase = "; ".join(f"{k}: {v}" for k, v in phases.items() if v)
    rep = Report(f"mech-vtokens report — {name}",
                 f"{vlm.family} model {name}: d_model = {vlm.adapter.d_model}, {vlm.n_layers} decoder layers, "
                 f"{vlm.n_vision_layers} vision layers. {n_img} images in {len(batches)} batches; "
                 f"{extra.get('forwards', '?')} forwards in all. Forwards of this model per phase: {per_phase}.")
    rep.heading("What was measured")
    rep.text(f"Every probe ({', '.join(results)}) read its sites in ONE forward per batch; the phases before it "
             f"(threshold and partition calibration, the partition summary, the anchor clusters, semantic sparsity) "
             f"ran their own forwards, counted above. Tables of every batch are the CSV files next to this page; "
             f"every figure is also a PNG file in report_figures/.")
    if "thresholds" in extra:
        rep.note(extra["thresholds"]["text"])
    lens_names = [n for n in ("embed_lens", "logit_lens") if n in results]

    if "partition" in results:
        part = extra["partition"]
        allres = results["partition"]
        codes = np.concatenate([r.codes.numpy() for r in allres])
        from .partition.partition import GROUPS

        shares = {g: float((codes == i).mean()) for i, g in enumerate(GROUPS)}
        rep.heading("Sink / dead / alive partition of this model (paper Secs. 2, 4-6)")
        found = ", ".join(f"{g} {100 * v:.1f} %" for g, v in shares.items() if v > 0)
        rule = []
        rule.append(f"ViT sinks: L2 > {part.vit['threshold']:.3g} at the last vision block" if part.vit else
                    "ViT sinks: no threshold")
        rule.append(f"LLM sinks: φ > {part.llm['threshold']:.3g} in dims {part.llm['dims']} at {part.llm['site']}"
                    if part.llm and part.llm.get("dims") else "LLM sinks: no sink dimension found (BOS shows none)")
        rule.append("dead: a prototype found" if part.dead is not None else
                    "dead: no cluster stable across images (no dead group found)")
        rep.text(f"Calibrated on the first {extra.get('n_calibration', '?')} images with the statistical rule "
                 f"({'; '.join(rule)}), then every one of the {n_img} images classified in the probes' forward: "
                 f"{found} of {len(codes)} visual tokens.")
        present = [g for g, v in shares.items() if v > 0]
        if len(present) <= 1:
            only = present[0] if present else "?"
            unreachable = ("the paper's thresholds cannot be reached (see the note on thresholds), "
                           if extra.get("thresholds", {}).get("calibrated") else "")
            rep.note(f"Nothing to partition here: every visual token of this model is {only}: {unreachable}"
                     f"no sink stands out and no token group is the same across images, so there is no group "
                     f"overlay and no group table to show. The planted fixture below shows what a partition "
                     f"looks like." if "planted" in extra else f"Nothing to partition here: every visual token "
                     f"of this model is {only}.")
            df = extra["summary"].to_pandas()
            rep.table(df[df.percent > 0], "cross-image similarity of the centroid of the one group (App. B.2)")
        else:
            summary = extra["summary"]
            df = summary.to_pandas()
            rep.table(df[df.percent > 0], "share of each group found and cross-image similarity of its centroid "
                                          "(App. B.2; groups not found left out)")
            rep.figure(summary.plot(), "group shares and cross-image similarity of each group's centroid",
                       name="partition summary")
            for start, b in batches:
                lab = [g for r in allres if r._batch is b for g in r.labels]
                rep.view(PatchOverlay(b, "all", groups=lab, title="groups of every visual token",
                                      image_names=[f"image {start + i}" for i in range(len(b.images))]))
        rep.figure(extra["clusters"].plot(), "anchor clusters of the LM-input visual tokens (τ = 0.9): cross-image "
                                             "similarity per cluster rank and cluster sizes (Fig. 1)",
                   name="anchor clusters")

    if "planted" in extra:
        pl = extra["planted"]
        rep.heading("Reference: the planted-structure fixture (NOT this model)")
        rep.note(f"PLANTED: a tiny LLaVA (d_model = {pl['d_model']}) built by mech_vtokens.fixtures.planted."
                 f"planted_partition_model, whose weights plant ViT sinks, LLM sinks (massive activations in fixed "
                 f"dims), dead tokens (the same background everywhere) and alive content tokens at known places. "
                 f"It is here so a reader sees what a partition looks like; none of its numbers are about the "
                 f"model above. Calibrated on {pl['n_cal']} planted images with the fixture's thresholds, shown on "
                 f"{len(pl['batch'].images)} others: token accuracy {100 * pl['accuracy']:.1f} % against the planted "
                 f"truth ({pl['forwards']} forwards of the fixture, not counted above).")
        df = pl["summary"].to_pandas()
        rep.table(df, "planted fixture: share of each group and cross-image similarity of its centroid")
        rep.figure(pl["summary"].plot(), "planted fixture: group shares and cross-image centroid similarity",
                   name="planted summary")
        rep.view(PatchOverlay(pl["batch"], "all", groups=pl["result"].labels,
                              title="planted fixture: the group of every visual token"))

    if lens_names or "norms" in results:
        rep.heading("Patch viewer: every image, its tokens, every layer")
        rep.text("Left: the image as the model got it; right: its patches coloured by the L2 norm of the visual "
                 "token in the LM's residual stream (the slider picks the layer; the colour bar is that layer's "
                 "scale, shared by the images of a grid). Hover a patch: its value, the prompt's text tokens and "
                 "the EmbedLens / LogitLens top-k words at EVERY layer (the slider's layer marked).")
        for bi, (start, b) in enumerate(batches):
            lenses = [results[n][bi] for n in lens_names]
            values = _lm_norms(results["norms"][bi]) if "norms" in results else None
            rep.view(PatchOverlay(b, "all", values=values, lenses=lenses, label="L2 norm",
                                  image_names=[f"image {start + i}" for i in range(len(b.images))],
                                  title=f"images {start}-{start + len(b.images) - 1}"))

    for n in lens_names:
        r0 = results[n][0]
        rep.heading(f"{r0.lens}: the top-k words of each visual token (paper Sec. 3)")
        what = ("The nearest input embeddings (cosine)" if n == "embed_lens" else
                "The unembedding of the final-norm state (logit lens)")
        rep.text(f"{what} of each visual token, per site: choose the site; one row per visual token of image 0, "
                 f"one column per rank.")
        rep.view(TopWords(r0, 0))
        frames = [r.to_pandas() for r in results[n]]
        df = pd.concat(frames, ignore_index=True)
        top1 = df[df["rank"] == 0].groupby(["site", "token"], observed=True).size().rename("visual_tokens")
        top1 = top1.reset_index().sort_values(["site", "visual_tokens"], ascending=[True, False])
        rep.table(top1.groupby("site", observed=True).head(3),
                  f"the 3 most frequent top-1 words per site, over all {n_img} images")

    if "sparsity" in extra:
        rep.heading("Semantic sparsity (paper Sec. 6.2, Fig. 7)")
        rep.figure(extra["sparsity"].plot(), "fraction of object tokens whose label is in their EmbedLens top-k, "
                                             "and of all visual tokens with any grounded label, per layer",
                   name="semantic sparsity")
    if "labels" in results:
        rep.heading("Label matching A(ℓ): EmbedLens vs LogitLens (paper Fig. 3)")
        df = pd.concat([r.to_pandas() for r in results["labels"]], ignore_index=True)
        col = results["labels"][0].layer_column
        df["found"] = df.accuracy * df.n_labels
        agg = df.groupby(["lens", col], sort=False).agg(found=("found", "sum"), n_labels=("n_labels", "sum"))
        agg = agg.reset_index()
        agg["accuracy"] = agg.found / agg.n_labels
        rep.figure(results["labels"][0].plot(), f"first batch ({len(batches[0][1].images)} images): fraction of "
                                                f"object labels found in the top-k of any visual token, per layer",
                   name="label matching")
        rep.table(agg.drop(columns="found"), f"A(ℓ) over all {n_img} images")
    if "norms" in results:
        rep.heading("Norms and layer-to-layer change (paper Figs. 6, 8)")
        rep.figure(results["norms"][0].plot(), f"first batch ({len(batches[0][1].images)} images): mean L2 norm "
                                               f"and cosine to the previous layer, visual vs text tokens",
                   name="norms")
    if "sinks" in results:
        rep.heading("BOS sink channels (paper Sec. 4.2, Fig. 4)")
        sk = results["sinks"][0]
        n_sink = sum(int(r.to_pandas().query("visual_index >= 0").sink.sum()) for r in results["sinks"])
        if not sk.sink_dims or n_sink == 0:
            dims = sk.sink_dims or "none (the BOS state shows no massive dimension)"
            rep.note(f"No visual sink token: sink dims {dims}; threshold φ > {sk.threshold:.4g} where "
                     f"φ ≤ √d = {sk.phi_bound:.1f} for this width. The plots still show how close each token is "
                     f"to the BOS state.")
        rep.figure(sk.plot(), "cosine to the BOS state across sublayers (left) and the rank of the tokens most "
                              "similar to BOS, tracked across sublayers (right)", name="bos sink channels")
        df = pd.concat([r.to_pandas() for r in results["sinks"]], ignore_index=True)
        rep.table(df[df.visual_index >= 0].groupby("site", sort=False, observed=True).agg(
            phi_max=("phi", "max"), sinks=("sink", "sum"), bos_cos_mean=("bos_cos", "mean")).reset_index(),
            f"per site, over all {n_img} images: max φ over visual tokens, number of sink tokens, mean cosine to BOS")
    if "vit_sinks" in results:
        rep.heading("ViT sinks (paper Sec. 4.1)")
        vs = results["vit_sinks"][0]
        n_sink = sum(int(r.sinks.sum()) for r in results["vit_sinks"])
        if n_sink == 0:
            rep.note(vs.note or f"No ViT sink: no visual token's L2 norm exceeds {vs.threshold:g}.")
        rep.figure(vs.plot(), f"vision-layer L2 norm of every visual token of image 0 at {vs.site} (dots: "
                              f"> {vs.threshold:g})", name="vit sinks")
    return rep
