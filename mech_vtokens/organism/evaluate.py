"""Evaluate the model organism: held-out VQA accuracy, EmbedLens vs LogitLens, norms, outsized activations.

    python -m mech_vtokens.organism.evaluate [--checkpoint DIR] [--n 800] [--json PATH] [--threads 2]

Everything is plain torch on the HF model (no nnsight), so it can serve as an independent oracle for the package.

* Accuracy: greedy answer (teacher-forced argmax over the answer tokens and the end token, which equals the greedy
  generation being exactly right) per question kind, next to the *baseline* (the most common answer to the same
  question text, i.e. what a blind model could get) and *chance* (1 / number of possible answers).
* EmbedLens: cosine top-5 of each visual-token hidden state against the INPUT embedding matrix (ordinary words
  only, the 5 special tokens excluded). LogitLens: top-5 of ``lm_head(norm(h))``. Layer 0 is what the LM receives
  (the projector output), layer i the output of decoder layer i. Hit rates: how often the colour word of an object
  is in the top-5 on patches that object covers (>= ``COVER_IN``) vs on patches where no object of that colour is
  ("elsewhere"); the same for shape words, background words (empty patches) and the character of text images.
* Norms: L2 norms of visual tokens vs text tokens and word-embedding rows. Outsized activations: phi = max|x| / RMS(x)
  per token (the paper's sink criterion uses phi > 20), and ViT token norms (max / median).
"""
from __future__ import annotations

import argparse
import functools
import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch

from . import world

COVER_IN = 0.5  # a patch "contains" an object's colour / shape if the object covers this fraction of it
# (or if it is the patch the object covers most)
COVER_IN_TEXT = 0.2
HELDOUT_SEED = "heldout"
K = 5


def load(checkpoint=None):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from . import checkpoint_path

    path = Path(checkpoint) if checkpoint else checkpoint_path()
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    model.eval()
    return model, AutoProcessor.from_pretrained(path)


def heldout(n: int = 800) -> list[world.Sample]:
    return world.make_samples(n, HELDOUT_SEED)


def _chunks(xs, n):
    for i in range(0, len(xs), n):
        yield xs[i: i + n]


# ----------------------------------------------------------------------------------------------------- accuracy


@torch.no_grad()
def answer_correct(model, processor, images, questions, answers, batch: int = 64) -> list[bool]:
    """Whether greedy decoding after "<image> {question}" gives exactly "{answer} </s>" (teacher-forced check)."""
    tok = processor.tokenizer
    eos = tok.eos_token_id
    out = []
    items = list(zip(images, questions, answers))
    for ch in _chunks(items, batch):
        texts = [f"<image> {q} {a}" for _, q, a in ch]
        enc = processor(text=texts, images=[im for im, _, _ in ch], return_tensors="pt", padding=True)
        ids, att = enc["input_ids"], enc["attention_mask"]
        # append eos after the last real token of each row
        ids = torch.cat([ids, torch.full((ids.shape[0], 1), tok.pad_token_id)], 1)
        att = torch.cat([att, torch.zeros((att.shape[0], 1), dtype=att.dtype)], 1)
        lens = att.sum(1)
        ids[torch.arange(len(ch)), lens] = eos
        att[torch.arange(len(ch)), lens] = 1
        logits = model(input_ids=ids, attention_mask=att, pixel_values=enc["pixel_values"]).logits
        pred = logits.argmax(-1)
        for r, (_, _, a) in enumerate(ch):
            n_ans = len(a.split()) + 1  # answer words + eos
            end = int(lens[r]) + 1
            target = ids[r, end - n_ans: end]
            got = pred[r, end - n_ans - 1: end - 1]
            out.append(bool(torch.equal(target, got)))
    return out


N_ANSWERS = {"colour": len(world.COLOURS), "shape": len(world.SHAPES), "count": len(world.NUMBERS),
             "text": len(world.CHARACTERS), "position": 9, "background": len(world.BACKGROUNDS)}


