"""The full suite on a set of images: every probe in ONE forward per batch, then an HTML report.

Used by ``mech-vtokens demo`` and ``mech-vtokens analyze``; callable from Python as ``analyze(vlm, images, ...)``.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import InputError
from .loop import DEFAULT_BATCH_SIZE, batches as _batches, counting, forward, keywords

ALL_PROBES = ("embed_lens", "logit_lens", "norms", "sinks", "vit_sinks", "labels", "partition")


def build_probes(vlm, names, k: int = 5, labels=None):
    """Probe objects for ``names`` (see ALL_PROBES); 'labels' needs per-image object labels."""
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
        out["sinks"] = SinkChannels()
    if "vit_sinks" in names:
        out["vit_sinks"] = ViTSinks()
    if "labels" in names and labels is not None:
        out["labels"] = LabelMatching(labels, k=k)
    return out


@keywords
def analyze(vlm, images, prompts, *, probes=ALL_PROBES, labels=None, k: int = 5, batch_size: int = DEFAULT_BATCH_SIZE,
            out: str | Path = "mech-vtokens-report", remote=False, overlays: int = 3, progress: bool = True,
            boxes=None, calibration: int = 20):
    """Run the suite over ``images`` in batches (one forward each), write tables (CSV) and ``report.html`` into
    ``out``; return ({probe name: [result per batch]}, report path).

    "partition" calibrates a sink / dead / alive partition on the first ``calibration`` images (statistical rule),
    then classifies every image in the same forward as the other probes. ``boxes``: COCO-style
    ``[{"bbox": [x, y, w, h], "label": ...}]`` per image, for the semantic-sparsity figure. The report states how
    many forwards the whole analysis ran (``forwards.json`` too)."""
    if len(images) != len(prompts):
        raise InputError(f"{len(images)} images for {len(prompts)} prompts; pass one prompt per image")
    if not images:
        raise InputError("no images to analyze")
    if labels is not None and len(labels) != len(images):
        raise InputError(f"{len(labels)} label lists for {len(images)} images; pass one list per image")
    names = list(probes)
    build_probes(vlm, names, k, labels)  # validates names before any forward
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if "partition" in names and len(images) < 2:
        raise InputError("the partition needs at least 2 images (cross-image statistics); drop 'partition' or add "
                         "images")
    with counting() as forwards:
        results, batches, extra = _analysis(vlm, images, prompts, names, labels, k, batch_size, remote, progress,
                                            boxes, calibration)
    extra["forwards"] = forwards.n
    (out / "forwards.json").write_text(json.dumps({"forwards": forwards.n}))
    _write_tables(results, out)
    for name in ("summary", "sparsity", "clusters"):
        if name in extra:
            extra[name].to_pandas().to_csv(out / f"{name}.csv", index=False)
    report = _report(vlm, results, batches, overlays, extra)
    path = report.save(out / "report.html")
    return results, path


def _analysis(vlm, images, prompts, names, labels, k, batch_size, remote, progress, boxes, calibration):
    """Every forward of :func:`analyze`: (results per probe name, [(start, batch)], extra results)."""
    results: dict[str, list] = {}
    extra: dict = {}
    part = None
    if "partition" in names:
        from .partition import calibrate, summarize

        n_cal = max(2, min(calibration, len(images)))
        part = calibrate(vlm, images[:n_cal], prompts[:n_cal], batch_size=batch_size, remote=remote)
        extra["partition"] = part
        extra["summary"] = summarize(vlm, images[:n_cal], prompts[:n_cal], partition=part, batch_size=batch_size,
                                     remote=remote)
        from .partition import cluster_dominance

        extra["clusters"] = cluster_dominance(vlm, images[:n_cal], prompts[:n_cal], batch_size=batch_size,
                                              remote=remote)
    if boxes is not None:
        from .partition import semantic_sparsity

        extra["sparsity"] = semantic_sparsity(vlm, images, prompts, annotations=boxes, k=k, batch_size=batch_size,
                                              remote=remote)
    batches = []
    for start, batch in _batches(vlm, images, prompts, batch_size, progress):
        sl = slice(start, start + batch_size)
        ps = build_probes(vlm, names, k, labels[sl] if labels is not None else None)
        if part is not None:
            ps["partition"] = part
        res = forward(vlm, batch, list(ps.values()), remote=remote)
        for name, p in ps.items():
            results.setdefault(name, []).append(res[p])
        batches.append((start, batch))
    return results, batches, extra


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


def _report(vlm, results, batches, overlays: int, extra=None):
    from .views import PatchOverlay, Report, lens_topk

    rep = Report(f"mech-vtokens report — {vlm.source or type(vlm.hf).__name__}")
    n_img = sum(len(b.images) for _, b in batches)
    rep.text(f"{vlm.family} model, {vlm.n_layers} decoder layers, {vlm.n_vision_layers} vision layers; "
             f"{n_img} images; one forward per batch for every probe; {(extra or {}).get('forwards', '?')} "
             f"forwards in all.")
    lenses = [results[n][0] for n in ("embed_lens", "logit_lens") if n in results]
    norms = results.get("norms", [None])[0]
    first = batches[0][1]
    extra = extra or {}
    if "partition" in results:
        part = extra["partition"]
        rep.heading("Sink / dead / alive partition (paper Secs. 2, 4-6)")
        rep.text(repr(part))
        summary = extra["summary"]
        rep.table(summary.to_pandas(), "share of each group and cross-image similarity of its centroid (App. B.2)")
        rep.figure(summary.plot(), "group shares and cross-image similarity of each group's centroid")
        rep.figure(extra["clusters"].plot(), "anchor clusters of the LM-input visual tokens (τ = 0.9): cross-image "
                                             "similarity per cluster rank and cluster sizes (Fig. 1)")
        labels = results["partition"][0].labels
        for i in range(min(overlays, len(first.images))):
            rep.view(PatchOverlay(first, i, groups=labels, lenses=lenses, title=f"image {i}: groups"))
    if lenses or norms is not None:
        rep.heading("Patch overlays (hover a patch: top-k tokens at the layer of the slider)")
        values = None
        if norms is not None:
            df = norms.to_pandas()
            emb = df[(df.site == "hook_embed") & (df.visual_index >= 0)].sort_values("visual_index")
            values = emb.l2.to_numpy()
        for i in range(min(overlays, len(first.images))):
            rep.view(PatchOverlay(first, i, values=values, lenses=lenses,
                                  title=f"image {i}: colour = L2 norm of the LM input" if values is not None
                                  else f"image {i}"))
    if "sparsity" in extra:
        rep.heading("Semantic sparsity (paper Sec. 6.2, Fig. 7)")
        rep.figure(extra["sparsity"].plot(), "fraction of object tokens whose label is in their EmbedLens top-k, "
                                             "and of all visual tokens with any grounded label, per layer")
    if "labels" in results:
        rep.heading("Label matching A(ℓ): EmbedLens vs LogitLens (paper Fig. 3)")
        rep.figure(results["labels"][0].plot(), "fraction of object labels found in the top-k of any visual token, "
                                                "per layer")
    if norms is not None:
        rep.heading("Norms and layer-to-layer change (paper Figs. 6, 8)")
        rep.figure(norms.plot(), "mean L2 norm and cosine to the previous layer, visual vs text tokens")
    if "sinks" in results:
        rep.heading("BOS sink channels (paper Sec. 4.2, Fig. 4)")
        sk = results["sinks"][0]
        rep.text(f"sink dims used: {sk.sink_dims}; threshold φ > {sk.threshold}")
        rep.figure(sk.plot(), "φ and cosine to the BOS state across sublayers")
        df = sk.to_pandas()
        rep.table(df[df.visual_index >= 0].groupby("site", sort=False).agg(
            phi_max=("phi", "max"), sinks=("sink", "sum"), bos_cos_mean=("bos_cos", "mean")).reset_index(),
            "per site: max φ over visual tokens, number of sink tokens, mean cosine to BOS")
    if "vit_sinks" in results:
        rep.heading("ViT sinks (paper Sec. 4.1)")
        rep.table(results["vit_sinks"][0].to_pandas().head(20), "vision-layer L2 norm per visual token")
    for name in ("embed_lens", "logit_lens"):
        if name in results:
            rep.heading(f"{results[name][0].lens}: top-k per visual token")
            rep.view(lens_topk(results[name][0], 0))
            df = results[name][0].to_pandas()
            top1 = df[df["rank"] == 0].groupby(["site", "token"]).size().rename("visual_tokens").reset_index()
            top1 = top1.sort_values(["site", "visual_tokens"], ascending=[True, False]).groupby("site").head(3)
            rep.table(top1, "most frequent top-1 tokens per site (first batch)")
    return rep
