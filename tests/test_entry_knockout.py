"""VisualEntry / VisualExit / AttentionKnockout (interventions/entry_exit.py, attention_knockout.py): each does what it
says (measured), agrees with an independent implementation written here (decoder layers run by hand in plain torch; a
monkey-patched eager attention function) on the tiny fixtures of all four families, leaves no residue, and refuses
bad input before the forward. Generation under these interventions: tests/test_generate.py."""

from __future__ import annotations

import sys

import nnsight
import pytest
import torch

import mech_vtokens as mv
from mech_vtokens.interventions import (AttentionKnockout, Positions, Prune, Rescale, VisualEntry, VisualExit,
                                        ZeroSublayer, applied, resolve)
from mech_vtokens import InputError
from mech_vtokens import testing as T
import families as F
from intervention_refs import batch_of, clean_lm_kwargs, eager_weights, injections, lm_of, nn_run
from mech_vtokens.probes.activations import Activations

FAMILIES = T.FAMILIES
# Gemma 4 refuses VisualEntry / VisualExit (per-layer embeddings, shared KV: tests/test_gemma4.py checks the refusal)
WINDOW_FAMILIES = tuple(f for f in FAMILIES if f != "gemma4")
TOL = 1e-5


@pytest.fixture(scope="module")
def eager_vlm(tiny_dir):
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = mv.load(tiny_dir(family), attn_implementation="eager")
        return cache[family]

    return get


@pytest.fixture(scope="module")
def plain_eager(tiny_dir):
    """A fresh plain HF model (no nnsight) for the monkey-patched references: nnsight's ``.source`` instruments an
    attention module for good (numerically inert), and an instrumented module no longer looks the eager function up in
    its module's globals, so patching those would not reach it."""
    cache = {}

    def get(vlm, family):
        if family not in cache:
            cache[family] = type(vlm.hf).from_pretrained(tiny_dir(family), attn_implementation="eager").eval()
        return cache[family]

    return get


# ---- the independent implementation: decoder layers by hand ------------------------------------------------------

def run_layers(vlm, x, pos, layers, add=None, visual=None):
    """Decoder layers ``layers`` on ONE unpadded row ``x`` (1, n, d) at position ids ``pos``: rotary from the LM's
    rotary module, a hand-built additive causal mask (a sliding-window layer: also blocking keys ``window`` or more
    positions back in the sequence); ``add`` {i: (1, n, d)}: added after layer i (DeepStack). ``visual`` (1, n)
    bool (Gemma 3): the tokens of one image (a run of visual positions) also see each other, the window still
    applied; and the rotary module takes the layer type (one rope per kind)."""
    import inspect

    lm = lm_of(vlm)
    n = x.shape[1]
    cfg = lm.config
    q, k = torch.arange(n)[:, None], torch.arange(n)[None, :]
    kinds = list(getattr(cfg, "layer_types", None) or ["full_attention"] * len(lm.layers))
    by_kind = "layer_type" in inspect.signature(lm.rotary_emb.forward).parameters
    pe = None if by_kind else lm.rotary_emb(x, pos)
    same_image = torch.zeros(n, n, dtype=torch.bool)
    if visual is not None:
        v = visual[0].bool()
        run = torch.cumsum(v & ~torch.cat([torch.zeros(1, dtype=torch.bool), v[:-1]]), 0)
        same_image = v[:, None] & v[None, :] & (run[:, None] == run[None, :])
    for i in layers:
        if by_kind:
            pe = lm.rotary_emb(x, pos, kinds[i])
        blocked = (k > q) & ~same_image
        if kinds[i] == "sliding_attention":
            blocked = blocked | (k <= q - cfg.sliding_window)
        mask = torch.zeros(n, n, dtype=x.dtype).masked_fill(blocked, torch.finfo(x.dtype).min)[None, None]
        if kinds[i] == "linear_attention":  # a recurrent layer (Qwen3.5): no mask on an unpadded row
            mask = None
        x = lm.layers[i](x, attention_mask=mask, position_embeddings=pe)
        if add and i in add:
            x = x + add[i].to(x.dtype)
    return x


