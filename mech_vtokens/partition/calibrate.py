"""``calibrate(vlm, images)``: find the token partition of a model from a calibration set (paper Secs. 4-6, App. B).

One forward per batch reads, per visual token: the L2 norm at the last vision layer (``probes.ViTSinks``), φ(x) at
``llm_site`` with sink dims given or discovered from the BOS-role token (``probes.SinkChannels``), and the LM-input
vector at ``hook_embed`` (``probes.Activations``). Then, outside the trace:

1. ViT sinks: norm > ``vit_threshold`` (75 for CLIP ViT-L, Sec. 4.1); LLM sinks: φ > ``phi_threshold`` (20, Sec. 4.2).
   φ <= sqrt(d_model): a ``phi_threshold`` at or above it is unreachable and warned about before any forward;
   :func:`sink_thresholds` calibrates both thresholds on data for models the paper's numbers do not fit.
2. Dead (Sec. 5, App. B): per image, anchor clustering (τ) of the remaining tokens; every cluster of >= ``min_size``
   tokens gets its cross-image stability s (mean over the other images of max_j cos to their clusters, App. B.2).
   Stable clusters (s >= ``stable``) are grouped across images by centroid cosine >= τ; a group is text-distant
   when its direction's cosine to the text-embedding centroid (mean input embedding of the non-special tokens) is
   below the mean of the remaining visual tokens'. The dead prototype is the (normalised) mean direction of the
   text-distant stable group with the most tokens; new tokens are dead when their cosine to it is >= τ. If no group
   qualifies there is no dead group (``info["dead_found"]`` False).
3. ``rule="reference"``: ``reference="llava-1.5-7b"`` (ids 1141 / 26673 / 30296, top-3, the authors' code) or
   a dict ``{group: [ids]}``; by default the ids are DERIVED: steps 1-2, then per calibration image the EmbedLens
   top-1 of each group's centroid; a group's id is the most frequent one (ties: the smaller id).
"""

from __future__ import annotations

from collections import Counter

import torch

from ..errors import InputError
from .clustering import _check_tau, anchor_clusters, centroid_labels, cross_image_similarity
from ..loop import DEFAULT_BATCH_SIZE, batches, forward, keywords
from .partition import GROUPS, PRESETS, Partition, model_identity


def _gather(vlm, images, prompts, batch_size, vit_layer, vit_threshold, sink_dims, phi_threshold, llm_site, remote,
            progress):
    from mech_vtokens.probes import Activations, SinkChannels, ViTSinks

    per_image, dims, n_forwards = [], set(), 0
    for _, batch in batches(vlm, images, prompts, batch_size, progress, desc="calibration"):
        if batch.n_visual == 0:
            raise InputError("the calibration set has no visual tokens: pass images with their placeholders in the "
                             "prompts (or prompts=None for the default prompt)")
        sc = SinkChannels(dims=sink_dims, threshold=phi_threshold, sites=[llm_site], reference_site=llm_site)
        acts, vit = Activations(["hook_embed"], visual_only=True), ViTSinks(layer=vit_layer, threshold=vit_threshold)
        res = forward(vlm, batch, [acts, vit, sc], remote=remote)
        act, vs, scr = res[acts], res[vit], res[sc]
        n_forwards += 1
        dims |= set(scr.sink_dims)
        site = vlm.adapter.canonical(llm_site)
        vis = torch.as_tensor((scr._frame.visual_index >= 0).to_numpy(copy=True))  # writable (pandas' is not)
        phi = torch.nan_to_num(scr.phi[site][vis], nan=0.0)
        x = act["hook_embed"].detach().float()
        img = batch.tokens["image"]
        for i in torch.unique(img).tolist():
            m = img == i
            per_image.append({"x": x[m], "norm": vs.l2[m].float(), "phi": phi[m]})
    return per_image, sorted(dims), n_forwards


def _text_centroid(vlm):
    from mech_vtokens.probes.lens import _special_ids

    E = vlm.embedding_matrix.detach().float()
    keep = torch.ones(E.shape[0], dtype=torch.bool)
    keep[_special_ids(vlm.tokenizer, E.shape[0])] = False
    return E[keep].mean(0)


