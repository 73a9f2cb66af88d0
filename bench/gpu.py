"""The device check: every family's real-config fixture on a GPU (or, smaller, on the CPU), one table.

    python bench/gpu.py                       # CUDA if there is one: real widths, bf16, 2 + 2 layers
    python bench/gpu.py --device cpu --small  # what CI runs: shrunk widths, fp32 (slow but alive)
    bash scripts/gpu_check.sh                 # the same through the project's venv

Per checkpoint (the real hub files, only layers — and with ``--small`` widths — shrunk; see
``mech_vtokens.testing.real_model``): load through ``mech_vtokens.load``; a plain HF forward; the full probe suite in
one forward (EmbedLens / LogitLens top-k ids compared with an fp32 computation on the same hidden states — the
contract the lenses make); every intervention through the nnsight trace AND through plain torch hooks
(``interventions.applied``), last-token logits compared; ``mv.generate`` under ``Prune`` against HF ``generate``
under ``applied`` (ids equal); every result's tensors on the CPU; peak memory and seconds per image of the suite next
to the plain forward. Exit status 1 when any check fails.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

CACHE = Path(os.environ.get("MECH_VTOKENS_BENCH_CACHE", Path.home() / ".cache" / "mech-vtokens-bench")) / "real"


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class _Peak:
    """Peak memory above the level at entry: CUDA allocator stats on a GPU, sampled RSS on the CPU."""

    def __init__(self, device):
        self.device, self.bytes = device, 0

    def run(self, fn):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            out = [None]
            out[0] = fn()
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated() - base
            return out[0]
        from common import peak_above

        out = [None]
        self.bytes = peak_above(lambda: out.__setitem__(0, fn()))
        return out[0]


def _timed(fn, device, repeats):
    best, out = float("inf"), None
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        out = fn()
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return best, out


def _on_cpu(obj, seen=None) -> bool:
    """Every tensor reachable from a result's attributes (dicts, lists, tuples) lives on the CPU."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return True
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return obj.device.type == "cpu"
    if isinstance(obj, dict):
        return all(_on_cpu(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(_on_cpu(v, seen) for v in obj)
    if hasattr(obj, "__dict__") and type(obj).__module__.split(".")[0] in ("probes", "interventions",
                                                                            "mech_vtokens"):
        return all(_on_cpu(v, seen) for k, v in vars(obj).items() if not k.startswith("_batch"))
    return True


def _lens_reference(states, matrix, k, rows, normalize):
    """fp32 scores of ``states`` against ``matrix[:rows]`` (cosine for EmbedLens, dot for LogitLens): a function
    ``score(ids) -> (n, k)`` and the fp32 top-k (values, ids)."""
    m = matrix[:rows].float()
    h = states.float()
    if normalize:
        m = m / m.norm(dim=1, keepdim=True).clamp_min(1e-12)
        h = h / h.norm(dim=1, keepdim=True).clamp_min(1e-12)
    vals, ids = [], []
    for s in range(0, h.shape[0], 256):
        v, i = (h[s:s + 256] @ m.T).topk(k, dim=1)
        vals.append(v.cpu())
        ids.append(i.cpu())

    def score(got):
        got = got.to(m.device).clamp(0, rows - 1)
        return torch.einsum("nd,nkd->nk", h, m[got]).cpu()

    return torch.cat(vals), torch.cat(ids), score


def _agreement(ours, ref) -> tuple[int, int, int]:
    """(tokens whose top-k ids equal fp32's, tokens equal up to exact fp32 ties, tokens)."""
    vals, ids, score = ref
    same = (ours == ids).all(1)
    tol = 1e-6 * vals.abs().amax(1, keepdim=True).clamp_min(1.0)
    tie = ((score(ours) - vals).abs() <= tol).all(1) & (ours >= 0).all(1)
    return int(same.sum()), int((same | tie).sum()), len(ids)


def images_for(small: bool):
    """Two images, neither square. ``small``: close to square and small, so every processor keeps them to a few
    hundred tokens (InternVL then uses one tile; real photos give it up to 13 tiles = 3328 tokens per image)."""
    from mech_vtokens import testing as T

    sizes = [(112, 100), (100, 112)] if small else [(640, 480), (480, 720)]
    return [T.image(size=1, seed=i).resize(wh) for i, wh in enumerate(sizes)]


def prompts_for(vlm, n):
    question = "What is in the image?"
    if hasattr(vlm, "prompt"):
        return [vlm.prompt(question) for _ in range(n)]
    content = [{"type": "image"}, {"type": "text", "text": question}]
    return [vlm.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
            for _ in range(n)]


def check(checkpoint: str, device: str, dtype, small: bool, layers: int, repeats: int, new_tokens: int) -> dict:
    import mech_vtokens as mv
    from mech_vtokens import testing as T
    from mech_vtokens.interventions import (AttentionKnockout, Positions, Prune, Rescale, VisualEntry, VisualExit,
                                            ZeroSublayer, applied)
    from mech_vtokens.probes import Activations, EmbedLens, LogitLens, NormTracker, SinkChannels, ViTSinks

    row = {"checkpoint": checkpoint}
    path = T.real_model(checkpoint, CACHE / ("small" if small else "real") / checkpoint.replace("/", "__"),
                        layers=layers, vision_layers=layers, real_widths=not small)
    t = time.perf_counter()
    vlm = mv.load(path, dtype=dtype, device_map=device)
    _sync(device)
    row["family"] = vlm.family
    row["load_s"] = time.perf_counter() - t
    images = images_for(small)
    prompts = prompts_for(vlm, len(images))
    batch = vlm.prepare(images, prompts)
    row["visual_tokens"] = batch.n_visual
    dev_inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.inputs.items()}
    n_img = len(images)
    peak = _Peak(device)

    def plain():  # what mv.run's forward does: HF's default forward (logits at every position)
        with torch.no_grad():
            vlm.hf(**dev_inputs)

    peak.run(plain)
    row["fwd_peak_GiB"] = peak.bytes / 2**30
    fwd_s, _ = _timed(plain, device, repeats)
    row["fwd_s_per_img"] = fwd_s / n_img

    lm_sites = ["hook_embed"] + [f"blocks.{i}.hook_resid_post" for i in range(vlm.n_layers)]
    suite = [EmbedLens(k=5), LogitLens(k=5), NormTracker(), SinkChannels(), ViTSinks()]

    def run_suite():
        return mv.run(vlm, images, prompts, probes=suite)

    peak.run(run_suite)
    row["suite_peak_GiB"] = peak.bytes / 2**30
    suite_s, res = _timed(run_suite, device, repeats)
    row["suite_s_per_img"] = suite_s / n_img
    row["suite/fwd"] = suite_s / fwd_s
    row["results_on_cpu"] = all(_on_cpu(r) for r in res.values())
    for r in res.values():  # tables build on the CPU
        r.to_pandas()

    # ---- lens ids vs fp32 on the same hidden states --------------------------------------------------------
    acts = mv.run(vlm, images, prompts, probes=[Activations(lm_sites, visual_only=True)])["activations"]
    embed, logit = res["embed_lens"], res["logit_lens"]
    rows = min(len(vlm.tokenizer), vlm.embedding_matrix.shape[0])
    E = vlm.embedding_matrix.detach()
    U = vlm.unembed.weight.detach()
    exact = upto_ties = total = 0
    for site in lm_sites:
        h = acts[site].to(E.device)
        ref_e = _lens_reference(h, E, 5, rows, normalize=True)
        with torch.no_grad():
            normed = vlm.final_norm(h.to(U.dtype))
        ref_l = _lens_reference(normed, U, 5, rows, normalize=False)
        for ours, ref in ((embed.ids[site], ref_e), (logit.ids[site], ref_l)):
            a, b, n = _agreement(ours, ref)
            exact, upto_ties, total = exact + a, upto_ties + b, total + n
    # "exact w.r.t. fp32": the ids an fp32 computation on the model's own states gives (ties may order either way)
    row["lens_ids_eq_fp32"] = f"{exact}/{total}" + (f" ({upto_ties - exact} ties)" if upto_ties > exact else "")
    row["lens_ok"] = upto_ties == total

    # ---- every intervention: nnsight trace vs plain torch hooks (last-position logits: full logits over a 150k
    # vocabulary would dwarf everything else) ------------------------------------------------------------------------
    def last_logits(**kw):
        with torch.no_grad():
            return vlm.hf(**dev_inputs, logits_to_keep=1, **kw).logits[:, -1].float().cpu()

    def traced_last(got):
        h = got["ln_final.hook_normalized"][:, -1]
        with torch.no_grad():
            return vlm.unembed(h.to(vlm.unembed.weight.device)).float().cpu()

    clean_last = last_logits()
    some = Positions(list(range(0, batch.n_visual, 3)))
    cases = {"Prune": Prune(some), "ZeroSublayer": ZeroSublayer(some, layers=0, sublayer="mlp"),
             "Rescale": Rescale(some), "VisualEntry": VisualEntry(1), "VisualExit": VisualExit(1)}
    worst, ok = 0.0, True
    for name, iv in cases.items():
        got = mv.run(vlm, images, prompts, probes=[Activations(["ln_final.hook_normalized"])],
                     interventions=[iv])["activations"]
        nn_last = traced_last(got)
        with applied(vlm, batch, interventions=[iv]):
            hook_last = last_logits()
        diff = float((nn_last - hook_last).abs().max())
        changed = float((hook_last - clean_last).abs().max()) > 0
        worst = max(worst, diff)
        ok &= bool(torch.isfinite(nn_last).all()) and changed and _on_cpu(got) and diff <= 1e-3 * max(
            1.0, float(hook_last.abs().max()))
    row["interventions_maxdiff"] = worst
    row["interventions_ok"] = ok
    eager = mv.load(path, dtype=dtype, device_map=device, attn_implementation="eager")
    ko = mv.run(eager, images, prompts, probes=[Activations(["ln_final.hook_normalized"])],
                interventions=[AttentionKnockout("vt", layers=0)])["activations"]
    row["knockout_ok"] = bool(torch.isfinite(ko["ln_final.hook_normalized"]).all()) and _on_cpu(ko)
    del eager

    # ---- generation: the nnsight generate trace vs HF generate under the hooks -----------------------------------
    gen_s, out = _timed(lambda: mv.generate(vlm, images, prompts, interventions=[Prune(some)],
                                            max_new_tokens=new_tokens, min_new_tokens=new_tokens), device, 1)
    with applied(vlm, batch, interventions=[Prune(some)]), torch.no_grad():
        ref = vlm.hf.generate(**dev_inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    ref_ids = ref[:, batch.visual_mask.shape[1]:].cpu()
    row["generate_ids_equal"] = bool(torch.equal(out.ids.cpu(), ref_ids)) and out.ids.device.type == "cpu"
    row["generate_s"] = gen_s
    return row


COLUMNS = ["family", "checkpoint", "visual_tokens", "load_s", "fwd_s_per_img", "suite_s_per_img", "suite/fwd",
           "fwd_peak_GiB", "suite_peak_GiB", "lens_ids_eq_fp32", "interventions_maxdiff", "interventions_ok",
           "knockout_ok", "generate_ids_equal", "generate_s", "results_on_cpu"]


def table(rows) -> str:
    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    cells = [COLUMNS] + [[fmt(r.get(c, "")) for c in COLUMNS] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(COLUMNS))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv=None) -> int:
    from mech_vtokens import testing as T

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda, cuda:1, cpu")
    ap.add_argument("--dtype", default=None, help="bfloat16 (default on CUDA) / float16 / float32 (default on CPU)")
    ap.add_argument("--small", action="store_true", help="shrunk widths (the default on the CPU)")
    ap.add_argument("--layers", type=int, default=2, help="decoder and vision layers kept (default 2)")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats; the fastest is reported")
    ap.add_argument("--new-tokens", type=int, default=4, help="tokens generated in the generation check")
    ap.add_argument("--checkpoints", nargs="*", default=None,
                    help=f"hub ids of real fixtures (default: one per family of {', '.join(T.REAL_CHECKPOINTS)})")
    ap.add_argument("--out", default=None, help="also write the table (markdown-ish text) and a CSV here")
    a = ap.parse_args(argv)
    cuda = a.device.startswith("cuda")
    small = a.small or not cuda
    dtype = getattr(torch, a.dtype) if a.dtype else (torch.bfloat16 if cuda else torch.float32)
    if a.checkpoints is None:  # the first real checkpoint of each model type
        from mech_vtokens.fixtures.real import hub_file

        seen, a.checkpoints = set(), []
        for c in T.REAL_CHECKPOINTS:
            fam = hub_file(c, "config.json")["model_type"]
            if fam not in seen:
                seen.add(fam)
                a.checkpoints.append(c)
    torch.manual_seed(0)
    rows, failed = [], False
    print(f"device {a.device}{' (' + torch.cuda.get_device_name(a.device) + ')' if cuda else ''}, {dtype}, "
          f"{'shrunk' if small else 'real'} widths, {a.layers}+{a.layers} layers", flush=True)
    for c in a.checkpoints:
        try:
            r = check(c, a.device, dtype, small, a.layers, a.repeats, a.new_tokens)
        except Exception as err:  # one family failing must not hide the others' rows
            r = {"checkpoint": c, "family": "ERROR", "load_s": f"{type(err).__name__}: {err}"[:200]}
        ok = all(r.get(k) is True for k in ("lens_ok", "interventions_ok", "knockout_ok", "generate_ids_equal",
                                              "results_on_cpu"))
        failed |= not ok
        rows.append(r)
        print(table([r]).splitlines()[-1], flush=True)
        if cuda:
            torch.cuda.empty_cache()
    text = table(rows)
    print("\n" + text)
    if a.out:
        import pandas as pd

        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text + "\n")
        pd.DataFrame(rows).to_csv(Path(a.out).with_suffix(".csv"), index=False)
    print("\nALL CHECKS PASSED" if not failed else "\nSOME CHECKS FAILED")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