def _cols(add, keep):
    return {j: a[:, keep] for j, a in add.items()}


def head(vlm, x):
    return getattr(vlm, "hf", vlm).lm_head(lm_of(vlm).norm(x))[0]


def row_facts(clean, r):
    """Real (non-padding) columns of row r, its embeddings and the LM's own position ids there."""
    emb, am, pos = clean["inputs_embeds"], clean["attention_mask"], clean["position_ids"]
    L = emb.shape[1]
    cols = torch.arange(L) if am is None else am[r].bool().nonzero().flatten()
    p = torch.arange(L)[None][:, cols] if pos is None else pos[:, r:r + 1, cols]
    return cols, emb[r:r + 1, cols], p


def flat_pos(n, like):
    p = torch.arange(n)[None]
    return p if like.ndim == 2 else p[None].expand(like.shape[0], -1, -1)


def _visual(clean, r, cols):
    """Row r's visual positions at its columns, for a family whose images attend bidirectionally (Gemma 3's token
    types), else None."""
    tt = clean.get("token_type_ids")
    return None if tt is None else tt[r:r + 1, cols].bool()


def entry_reference(vlm, clean, sel, k):
    """Per row: layers < k on the text alone at 0..T-1, then re-insert the raw embeddings, positions reset to the
    full sequence's, layers >= k."""
    out = []
    with torch.no_grad():
        for r in range(clean["inputs_embeds"].shape[0]):
            cols, e, p = row_facts(clean, r)
            s = sel[r, cols]
            v = _visual(clean, r, cols)
            add = injections(clean, r, cols)  # DeepStack: for the visual tokens in the sequence at that layer
            x = run_layers(vlm, e[:, ~s], flat_pos(int((~s).sum()), p), range(k), _cols(add, ~s),
                           None if v is None else v[:, ~s])
            full = e.clone()
            full[:, ~s] = x
            out.append((cols, head(vlm, run_layers(vlm, full, p, range(k, len(lm_of(vlm).layers)), add, v))))
    return out


def exit_reference(vlm, clean, sel, k):
    """Per row: layers < k on the full sequence, then drop the selected tokens (text keeps its positions)."""
    out = []
    with torch.no_grad():
        for r in range(clean["inputs_embeds"].shape[0]):
            cols, e, p = row_facts(clean, r)
            s = sel[r, cols]
            v = _visual(clean, r, cols)
            add = injections(clean, r, cols)
            x = run_layers(vlm, e, p, range(k), add, v)[:, ~s]
            out.append(head(vlm, run_layers(vlm, x, p[..., ~s], range(k, vlm.n_layers), _cols(add, ~s),
                                            None if v is None else v[:, ~s])))
    return out