@functools.lru_cache(maxsize=4)
def baseline_answers(n: int = 10000) -> dict[str, str]:
    """Most common answer to each question text over ``n`` reference samples (not the held-out set)."""
    by_q: dict[str, Counter] = defaultdict(Counter)
    for s in world.make_samples(n, "baseline-reference"):
        for _, q, a in s.qa:
            by_q[q][a] += 1
    return {q: c.most_common(1)[0][0] for q, c in by_q.items()}


def accuracy(model, processor, samples: list[world.Sample]) -> dict:
    rows = [(s.image, k, q, a) for s in samples for k, q, a in s.qa]
    ok = answer_correct(model, processor, [r[0] for r in rows], [r[2] for r in rows], [r[3] for r in rows])
    majority = baseline_answers()
    res = {}
    for kind in ["colour", "shape", "count", "text", "position", "background"]:
        idx = [i for i, r in enumerate(rows) if r[1] == kind]
        if not idx:
            continue
        base = np.mean([rows[i][3] == majority.get(rows[i][2]) for i in idx])
        res[kind] = {"n": len(idx), "accuracy": round(float(np.mean([ok[i] for i in idx])), 4),
                     "baseline": round(float(base), 4), "chance": round(1.0 / N_ANSWERS[kind], 4)}
    return res


# ----------------------------------------------------------------------------------------------------- lenses


@torch.no_grad()
def hidden_states(model, processor, samples, batch: int = 64):
    """Visual-token states per layer: list over layers 0..L of (n_images, n_patches, d), plus text-token states,
    the max |x|/RMS of the BOS token per layer, and the vision-tower layer -2 token norms."""
    lm = model.model.language_model
    L = len(lm.layers)
    vis = [[] for _ in range(L + 1)]
    txt = [[] for _ in range(L + 1)]
    bos_phi = [[] for _ in range(L + 1)]
    vit_norms = []
    img_id = model.config.image_token_id
    for ch in _chunks(samples, batch):
        enc = processor(text=["<image> describe the image ."] * len(ch), images=[s.image for s in ch],
                        return_tensors="pt", padding=True)
        caught = {}
        hooks = [layer.register_forward_hook(lambda m, i, o, j=j: caught.__setitem__(j + 1,
                                                                                  o[0] if isinstance(o, tuple) else o))
                 for j, layer in enumerate(lm.layers)]
        hooks.append(lm.register_forward_pre_hook(lambda m, a, kw: caught.__setitem__(0, kw["inputs_embeds"]),
                                                  with_kwargs=True))
        try:
            model(**enc, output_hidden_states=False)  # the hooks catch the states
        finally:
            for h in hooks:
                h.remove()
        mask = enc["input_ids"] == img_id
        tmask = (enc["input_ids"] != img_id) & (enc["attention_mask"] == 1)
        tmask[:, 0] = False  # BOS separately
        for layer in range(L + 1):
            h = caught[layer]
            vis[layer].append(h[mask].view(len(ch), -1, h.shape[-1]))
            txt[layer].append(h[tmask])
            b = h[:, 0]
            bos_phi[layer].append((b.abs().amax(-1) / b.pow(2).mean(-1).sqrt()))
        vt = model.model.vision_tower(enc["pixel_values"], output_hidden_states=True)
        vit_norms.append(vt.hidden_states[model.config.vision_feature_layer][:, 1:].norm(dim=-1))
    return ([torch.cat(v) for v in vis], [torch.cat(t) for t in txt], [torch.cat(b) for b in bos_phi],
            torch.cat(vit_norms))


def _topk_words(scores: torch.Tensor, word_ids: torch.Tensor, k: int = K) -> torch.Tensor:
    return word_ids[scores[..., word_ids].topk(k, dim=-1).indices]


def lens_topk(model, h: torch.Tensor, word_ids: torch.Tensor, kind: str) -> torch.Tensor:
    """(n, p, d) -> (n, p, K) token ids of the top-K ordinary words. ``kind``: "embed" (EmbedLens), "logit"
    (LogitLens) or "anti-embed" (the K most NEGATIVE cosines: a diagnostic for anti-aligned features)."""
    if kind == "anti-embed":
        return lens_topk(model, -h, word_ids, "embed")
    if kind == "embed":
        E = model.get_input_embeddings().weight
        s = torch.nn.functional.normalize(h, dim=-1) @ torch.nn.functional.normalize(E, dim=-1).T
    else:
        s = model.lm_head(model.model.language_model.norm(h))
    return _topk_words(s, word_ids)