def _find_dead(per_image, tau, stable, min_size, mu):
    clusters, info = [], {}
    rest_cos = []
    for im in per_image:
        rest = ~(im["vit"] | im["llm"])
        xr = im["x"][rest]
        if len(xr) == 0:
            clusters.append(None)
            continue
        rest_cos.append(torch.nn.functional.cosine_similarity(xr, mu[None], dim=-1))
        clusters.append(anchor_clusters(xr, tau))
    valid = [c for c in clusters if c is not None]
    if len(valid) < 2:
        raise InputError("cross-image statistics need at least 2 calibration images with non-sink visual tokens")
    cross = cross_image_similarity(valid, top=5)
    info["cross_image_top5"] = {"mean": cross.mean.tolist(), "var": cross.var.tolist()}
    info["top5_sizes"] = [c.top_sizes(5) for c in valid]
    # every cluster of >= min_size tokens: its stability over the other images
    cand = []  # (direction, size, stability)
    for a, ca in enumerate(valid):
        for i, size in enumerate(ca.sizes):
            if size < min_size:
                break
            s = [float(cross_image_similarity([ca.centroids[i:i + 1], cb.centroids]).per_pair[(0, 1)][0])
                 for b, cb in enumerate(valid) if b != a]
            cand.append((torch.nn.functional.normalize(ca.centroids[i], dim=0), size, sum(s) / len(s)))
    stable_c = [c for c in cand if c[2] >= stable]
    groups = []  # [sum of directions, tokens, n clusters]
    for d, size, _ in sorted(stable_c, key=lambda c: -c[1]):
        for g in groups:
            if float(torch.dot(torch.nn.functional.normalize(g[0], dim=0), d)) >= tau:
                g[0], g[1], g[2] = g[0] + d, g[1] + size, g[2] + 1
                break
        else:
            groups.append([d.clone(), size, 1])
    baseline = float(torch.cat(rest_cos).mean())
    info["text_cos_baseline"] = baseline
    far = []
    for g in groups:
        direction = torch.nn.functional.normalize(g[0], dim=0)
        tc = float(torch.nn.functional.cosine_similarity(direction, mu, dim=0))
        if tc < baseline:
            far.append((g[1], direction, tc, g[2]))
    info["stable_groups"] = len(groups)
    if not far:
        info["dead_found"] = False
        return None, info
    tokens, direction, tc, n = max(far, key=lambda f: f[0])
    info.update(dead_found=True, dead_text_cos=tc, dead_clusters=n, dead_calibration_tokens=tokens)
    return direction[None], info


# C901: the paper's calibration steps (sinks, clusters, dead/alive, per rule) read as one sequence
@keywords
def calibrate(vlm, images, prompts=None, *, rule: str = "statistical", tau: float = 0.9, stable: float = 0.95,  # noqa: C901
              min_size: int = 2, vit_layer: int = -1, vit_threshold: float = 75.0, sink_dims="auto",
              phi_threshold: float = 20.0, llm_site: str | None = None, reference=None, k: int = 3,
              batch_size: int = DEFAULT_BATCH_SIZE, remote=False, progress: bool = False) -> Partition:
    """Calibrate a :class:`Partition` of ``vlm``'s visual tokens on ``images`` (>= 2); see the module docstring.

    ``rule``: "statistical" (the paper's definitions) or "reference" (EmbedLens reference ids; ``reference``:
    "llava-1.5-7b", a dict {group: [ids]}, or None = derived here). ``llm_site``: where φ is read (default
    ``blocks.1.hook_resid_post``, after MLP-2; the last layer on 1-layer models). ``k``: top-k of the reference rule.
    """
    if rule not in ("statistical", "reference"):
        raise InputError(f"rule={rule!r}: choose 'statistical' (the paper's definitions) or 'reference' (EmbedLens "
                         f"reference ids)")
    tau = _check_tau(tau)
    if not 0 < stable <= 1:
        raise InputError(f"stable={stable!r}: the cross-image similarity threshold must be in (0, 1] (paper: 0.98)")
    if not isinstance(k, int) or k <= 0:
        raise InputError(f"k={k!r}: give a positive top-k for the reference rule (the authors' code uses 3)")
    images = list(images) if images is not None else []
    identity = model_identity(vlm)
    if rule == "reference" and reference is not None:
        if isinstance(reference, str):
            if reference not in PRESETS:
                raise InputError(f"reference={reference!r}: presets are {list(PRESETS)}; or pass {{group: [ids]}}")
            pre = PRESETS[reference]
            if identity["vocab"] < pre["vocab"]:
                raise InputError(f"the {reference} reference ids need a {pre['vocab']}-token vocabulary; this model "
                                 f"has {identity['vocab']}: derive the ids with reference=None")
            ids, k = pre["ids"], pre["k"]
        else:
            ids = {g: [int(i) for i in v] for g, v in dict(reference).items()}
            bad = [g for g in ids if g not in GROUPS[:3]]
            if bad:
                raise InputError(f"reference groups {bad}: use 'vit_sink', 'llm_sink', 'dead'")
            out = [i for v in ids.values() for i in v if not 0 <= i < identity["vocab"]]
            if out:
                raise InputError(f"reference ids {out} are outside the vocabulary (0..{identity['vocab'] - 1})")
        return Partition("reference", identity, reference={"k": k, "ids": ids},
                         info={"source": reference if isinstance(reference, str) else "given"}, vlm=vlm)
    if len(images) < 2:
        raise InputError(f"calibration needs at least 2 images (cross-image statistics), got {len(images)}")
    warn_unreachable_phi(vlm, phi_threshold, "calibrate")  # before any forward
    if llm_site is None:
        llm_site = "blocks.1.hook_resid_post" if vlm.n_layers > 1 else "blocks.0.hook_resid_post"
    llm_site = vlm.adapter.canonical(llm_site)
    per_image, dims, n_fw = _gather(vlm, images, prompts, batch_size, vit_layer, vit_threshold, sink_dims,
                                    phi_threshold, llm_site, remote, progress)
    for im in per_image:
        im["vit"] = im["norm"] > vit_threshold
        im["llm"] = torch.zeros_like(im["vit"])
        if dims:
            im["llm"] = (im["phi"] > phi_threshold) & ~im["vit"]
    mu = _text_centroid(vlm)
    proto, info = _find_dead(per_image, tau, stable, min_size, mu)
    info.update(n_images=len(per_image), n_forwards=n_fw, sink_dims=dims)
    vit = {"layer": vit_layer, "threshold": float(vit_threshold)}
    llm = {"site": llm_site, "dims": dims, "threshold": float(phi_threshold)}
    dead = None if proto is None else {"prototype": proto, "tau": tau}
    part = Partition("statistical", identity, vit, llm, dead, info=info, vlm=vlm)
    if rule == "statistical":
        return part
    # derived reference ids: the EmbedLens top-1 of each group's centroid, most frequent over images
    votes = {g: Counter() for g in GROUPS[:3]}
    for im in per_image:
        m = {"vit_sink": im["vit"], "llm_sink": im["llm"] & ~im["vit"]}
        if proto is not None:
            cos = torch.nn.functional.normalize(im["x"], dim=-1) @ torch.nn.functional.normalize(proto, dim=-1).T
            m["dead"] = (cos[:, 0] >= tau - 1e-6) & ~im["vit"] & ~im["llm"]
        for g, mask in m.items():
            if bool(mask.any()):
                ids, _ = centroid_labels(vlm, im["x"][mask].mean(0, keepdim=True), k=1)
                votes[g][int(ids[0, 0])] += 1
    ids = {g: [min(c for c, n in v.items() if n == max(v.values()))] for g, v in votes.items() if v}
    info = dict(info, votes={g: dict(v) for g, v in votes.items()}, source="derived")
    return Partition("reference", identity, reference={"k": k, "ids": ids}, info=info, vlm=vlm)