# ---- VisualEntry -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", WINDOW_FAMILIES)
def test_entry_matches_manual_and_layers_before_never_see_visual(tiny_vlm, family):
    vlm = tiny_vlm(family)
    b = batch_of(vlm, family)
    k = 2
    clean = clean_lm_kwargs(vlm, b)
    sites = [f"blocks.{i}.hook_resid_pre" for i in range(vlm.n_layers)] + ["blocks.1.hook_resid_post"]
    logits, res = nn_run(vlm, b, [VisualEntry(k)], [Activations(sites + ["hook_embed"])])
    acts = res["activations"]
    L = b.visual_mask.shape[1]
    assert logits.shape[1] == L
    for r, (cols, ref) in enumerate(entry_reference(vlm, clean, b.visual_mask, k)):
        assert (logits[r, cols] - ref).abs().max() < TOL

    # measured: layers < k run on the text only (shorter by the visual count) ...
    n_text = (~b.visual_mask).sum(1)
    for i in range(k):
        assert acts[f"blocks.{i}.hook_resid_pre"].shape[1] == int(n_text.max())
    for i in range(k, vlm.n_layers):
        assert acts[f"blocks.{i}.hook_resid_pre"].shape[1] == L
    # ... at layer k the visual positions hold exactly the raw projected embeddings ...
    vm = b.visual_mask
    assert torch.equal(acts[f"blocks.{k}.hook_resid_pre"][vm], clean["inputs_embeds"][vm])
    assert torch.equal(acts["hook_embed"], clean["inputs_embeds"])
    # ... and nothing before layer k depends on the image: another image, bit-identical layers < k
    b2 = batch_of(vlm, family, seeds=(7, 8))
    assert b2.visual_mask.equal(vm) and not torch.equal(b2.inputs["pixel_values"], b.inputs["pixel_values"])
    acts2 = nn_run(vlm, b2, [VisualEntry(k)], [Activations(sites)])[1]["activations"]
    for i in range(k):
        assert torch.equal(acts2[f"blocks.{i}.hook_resid_pre"], acts[f"blocks.{i}.hook_resid_pre"])
    assert torch.equal(acts2["blocks.1.hook_resid_post"], acts["blocks.1.hook_resid_post"])
    assert not torch.equal(acts2[f"blocks.{k}.hook_resid_pre"], acts[f"blocks.{k}.hook_resid_pre"])


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_entry_options_harness_remote_and_eager(tiny_vlm, eager_vlm, family):
    """text_positions='original', a token subset, the plain-hook harness, remote='local' and eager attention all
    agree with the reference / with each other."""
    vlm = tiny_vlm(family)
    b = batch_of(vlm, family)
    clean = clean_lm_kwargs(vlm, b)
    sub = Positions(list(range(0, b.n_visual, 2)))
    sel = resolve(sub, b)
    logits, _ = nn_run(vlm, b, [VisualEntry(1, tokens=sub)])
    for r, (cols, ref) in enumerate(entry_reference(vlm, clean, sel, 1)):
        assert (logits[r, cols] - ref).abs().max() < TOL
    with applied(vlm, b, interventions=[VisualEntry(1, tokens=sub)]):
        with torch.no_grad():
            hooked = vlm.hf(**b.inputs).logits
    assert (hooked - logits).abs().max() < TOL
    remote, _ = nn_run(vlm, b, [VisualEntry(1, tokens=sub)], remote="local")
    assert (remote - logits).abs().max() < TOL
    ev = eager_vlm(family)
    for m in (vlm, ev):  # the mask rebuilt at layer k is the LM's own mask for the full input (sdpa bool / eager float)
        seen = []

        def grab(mod, a, kw):
            seen.append(kw["attention_mask"])

        with torch.no_grad():
            h = lm_of(m).layers[1].register_forward_pre_hook(grab, with_kwargs=True)
            m.hf(**b.inputs)
            h.remove()
            with applied(m, b, interventions=[VisualEntry(1)]):
                h = lm_of(m).layers[1].register_forward_pre_hook(grab, with_kwargs=True)  # runs after applied's
                try:
                    m.hf(**b.inputs)
                finally:
                    h.remove()
        assert seen[0] is not None and seen[0].shape[-1] == b.visual_mask.shape[1] and torch.equal(seen[0], seen[1])
    eager, _ = nn_run(ev, b, [VisualEntry(1, tokens=sub)])
    real = b.inputs["attention_mask"].bool()  # padding rows differ between eager and sdpa in the clean model too
    assert (eager[real] - logits[real]).abs().max() < TOL

    # original text positions: layers < k see the text at its full-sequence ids (gaps)
    orig, _ = nn_run(vlm, b, [VisualEntry(2, text_positions="original")])
    with torch.no_grad():
        for r in range(2):
            cols, e, p = row_facts(clean, r)
            s = b.visual_mask[r, cols]
            x = run_layers(vlm, e[:, ~s], p[..., ~s], range(2))
            full = e.clone()
            full[:, ~s] = x
            ref = head(vlm, run_layers(vlm, full, p, range(2, vlm.n_layers)))
            assert (orig[r, cols] - ref).abs().max() < TOL