def patch_labels(samples: list[world.Sample]):
    """Per image: dict word -> (GRID*GRID,) bool "in" mask and "present anywhere in patch" mask."""
    out = []
    for s in samples:
        cov = s.patch_cover().reshape(len(s.objects), -1)
        total = cov.sum(0) if len(cov) else np.zeros(world.GRID * world.GRID)
        lab = {}
        for o, c in zip(s.objects, cov):
            if o.shape == "text":
                w_in, words = COVER_IN_TEXT, [o.char]
            else:
                w_in, words = COVER_IN, [o.shape]
            best = (c == c.max()) & (c > 0)  # thin shapes (star, diamond) may cover no patch by half
            for w in words:
                prev = lab.get(w, (np.zeros_like(c, bool), np.zeros_like(c, bool)))
                lab[w] = (prev[0] | (c >= w_in) | best, prev[1] | (c > 0))
            prev = lab.get(o.colour, (np.zeros_like(c, bool), np.zeros_like(c, bool)))
            lab[o.colour] = (prev[0] | (c >= COVER_IN) | best, prev[1] | (c > 0))
        empty = total == 0
        out.append((lab, empty, s.background))
    return out


def hit_rates(top: torch.Tensor, samples, labels, tok, words: list[str], group: str) -> dict:
    """For each word: P(word in top-K | patch contains it) and P(word in top-K | patch lacks it).

    group "object": contains = covered by an object with that attribute (colour / shape / char), lacks = no object
    with that attribute touches the patch and (for colours) the background is another colour.
    group "background": contains = empty patch on that background, lacks = empty patch on another background.
    """
    res = {}
    top = top.reshape(len(samples), -1, top.shape[-1])
    for w in words:
        wid = tok.convert_tokens_to_ids(w)
        present = (top == wid).any(-1).numpy()  # (n, p)
        hin, hout = [], []
        for i, (lab, empty, bg) in enumerate(labels):
            if group == "background":
                (hin if bg == w else hout).append(present[i][empty])
            else:
                m_in, m_any = lab.get(w, (np.zeros(present.shape[1], bool), np.zeros(present.shape[1], bool)))
                hin.append(present[i][m_in])
                if bg != w:
                    hout.append(present[i][~m_any])
        hin = np.concatenate(hin) if hin else np.zeros(0)
        hout = np.concatenate(hout) if hout else np.zeros(0)
        res[w] = {"in": round(float(hin.mean()), 4) if len(hin) else None, "n_in": int(len(hin)),
                  "elsewhere": round(float(hout.mean()), 4) if len(hout) else None}
    valid = [r for r in res.values() if r["in"] is not None and r["n_in"] >= 20]
    macro = {"in": round(float(np.mean([r["in"] for r in valid])), 4) if valid else float("nan"),
             "elsewhere": round(float(np.mean([r["elsewhere"] or 0.0 for r in valid])), 4) if valid else float("nan")}
    return {"macro": macro, "per_word": res}


