"""``calibrate(vlm, images)``: find the token partition of a model from a calibration set (paper Secs. 4-6, App. B).

One forward per batch reads, per visual token: the L2 norm at the last vision layer (``probes.ViTSinks``), φ(x) at
``llm_site`` with sink dims given or discovered from the BOS-role token (``probes.SinkChannels``), and the LM-input
vector at ``hook_embed`` (``probes.Activations``). Then, outside the trace:

1. ViT sinks: norm > ``vit_threshold`` (75 for CLIP ViT-L, Sec. 4.1); LLM sinks: φ > ``phi_threshold`` (20, Sec. 4.2).
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
        vis = torch.as_tensor((scr._frame.visual_index >= 0).to_numpy())
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