# ---- VisualExit ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", WINDOW_FAMILIES)
def test_exit_matches_manual(tiny_vlm, family):
    vlm = tiny_vlm(family)
    b = batch_of(vlm, family)
    k = 1
    clean = clean_lm_kwargs(vlm, b)
    sites = [f"blocks.{i}.hook_resid_pre" for i in range(vlm.n_layers)]
    logits, res = nn_run(vlm, b, [VisualExit(k)], [Activations(sites)])
    acts = res["activations"]
    L = b.visual_mask.shape[1]
    kept = int((~b.visual_mask).sum(1).max())
    assert logits.shape[1] == kept
    assert acts[f"blocks.{k - 1}.hook_resid_pre"].shape[1] == L
    for i in range(k, vlm.n_layers):
        assert acts[f"blocks.{i}.hook_resid_pre"].shape[1] == kept
    am = clean["attention_mask"]
    for r, ref in enumerate(exit_reference(vlm, clean, b.visual_mask, k)):
        assert (logits[r, -ref.shape[0]:] - ref).abs().max() < TOL
        if am is not None:  # the rest of the row is padding
            assert ref.shape[0] == int((am[r].bool() & ~b.visual_mask[r]).sum())
    with applied(vlm, b, interventions=[VisualExit(k)]):
        with torch.no_grad():
            hooked = vlm.hf(**b.inputs).logits
    assert (hooked - logits).abs().max() < TOL