@torch.no_grad()
def lens_report(model, processor, samples) -> dict:
    tok = processor.tokenizer
    special = set(tok.all_special_ids)
    word_ids = torch.tensor([i for i in range(model.get_input_embeddings().weight.shape[0]) if i not in special])
    vis, txt, bos_phi, vit_norms = hidden_states(model, processor, samples)
    labels = patch_labels(samples)
    groups = {"colour": (world.COLOUR_WORDS, "object"), "shape": (world.SHAPE_WORDS, "object"),
              "background": (list(world.BACKGROUNDS), "background"), "text": (world.CHARACTERS, "object")}
    E = model.get_input_embeddings().weight
    emb_norm = E[word_ids].norm(dim=-1)
    rep = {"random_hit_rate": round(K / len(word_ids), 4), "n_images": len(samples), "layers": []}
    for layer, h in enumerate(vis):
        row = {"layer": layer}
        for lens in ["embed", "logit", "anti-embed"]:
            top = lens_topk(model, h, word_ids, lens)
            row[lens] = {g: hit_rates(top, samples, labels, tok, ws, kind) for g, (ws, kind) in groups.items()}
            # which words dominate top-1 (collapse check)
            c = Counter(tok.convert_ids_to_tokens(top[..., 0].reshape(-1).tolist()))
            row[lens]["top1_most_common"] = [(w, round(n / top[..., 0].numel(), 3)) for w, n in c.most_common(3)]
        hv = h.reshape(-1, h.shape[-1])
        ht = txt[layer]
        phi_v = hv.abs().amax(-1) / hv.pow(2).mean(-1).sqrt()
        phi_t = ht.abs().amax(-1) / ht.pow(2).mean(-1).sqrt()
        cos_best = (torch.nn.functional.normalize(hv, dim=-1)
                    @ torch.nn.functional.normalize(E[word_ids], dim=-1).T).amax(-1)
        row["norms"] = {"visual_mean": round(float(hv.norm(dim=-1).mean()), 3),
                        "visual_max": round(float(hv.norm(dim=-1).max()), 3),
                        "text_mean": round(float(ht.norm(dim=-1).mean()), 3)}
        row["phi"] = {"visual_max": round(float(phi_v.max()), 2), "visual_median": round(float(phi_v.median()), 2),
                      "visual_gt20": int((phi_v > 20).sum()), "text_max": round(float(phi_t.max()), 2),
                      "bos": round(float(bos_phi[layer].mean()), 2)}
        row["best_word_cosine_mean"] = round(float(cos_best.mean()), 4)
        rep["layers"].append(row)
    rep["word_embedding_norm"] = {"mean": round(float(emb_norm.mean()), 4), "min": round(float(emb_norm.min()), 4),
                                  "max": round(float(emb_norm.max()), 4)}
    v0 = vis[0].reshape(-1, vis[0].shape[-1])
    rep["visual_to_word_norm_ratio"] = round(float(v0.norm(dim=-1).mean() / emb_norm.mean()), 2)
    rep["vit_layer_m2_norm"] = {"median": round(float(vit_norms.median()), 3), "max": round(float(vit_norms.max()), 3),
                                "max_over_median": round(float(vit_norms.max() / vit_norms.median()), 2)}
    # cross-image similarity of the LM-input visual tokens: empty-background patches vs object patches
    vn = torch.nn.functional.normalize(vis[0], dim=-1)
    empty = torch.tensor(np.stack([lab[1] for lab in labels]))
    sims = {}
    for bg in world.BACKGROUNDS:
        sel = torch.tensor([lab[2] == bg for lab in labels])
        e = vn[sel][empty[sel]]
        if len(e) > 1:
            mu = torch.nn.functional.normalize(e.mean(0), dim=-1)
            sims[f"empty_{bg}"] = round(float((e @ mu).mean()), 4)
    o = vn[~empty]
    mu = torch.nn.functional.normalize(o.mean(0), dim=-1)
    sims["object_patches"] = round(float((o @ mu).mean()), 4)
    rep["cos_to_group_mean"] = sims
    rep["sinks"] = {
        "any_visual_phi_gt20": any(r["phi"]["visual_gt20"] > 0 for r in rep["layers"]),
        "max_visual_phi": max(r["phi"]["visual_max"] for r in rep["layers"]),
    }
    return rep


# ----------------------------------------------------------------------------------------------------- report


def measure(checkpoint=None, n: int = 800, n_lens: int = 400) -> dict:
    model, processor = load(checkpoint)
    samples = heldout(n)
    return {"checkpoint": str(checkpoint or "shipped"), "n_heldout_images": n,
            "accuracy": accuracy(model, processor, samples), "lens": lens_report(model, processor, samples[:n_lens])}


def _f(x) -> str:
    return "  -  " if x is None else f"{x:.2f}"