# ---- thresholds a model can reach (issue: the paper's numbers are LLaMA-7B's / CLIP ViT-L's) --------------------

PAPER_PHI, PAPER_VIT = 20.0, 75.0  # paper Secs. 4.2 / 4.1: LLaMA-2-7B (d = 4096, sqrt(d) = 64), CLIP ViT-L/14


def phi_bound(vlm) -> float:
    """sqrt(d_model): φ(x) = max_d |x_d| / RMS(x) can never exceed it (equality: all the energy in one channel)."""
    import math

    return math.sqrt(vlm.adapter.d_model)


def unreachable_phi(vlm, threshold, who: str = "SinkChannels") -> str | None:
    """The warning text when φ > ``threshold`` can never hold on ``vlm`` (threshold >= sqrt(d_model)), else None."""
    bound = phi_bound(vlm)
    if threshold is None or threshold < bound:
        return None
    return (f"{who}: the sink threshold φ > {threshold:g} is out of reach for this model: φ(x) = max|x_d| / RMS(x) "
            f"<= sqrt(d) = {bound:.1f} (d = {vlm.adapter.d_model}), so it would report 0 sinks whatever the input "
            f"(the paper's 20 is for d = 4096, sqrt(d) = 64). Use a data-calibrated threshold: "
            f"mech_vtokens.partition.sink_thresholds(vlm, images)['phi'], or one below {bound:.1f}")


def warn_unreachable_phi(vlm, threshold, who: str = "SinkChannels") -> bool:
    """Warn (:class:`~mech_vtokens.errors.ThresholdWarning`, before any forward) when φ > ``threshold`` is
    unreachable on ``vlm``; True if it warned."""
    import warnings

    from ..errors import ThresholdWarning

    msg = unreachable_phi(vlm, threshold, who)
    if msg:
        warnings.warn(msg, ThresholdWarning, stacklevel=3)
    return msg is not None


def _phi_all(x):
    """max_d |x_d| / RMS(x) over ALL channels, per row of x (..., d)."""
    return x.abs().amax(-1) / x.pow(2).mean(-1).sqrt().clamp_min(1e-30)