def sliding_qwen(tiny_dir, tmp_path, attn):
    """The tiny Qwen2-VL with layer 1 sliding-window (window 5, far shorter than the prompt), layers 0 and 2 full."""
    import json
    import shutil

    d = tmp_path / f"sliding-{attn}"
    shutil.copytree(tiny_dir("qwen2_vl"), d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["text_config"].update(use_sliding_window=True, sliding_window=5, max_window_layers=1,
                              layer_types=["full_attention", "sliding_attention", "full_attention"])
    (d / "config.json").write_text(json.dumps(cfg))
    return mv.load(d, attn_implementation=attn)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_entry_exit_on_sliding_window_layers_match_manual(tiny_dir, tmp_path, attn):
    """A model with sliding-window layers (refused before): the masks VisualEntry / VisualExit rebuild from layer k on
    are each layer's own kind (transformers.masking_utils), so both match the hand-built forward whose sliding layers
    block keys 5+ positions back; the clean model itself matches that forward (the window really acts), and
    cached generation under them equals re-running the forward."""
    vlm = sliding_qwen(tiny_dir, tmp_path, attn)
    b = batch_of(vlm, "qwen2_vl")
    clean = clean_lm_kwargs(vlm, b)
    assert b.visual_mask.shape[1] > 12  # the window (5) is much shorter than the sequence
    with torch.no_grad():
        got = vlm.hf(**b.inputs).logits
    for r in range(2):
        cols, e, p = row_facts(clean, r)
        want = head(vlm, run_layers(vlm, e, p, range(vlm.n_layers)))
        assert (got[r, cols] - want).abs().max() < TOL
    full = mv.load(tiny_dir("qwen2_vl"), attn_implementation=attn)
    with torch.no_grad():
        assert (full.hf(**full.prepare([T.image(seed=1)], [F.prompt(full, "qwen2_vl")]).inputs).logits -
                vlm.hf(**vlm.prepare([T.image(seed=1)], [F.prompt(vlm, "qwen2_vl")]).inputs).logits).abs().max() > 1e-3
    for k in (1, 2):
        logits, _ = nn_run(vlm, b, [VisualEntry(k)])
        for r, (cols, ref) in enumerate(entry_reference(vlm, clean, b.visual_mask, k)):
            assert (logits[r, cols] - ref).abs().max() < TOL, (k, r)
        logits, _ = nn_run(vlm, b, [VisualExit(k)])
        for r, ref in enumerate(exit_reference(vlm, clean, b.visual_mask, k)):
            assert (logits[r, -ref.shape[0]:] - ref).abs().max() < TOL, (k, r)
    # generation with a KV cache (refused before): each layer's decode mask is sized by its own cache layer (the
    # sliding one keeps only its last keys), so HF's cached generate under the intervention == re-running the
    # intervened forward on prompt + generated tokens
    from test_generate import cached_generate, rerun_reference

    for make in (lambda: [VisualEntry(1)], lambda: [VisualExit(1)], lambda: [Prune(Positions([0, 2, 3]))]):
        got, ids = cached_generate(vlm, b, make(), steps=6)
        ref, ref_ids = rerun_reference(vlm, b, make(), steps=6)
        assert (got - ref).abs().max() < TOL and torch.equal(ids, ref_ids)


# ---- AttentionKnockout -----------------------------------------------------------------------------------------

def patched_eager(hf, monkeypatch, cut, layers):
    """Monkey-patch the family's eager attention function: plain torch, weights * (not cut) after the softmax."""
    mod = sys.modules[type(lm_of(hf).layers[0]).__module__]  # (a hybrid LM's layer 0 may have no self_attn)
    orig = mod.eager_attention_forward
    index = {id(layer.self_attn): i for i, layer in enumerate(lm_of(hf).layers)  # Qwen's ViT uses it too
             if hasattr(layer, "self_attn")}

    def eager(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        if index.get(id(module)) not in layers or query.shape[2] != cut.shape[1]:  # (decode steps: untouched)
            return orig(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        w, v = eager_weights(query, key, value, attention_mask, scaling)
        w = w.masked_fill(cut[:, None], 0.0)
        return (w @ v).transpose(1, 2).contiguous(), w

    monkeypatch.setattr(mod, "eager_attention_forward", eager)


@pytest.mark.parametrize("family", FAMILIES)
def test_knockout_matches_patched_eager(eager_vlm, plain_eager, monkeypatch, family):
    vlm = eager_vlm(family)
    hf = plain_eager(vlm, family)
    b = batch_of(vlm, family)
    vm = b.visual_mask
    pat = "blocks.1.attn.hook_pattern"
    clean = nn_run(vlm, b, [], [Activations([pat])])[1]["activations"][pat]
    for kind, queries in (("vv", vm), ("vt", ~vm)):
        layers = [1, 2]
        logits, res = nn_run(vlm, b, [AttentionKnockout(kind, layers)], [Activations([pat])])
        acts = res["activations"]
        cut = queries[:, :, None] & vm[:, None, :]
        w = acts[pat]
        # measured: exactly zero at the cut (every head), untouched elsewhere, and NOT renormalised
        assert (w[cut[:, None].expand_as(w)] == 0).all()
        assert torch.equal(w[~cut[:, None].expand_as(w)], clean[~cut[:, None].expand_as(clean)])
        lost = (clean * cut[:, None]).sum(-1)
        assert (w.sum(-1) - (clean.sum(-1) - lost)).abs().max() < 1e-5 and lost.max() > 0.1
        with monkeypatch.context() as m:
            patched_eager(hf, m, cut, layers)
            with torch.no_grad():
                ref = hf(**b.inputs).logits
        real = b.inputs["attention_mask"].bool()
        assert (logits[real] - ref[real]).abs().max() < TOL
        assert (logits[real] - clean_lm_kwargs(vlm, b)["logits"][real]).abs().max() > 1e-3  # it did something


def patched_eager_steps(hf, monkeypatch, vm, kind, layers, every_step):
    """The reference of AttentionKnockout in generation, plain torch: the family's eager attention patched so the
    prefill zeroes (queries of ``kind``) x (visual keys ``vm``) after the softmax and, with ``every_step``, each
    cached decode step zeroes its (text) query's weights on those keys; without it decode steps attend normally."""
    mod = sys.modules[type(lm_of(hf).layers[0]).__module__]  # (a hybrid LM's layer 0 may have no self_attn)
    orig = mod.eager_attention_forward
    index = {id(layer.self_attn): i for i, layer in enumerate(lm_of(hf).layers)
             if hasattr(layer, "self_attn")}
    queries_prefill = vm if kind == "vv" else ~vm

    def eager(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        n_q, n_k = query.shape[2], key.shape[2]
        prefill = n_q == vm.shape[1]
        if index.get(id(module)) not in layers or not (prefill or every_step):
            return orig(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        keys = torch.zeros(vm.shape[0], n_k, dtype=torch.bool)
        keys[:, :vm.shape[1]] = vm
        q = queries_prefill if prefill else torch.ones(vm.shape[0], n_q, dtype=torch.bool)  # decode: text queries
        cut = q[:, :, None] & keys[:, None, :]
        w, v = eager_weights(query, key, value, attention_mask, scaling)
        w = w.masked_fill(cut[:, None], 0.0)
        return (w @ v).transpose(1, 2).contiguous(), w

    monkeypatch.setattr(mod, "eager_attention_forward", eager)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_knockout_every_step_in_generate_equals_hooked_hf_generate(eager_vlm, plain_eager, monkeypatch, family):
    """mv.generate under AttentionKnockout("vt", every_step=True) == plain HF generate whose eager attention zeroes
    the decode steps' weights on the visual keys too; the default (prefill only) == the prefill-only reference and
    differs from every_step (the decode steps' blocking did something); "vv" with every_step is refused (a no-op)."""
    vlm = eager_vlm(family)
    hf = plain_eager(vlm, family)
    b = batch_of(vlm, family)
    imgs, prompts = b.images, b.prompts
    n = vlm.n_layers
    specials = sorted(set(vlm.processor.tokenizer.all_special_ids) | {vlm.hf.config.image_token_id})
    g = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, suppress_tokens=specials)
    got = {}
    for every in (False, True):
        layers = list(range(n))
        got[every] = mv.generate(vlm, imgs, prompts, interventions=[AttentionKnockout("vt", layers,
                                                                                      every_step=every)], **g).ids
        with monkeypatch.context() as m:
            patched_eager_steps(hf, m, b.visual_mask, "vt", layers, every)
            with torch.no_grad():
                want = hf.generate(**b.inputs, **g)[:, b.visual_mask.shape[1]:]
        assert torch.equal(got[every], want), every
    assert not torch.equal(got[False], got[True])  # blocking the decode steps changed the answer
    with pytest.raises(InputError, match="no decode step has a visual query"):
        AttentionKnockout("vv", 0, every_step=True)
    with pytest.raises(InputError, match="every_step=1: give True or False"):
        AttentionKnockout("vt", 0, every_step=1)


# ---- no residue, composition ---------------------------------------------------------------------------------

def hook_snapshot(module):
    return [(name, tuple(m._forward_hooks), tuple(m._forward_pre_hooks)) for name, m in module.named_modules()]


def test_no_residue(eager_vlm):
    vlm = eager_vlm("qwen2_vl")
    b = batch_of(vlm, "qwen2_vl")
    before = clean_lm_kwargs(vlm, b)["logits"]
    hooks = hook_snapshot(vlm.hf)
    for iv in (VisualEntry(1), VisualExit(2), AttentionKnockout("vt", 0)):
        nn_run(vlm, b, [iv])
        if not isinstance(iv, AttentionKnockout):
            with applied(vlm, b, interventions=[iv]):
                with torch.no_grad():
                    vlm.hf(**b.inputs)
    with pytest.raises(RuntimeError, match="boom"):
        exp = vlm.experiment(b, interventions=[VisualEntry(1), AttentionKnockout("vv", 2)])
        with vlm.trace(**b.inputs):
            exp.execute(vlm.model)
            raise RuntimeError("boom")
    assert hook_snapshot(vlm.hf) == hooks
    assert torch.equal(clean_lm_kwargs(vlm, b)["logits"], before)
    with vlm.trace(**b.inputs):
        traced = nnsight.save(vlm.model.output.logits)
    assert torch.equal(traced, before)


def test_compose_entry_knockout_rescale(eager_vlm, plain_eager):
    """VisualEntry + AttentionKnockout after k + Rescale of the embeddings in one forward (Rescale before the entry:
    the re-inserted raw embeddings are the rescaled ones) == hand reference with the patched eager function."""
    vlm = eager_vlm("llava")
    hf = plain_eager(vlm, "llava")
    b = batch_of(vlm, "llava")
    ivs = [Rescale("all", 0.5), VisualEntry(1), AttentionKnockout("vt", 2)]
    logits, _ = nn_run(vlm, b, ivs)
    clean = clean_lm_kwargs(vlm, b)
    vm = b.visual_mask
    clean["inputs_embeds"] = torch.where(vm[..., None], clean["inputs_embeds"] * 0.5, clean["inputs_embeds"])
    for r in range(2):
        cols = clean["attention_mask"][r].bool().nonzero().flatten()
        v = vm[r:r + 1, cols]
        mp = pytest.MonkeyPatch()
        try:
            patched_eager(hf, mp, (~v)[:, :, None] & v[:, None, :], [2])
            (c, ref), = entry_reference(hf, {k: (x[r:r + 1] if x is not None and k != "position_ids" else x)
                                              for k, x in clean.items()}, vm[r:r + 1], 1)
        finally:
            mp.undo()
        assert (logits[r, cols] - ref).abs().max() < TOL
    remote, _ = nn_run(vlm, b, ivs, remote="local")
    assert torch.equal(remote, logits)


# ---- bad input ---------------------------------------------------------------------------------------------------

def test_bad_input(tiny_vlm, eager_vlm):
    vlm = tiny_vlm("llava")
    b = batch_of(vlm, "llava")
    n = vlm.n_layers
    for bad, msg in ((VisualEntry(n), "out of range"), (VisualEntry(-n - 1), "out of range"),
                     (VisualEntry(0), "layer 0"), (VisualExit(0), "Prune"), (VisualExit(n), "out of range"),
                     (VisualEntry(1.5), "one int"),
                     (VisualEntry(1, Positions([b.n_visual])), "outside the visual span"),
                     (VisualExit(1, torch.zeros(b.n_visual, dtype=torch.bool)), "selects no token"),
                     (AttentionKnockout("vv", 0), 'attn_implementation="eager"')):
        with pytest.raises(InputError, match=msg):
            vlm.experiment(b, interventions=[bad])
    with pytest.raises(InputError, match="text_positions"):
        VisualEntry(1, text_positions="packed")
    with pytest.raises(InputError, match="kind"):
        AttentionKnockout("tv", 0)
    with pytest.raises(InputError, match="not in the sequence"):  # zeroing visual tokens where they are absent
        vlm.experiment(b, interventions=[VisualEntry(2), ZeroSublayer("all", 1, "mlp")])
    with pytest.raises(InputError, match="not in the sequence"):
        vlm.experiment(b, interventions=[VisualExit(1), ZeroSublayer(Positions([3]), 2, "attn")])
    with pytest.raises(InputError):  # two sequence changes
        vlm.experiment(b, interventions=[VisualEntry(1), Prune(Positions([0]))])
    vlm.experiment(b, interventions=[VisualEntry(2), ZeroSublayer("all", 2, "mlp")])  # after entry: fine
    ev = eager_vlm("llava")
    with pytest.raises(InputError, match="out of range"):
        ev.experiment(b, interventions=[AttentionKnockout("vv", n)])
    with pytest.raises(InputError, match="not in the sequence"):
        ev.experiment(b, interventions=[VisualExit(1), AttentionKnockout("vt", 2)])
    with pytest.raises(InputError, match="plain torch"):
        with applied(ev, b, interventions=[AttentionKnockout("vv", 1)]):
            pass