def format_report(r: dict) -> str:
    lines = ["Held-out accuracy (greedy answer exactly right)",
             f"{'kind':<11}{'n':>6}{'acc':>8}{'baseline':>10}{'chance':>8}"]
    for k, v in r["accuracy"].items():
        lines.append(f"{k:<11}{v['n']:>6}{v['accuracy']:>8.3f}{v['baseline']:>10.3f}{v['chance']:>8.3f}")
    lens = r["lens"]
    lines += ["", f"Lens hit rates, top-{K} of ordinary words (random {lens['random_hit_rate']:.3f}); "
                  f"in / elsewhere (macro)",
              f"{'layer':<6}" + "".join(f"{lname + ':' + g:>18}" for lname in ["embed", "logit"]
                                        for g in ["colour", "shape", "backgr", "text"])]
    for row in lens["layers"]:
        cells = []
        for lname in ["embed", "logit"]:
            for g in ["colour", "shape", "background", "text"]:
                m = row[lname][g]["macro"]
                cells.append(f"{m['in']:.2f}/{m['elsewhere']:.2f}")
        lines.append(f"{row['layer']:<6}" + "".join(f"{c:>18}" for c in cells))
    lines += ["", "Anti-EmbedLens (word among the 5 most NEGATIVE cosines) in / elsewhere at layer 0: "
              + "; ".join(f"{g} {lens['layers'][0]['anti-embed'][g]['macro']['in']:.2f}/"
                          f"{lens['layers'][0]['anti-embed'][g]['macro']['elsewhere']:.2f}"
                          for g in ["colour", "shape"])]
    lines += ["", "Per-colour EmbedLens hit rate at the LM input (layer 0) and the best layer: in / elsewhere"]
    best = max(lens["layers"],
               key=lambda row: row["embed"]["colour"]["macro"]["in"] - row["embed"]["colour"]["macro"]["elsewhere"])
    for w in world.COLOUR_WORDS:
        a = lens["layers"][0]["embed"]["colour"]["per_word"][w]
        b = best["embed"]["colour"]["per_word"][w]
        lines.append(f"  {w:<8} L0 {_f(a['in'])}/{_f(a['elsewhere'])}   "
                     f"L{best['layer']} {_f(b['in'])}/{_f(b['elsewhere'])}  (n_in {a['n_in']})")
    lines += ["", "Per-shape EmbedLens hit rate at layer 0: in / elsewhere"]
    for w in world.SHAPE_WORDS:
        a = lens["layers"][0]["embed"]["shape"]["per_word"][w]
        lines.append(f"  {w:<8} {_f(a['in'])}/{_f(a['elsewhere'])} (n_in {a['n_in']})")
    lines += ["", "EmbedLens top-1 most common words per layer: "
              + "; ".join(f"L{row['layer']} {row['embed']['top1_most_common']}" for row in lens["layers"])]
    lines += ["", f"{'layer':<6}{'|vis|':>8}{'|txt|':>8}{'best cos':>9}{'phi vis max':>12}{'phi vis med':>12}"
                  f"{'phi txt max':>12}{'phi bos':>9}"]
    for row in lens["layers"]:
        n, p = row["norms"], row["phi"]
        lines.append(f"{row['layer']:<6}{n['visual_mean']:>8.2f}{n['text_mean']:>8.2f}{row['best_word_cosine_mean']:>9.3f}"
                     f"{p['visual_max']:>12.1f}{p['visual_median']:>12.1f}{p['text_max']:>12.1f}{p['bos']:>9.1f}")
    lines.append(f"word-embedding norms {lens['word_embedding_norm']}; visual/word norm ratio at input "
                 f"{lens['visual_to_word_norm_ratio']}")
    lines.append(f"ViT layer -2 token norms {lens['vit_layer_m2_norm']}")
    lines.append(f"cosine to group mean (LM input): {lens['cos_to_group_mean']}")
    lines.append(f"sinks: {lens['sinks']}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=None)
    ap.add_argument("--n", type=int, default=800, help="held-out images for accuracy")
    ap.add_argument("--n-lens", type=int, default=400, help="held-out images for the lens measurements")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    r = measure(a.checkpoint, a.n, a.n_lens)
    print(format_report(r))
    if a.json:
        a.json.write_text(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()