def _midpoint(typical: float, outlier: float, min_ratio: float):
    """The log-space midpoint sqrt(typical * outlier) when ``outlier`` stands out (>= min_ratio x typical), else
    None (no outlier group to separate)."""
    import math

    if not (typical > 0 and outlier >= min_ratio * typical):
        return None
    return math.sqrt(typical * outlier)


@keywords
def sink_thresholds(vlm, images, prompts=None, *, llm_site: str | None = None, vit_layer: int | None = None,
                    min_ratio: float = 4.0, batch_size: int = DEFAULT_BATCH_SIZE, remote=False,
                    progress: bool = False) -> dict:
    """Data-calibrated sink thresholds for ``vlm`` (one forward per batch of ``images``), for models where the
    paper's numbers do not apply (φ > 20 is unreachable when sqrt(d_model) <= 20; the ViT-sink 75 is CLIP ViT-L's).

    Rule (both in log space, between the typical token and the known outlier):

    - ``"phi"``: sqrt(m_vis * m_bos), m_vis = median over visual tokens of max_d |x_d| / RMS(x) at ``llm_site``
      (all channels), m_bos = median over prompts of the same for the BOS-role token (first text token, the sink
      by construction). φ cannot exceed sqrt(d), so "stands out" is measured in that range: None unless m_bos
      lies in the upper half of the log range from m_vis to sqrt(d) (m_bos >= sqrt(m_vis * sqrt(d))), i.e. no
      BOS outlier, no sink channels at that site. (LLaMA-7B: m_bos ~ 60 of 64; a random 64-wide state: ~3.)
    - ``"vit"``: sqrt(n_med * n_max) over the ViTSinks L2 norm of every visual token at ``vit_layer`` (default: the
      layer the LM receives). None when n_max < ``min_ratio`` * n_med (no high-norm outliers; the L2 norm has no
      width bound). ``min_ratio`` (4): real ViT sinks stand out by an order of magnitude (Darcet et al. 2024).

    A model without sinks (the default organism: ViT max 2.6x median, BOS φ below the visual tokens') gets None:
    "no sinks" is then the finding, not an artefact of the threshold.

    Returns ``{"phi", "vit", "phi_bound" (sqrt(d)), "phi_visual_median", "phi_bos", "vit_median", "vit_max",
    "llm_site", "n_images", "n_forwards", "rule"}``; pass them on as ``SinkChannels(threshold=t["phi"])``,
    ``ViTSinks(threshold=t["vit"])`` or ``calibrate(..., phi_threshold=t["phi"], vit_threshold=t["vit"])``.
    """
    import math

    from mech_vtokens.probes import Activations, ViTSinks
    from mech_vtokens.probes.sink_channels import _bos_positions

    if not min_ratio > 1:
        raise InputError(f"min_ratio={min_ratio!r}: give a ratio > 1 (how far the outlier must stand out)")
    if llm_site is None:
        llm_site = "blocks.1.hook_resid_post" if vlm.n_layers > 1 else "blocks.0.hook_resid_post"
    site = vlm.adapter.canonical(llm_site)
    vis_phi, bos_phi, norms, n_fw, n_img = [], [], [], 0, 0
    for _, batch in batches(vlm, images, prompts, batch_size, progress, desc="thresholds"):
        if batch.n_visual == 0:
            raise InputError("sink_thresholds needs visual tokens: pass images with their placeholders")
        # only its norms are read: a threshold every token exceeds, so no "no token exceeds 75" warning here
        acts, vits = Activations([site]), ViTSinks(layer=vit_layer, threshold=1e-12)
        res = forward(vlm, batch, [acts, vits], remote=remote)
        act, vs = res[acts], res[vits]
        n_fw, n_img = n_fw + 1, n_img + len(batch.image_sizes)
        phi = _phi_all(act[site].detach().float())  # (rows, seq)
        vis_phi.append(phi[batch.visual_mask])
        bos_phi.append(phi[torch.arange(phi.shape[0]), _bos_positions(batch)])
        norms.append(vs.l2.float())
    vis_phi, bos_phi, norms = torch.cat(vis_phi), torch.cat(bos_phi), torch.cat(norms)
    m_vis, m_bos = float(vis_phi.median()), float(bos_phi.median())
    n_med, n_max = float(norms.median()), float(norms.max())
    bound = phi_bound(vlm)
    phi = _midpoint(m_vis, m_bos, math.sqrt(bound / m_vis) if m_vis > 0 else math.inf)
    return {"phi": phi, "vit": _midpoint(n_med, n_max, min_ratio),
            "phi_bound": bound, "phi_visual_median": m_vis, "phi_bos": m_bos, "vit_median": n_med,
            "vit_max": n_max, "llm_site": site, "n_images": n_img, "n_forwards": n_fw,
            "rule": "log-space midpoint between the typical visual token and the outlier"}
