"""Generation under interventions (interventions/prune.py, entry_exit.py; mech_vtokens.generate; Experiment.execute
with ``steps``): with a KV cache, every decode step of Prune / VisualEntry / VisualExit equals re-running the whole
(verified, single-forward) intervened forward on prompt + tokens generated so far — logits of every step to 1e-5,
on all four families, left-padded batches, sdpa and eager; the nnsight per-step path (``mv.generate``, also
``remote="local"``) gives HF's tokens under ``applied``; an Experiment run once in a generate trace, generation
without a cache and bad arguments are refused before anything runs; nothing is left behind."""

from __future__ import annotations

import warnings

import nnsight
import pytest
import torch

import mech_vtokens as mv
from mech_vtokens.interventions import (AttentionKnockout, Positions, Prune, Rescale, VisualEntry, VisualExit,
                                        ZeroSublayer, applied)
from mech_vtokens import InputError
from mech_vtokens import testing as T
from intervention_refs import batch_of
from mech_vtokens.probes import EmbedLens

FAMILIES = T.FAMILIES
TOL = 1e-5
STEPS = 4


def special_ids(vlm):
    """Never generated here (a random tiny model may pick the image token, which a re-run forward would then read
    as a visual placeholder)."""
    return sorted(set(vlm.processor.tokenizer.all_special_ids) | {vlm.hf.config.image_token_id})


def cached_generate(vlm, b, ivs, steps=STEPS):
    """HF ``generate`` with its KV cache, under the plain-hook harness: raw logits of every step and the ids."""
    with torch.no_grad(), (applied(vlm, b, interventions=ivs) if ivs else torch.no_grad()):
        g = vlm.hf.generate(**b.inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                            suppress_tokens=special_ids(vlm), output_logits=True, return_dict_in_generate=True)
    return torch.stack([x.float() for x in g.logits], 1), g.sequences


def rerun_reference(vlm, b, ivs, steps=STEPS):
    """Greedy decoding by re-running the WHOLE intervened forward (no cache) on prompt + the tokens generated so
    far: each step is a fresh batch whose token sets resolve on its own visual mask. Position ids as HF's generate
    gives them (padding-aware: the cumulative attention mask) where the model takes 2-D ids; Qwen computes its
    M-RoPE ids from the attention mask itself."""
    inputs = dict(b.inputs)
    bad = special_ids(vlm)
    logits = []
    for _ in range(steps):
        kw = dict(inputs)
        if "image_grid_thw" not in kw:
            am = kw["attention_mask"]
            kw["position_ids"] = (am.long().cumsum(-1) - 1).masked_fill(am == 0, 1)
        with torch.no_grad(), (applied(vlm, kw, interventions=ivs) if ivs else torch.no_grad()):
            last = vlm.hf(**kw).logits[:, -1].float()
        logits.append(last)
        pick = last.clone()
        pick[:, bad] = -float("inf")
        nxt = pick.argmax(-1, keepdim=True)
        inputs["input_ids"] = torch.cat([inputs["input_ids"], nxt], 1)
        inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(nxt)], 1)
        if "mm_token_type_ids" in inputs:
            inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(nxt)], 1)
    return torch.stack(logits, 1), inputs["input_ids"]


CASES = {
    "prune": lambda: [Prune(Positions([0, 2, 3]))],
    "prune-repacked": lambda: [Prune(Positions([0, 2, 3]), positions="repacked")],
    "entry-1": lambda: [VisualEntry(1)],
    "entry-2-original": lambda: [VisualEntry(2, text_positions="original")],
    "exit-1": lambda: [VisualExit(1)],
    "exit-2-some+zero": lambda: [VisualExit(2, Positions([1, 2])), ZeroSublayer("all", 0, "mlp")],
}


def refused_window(vlm, name, call):
    """A family that declares why it cannot change the sequence between decoder layers (Gemma 4: per-layer
    embeddings, shared KV) refuses VisualEntry / VisualExit before any work: True when that refusal was raised."""
    if not name.startswith(("entry", "exit")) or not vlm.adapter.sequence_change_refusal:
        return False
    with pytest.raises(InputError, match="cannot change the sequence between decoder layers"):
        call()
    return True


@pytest.mark.parametrize("family", FAMILIES + ("Qwen/Qwen2-VL-2B-Instruct@float32",))  # + a real-file fixture
def test_cached_decode_equals_rerunning_the_forward(tiny_vlm, family):
    vlm = tiny_vlm(family)
    b = batch_of(vlm, family)
    clean, _ = cached_generate(vlm, b, [])
    ref_clean, _ = rerun_reference(vlm, b, [])
    assert (clean - ref_clean).abs().max() < TOL  # the reference itself reproduces HF's cached generation
    for name, make in CASES.items():
        if refused_window(vlm, name, lambda: cached_generate(vlm, b, make())):
            continue
        got, ids = cached_generate(vlm, b, make())
        ref, ref_ids = rerun_reference(vlm, b, make())
        assert (got - ref).abs().max() < TOL, name
        assert torch.equal(ids, ref_ids), name
        assert (got - clean).abs().max() > 1e-3, name  # it did something, on the decode steps too
        assert (got[:, 1:] - clean[:, 1:]).abs().max() > 1e-3, name


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_cached_decode_eager(tiny_dir, family):
    vlm = mv.load(tiny_dir(family), attn_implementation="eager")
    b = batch_of(vlm, family)
    for name in ("entry-1", "exit-1", "prune"):
        got, ids = cached_generate(vlm, b, CASES[name]())
        ref, ref_ids = rerun_reference(vlm, b, CASES[name]())
        assert (got - ref).abs().max() < TOL, name
        assert torch.equal(ids, ref_ids), name


def nn_generate(vlm, b, ivs, probes=(), steps=STEPS):
    """An Experiment in the user's own nnsight generate trace, acting on every step (the documented pattern)."""
    exp = vlm.experiment(b, probes=probes, interventions=ivs)
    with vlm.generate(max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                      suppress_tokens=special_ids(vlm)) as tracer:
        raw = nnsight.save({})
        with tracer.invoke(**b.inputs):
            exp.execute(vlm.model, steps=tracer.iter[:steps], out=raw)
        with tracer.invoke():
            ids = nnsight.save(tracer.result)
    return ids, exp.results(raw)


@pytest.mark.parametrize("family", FAMILIES)
def test_nnsight_generate_trace_equals_hf_under_applied(tiny_vlm, family):
    vlm = tiny_vlm(family)
    b = batch_of(vlm, family)
    lens = EmbedLens(k=3, sites=["hook_embed", "blocks.0.hook_resid_post"])
    images = [T.image(seed=1), T.image(seed=2)]
    for name in ("prune", "entry-1", "exit-2-some+zero"):
        if refused_window(vlm, name, lambda: nn_generate(vlm, b, CASES[name](), probes=[lens])):
            continue
        _, want = cached_generate(vlm, b, CASES[name]())
        ids, res = nn_generate(vlm, b, CASES[name](), probes=[lens])
        got = res[lens]
        assert torch.equal(ids, want), name
        # the probes read the prompt's forward: the same as one traced forward with the same interventions
        alone = mv.run(vlm, images, b.prompts, probes=[lens], interventions=CASES[name]())[lens]
        for site in ("hook_embed", "blocks.0.hook_resid_post"):
            assert torch.equal(got.ids[site], alone.ids[site]), (name, site)
        if name.startswith("entry"):  # block 0 runs on the text only: no visual row there
            assert (got.ids["blocks.0.hook_resid_post"] == -1).all()


def test_mv_generate_probes_remote_and_early_stop(tiny_vlm):
    vlm = tiny_vlm("qwen2_5_vl")
    imgs, prompts = [T.image(seed=1), T.image(seed=2)], [T.prompt("qwen2_5_vl"), T.prompt("qwen2_5_vl", "a b")]
    b = vlm.prepare(imgs, prompts)
    lens = EmbedLens(k=3, sites=["hook_embed", "blocks.1.hook_resid_post"])
    ivs = [VisualEntry(1), Rescale("all", 2.0)]
    out = mv.generate(vlm, imgs, prompts, probes=[lens], interventions=ivs, max_new_tokens=STEPS,
                      suppress_tokens=special_ids(vlm))
    _, want = cached_generate(vlm, b, ivs)
    assert torch.equal(out.sequences, want)
    assert out.ids.shape == (2, STEPS) and len(out.text) == 2
    full = mv.generate(vlm, imgs, prompts, interventions=ivs, max_new_tokens=STEPS, suppress_tokens=special_ids(vlm),
                       return_dict_in_generate=True, output_logits=True)
    got, _ = cached_generate(vlm, b, ivs)
    assert len(full.text) == 2 and full.to_pandas().prompt.tolist() == prompts
    assert torch.equal(full.sequences, want) and (torch.stack(full.output.logits, 1).float() - got).abs().max() < TOL
    assert out.text == vlm.processor.tokenizer.batch_decode(want[:, b.visual_mask.shape[1]:], skip_special_tokens=True)
    # the probes read the prompt's forward: the same numbers as mv.run with the same interventions
    alone = mv.run(vlm, imgs, prompts, probes=[lens], interventions=ivs)[lens]
    for site in lens.sites(vlm):
        assert torch.equal(out.results[lens].ids[site], alone.ids[site])
    remote = mv.generate(vlm, imgs, prompts, probes=[lens], interventions=ivs, max_new_tokens=STEPS,
                         remote="local", suppress_tokens=special_ids(vlm))
    assert torch.equal(remote.sequences, out.sequences)
    assert torch.equal(remote.results[lens].ids["hook_embed"], out.results[lens].ids["hook_embed"])
    # EOS on the first token: the per-step loop is cut short, nothing raised or lost
    one = vlm.prepare(imgs[:1], prompts[:1])
    _, first = cached_generate(vlm, one, ivs, steps=1)
    eos = int(first[0, -1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # mv.generate keeps nnsight's "never reached" warning to itself
        short = mv.generate(vlm, imgs[:1], prompts[:1], probes=[lens], interventions=ivs, max_new_tokens=STEPS,
                            eos_token_id=eos, suppress_tokens=special_ids(vlm))
    assert short.ids.tolist() == [[eos]]
    assert torch.equal(short.results[lens].ids["hook_embed"], mv.run(vlm, imgs[:1], prompts[:1], probes=[lens],
                                                                   interventions=ivs)[lens].ids["hook_embed"])


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_every_step_without_cache(tiny_vlm, family):
    """ZeroSublayer / Rescale(every_step=True) in generation without a KV cache (each step a whole forward) act on
    every step: HF generate(use_cache=False) under applied == re-running the intervened forward; the nnsight
    per-step path gives the same ids; prefill-only (the default) differs from every-step."""
    vlm = tiny_vlm(family)
    b = batch_of(vlm, family)
    g = dict(max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False, suppress_tokens=special_ids(vlm),
             use_cache=False)
    for make in (lambda e: [ZeroSublayer("all", [0, 1], "mlp", every_step=e)],
                 lambda e: [Rescale(Positions([0, 1, 2]), 5.0, every_step=e)]):
        with torch.no_grad(), applied(vlm, b, interventions=make(True)):
            out = vlm.hf.generate(**b.inputs, **g, output_logits=True, return_dict_in_generate=True)
        got = torch.stack([x.float() for x in out.logits], 1)
        ref, ref_ids = rerun_reference(vlm, b, make(True))
        assert (got - ref).abs().max() < TOL and torch.equal(out.sequences, ref_ids)
        exp = vlm.experiment(b, interventions=make(True))
        with vlm.generate(**g) as tracer:
            with tracer.invoke(**b.inputs):
                exp.execute(vlm.model, steps=tracer.iter[:STEPS])
            with tracer.invoke():
                ids = nnsight.save(tracer.result)
        assert torch.equal(ids, ref_ids)
        with torch.no_grad(), applied(vlm, b, interventions=make(False)):
            once = vlm.hf.generate(**b.inputs, **g, output_logits=True, return_dict_in_generate=True)
        assert (once.logits[0] - out.logits[0]).abs().max() < TOL  # the same prefill
        assert max((a - c).abs().max() for a, c in zip(once.logits[1:], out.logits[1:])) > 1e-3


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_beams_and_several_sequences_per_prompt(tiny_vlm, family):
    """num_return_sequences=2 (sampling, seeded) under an intervention == the same prompts listed twice by hand (the
    verified one-row-per-prompt path, token sets given per copy); mv.generate == applied with beams too; probes
    with beams are refused before anything runs."""
    vlm = tiny_vlm(family)
    imgs, prompts = [T.image(seed=1), T.image(seed=2)], [T.prompt(family), T.prompt(family, "describe the image")]
    b = vlm.prepare(imgs, prompts)
    twice = vlm.prepare([imgs[0], imgs[0], imgs[1], imgs[1]], [prompts[0], prompts[0], prompts[1], prompts[1]])
    n0 = int(b.visual_mask[0].sum())
    assert int(twice.visual_mask[0].sum()) == n0
    cases = [([Prune(Positions([0, 1, 5]))], [Prune(Positions([0, 1, 5, n0, n0 + 1, n0 + 5]))]),
             ([VisualEntry(1)], [VisualEntry(1)]),
             ([VisualExit(2), ZeroSublayer("all", 0, "mlp")], [VisualExit(2), ZeroSublayer("all", 0, "mlp")])]
    g = dict(max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=True, top_k=5, suppress_tokens=special_ids(vlm))
    for ivs, by_hand in cases:
        torch.manual_seed(0)
        with torch.no_grad(), applied(vlm, b, interventions=ivs):
            got = vlm.hf.generate(**b.inputs, num_return_sequences=2, **g)
        torch.manual_seed(0)
        with torch.no_grad(), applied(vlm, twice, interventions=by_hand):
            want = vlm.hf.generate(**twice.inputs, **g)
        assert torch.equal(got, want), ivs
        torch.manual_seed(0)
        out = mv.generate(vlm, imgs, prompts, interventions=ivs, num_return_sequences=2, **g)
        assert torch.equal(out.sequences, got) and len(out.text) == 4 and out.to_pandas().prompt[1] == prompts[0]
        beam = dict(max_new_tokens=STEPS, num_beams=3, suppress_tokens=special_ids(vlm))
        with torch.no_grad(), applied(vlm, b, interventions=ivs):
            want = vlm.hf.generate(**b.inputs, **beam)
        assert torch.equal(mv.generate(vlm, imgs, prompts, interventions=ivs, **beam).sequences, want), ivs
    with pytest.raises(InputError, match="num_beams"):
        mv.generate(vlm, imgs, prompts, probes=[EmbedLens(k=2)], num_beams=2)


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_knockout_in_generate_is_prefill_only(tiny_dir, family, monkeypatch):
    """AttentionKnockout (nnsight .source, eager) in mv.generate == HF generate on a plain eager copy whose eager
    attention function is patched by hand for the prefill's forward only (decode steps attend normally)."""
    from test_entry_knockout import patched_eager

    vlm = mv.load(tiny_dir(family), attn_implementation="eager")
    plain = type(vlm.hf).from_pretrained(tiny_dir(family), attn_implementation="eager").eval()
    imgs = [T.image(seed=1), T.image(seed=2)]
    prompts = [T.prompt(family), T.prompt(family, "describe the image")]
    b = vlm.prepare(imgs, prompts)
    g = dict(max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False, suppress_tokens=special_ids(vlm))
    clean = mv.generate(vlm, imgs, prompts, **g).ids
    vm = b.visual_mask
    changed = 0
    for kind, queries in (("vv", vm), ("vt", ~vm)):
        layers = list(range(vlm.n_layers))
        got = mv.generate(vlm, imgs, prompts, interventions=[AttentionKnockout(kind, layers)], **g).ids
        with monkeypatch.context() as m:
            patched_eager(plain, m, queries[:, :, None] & vm[:, None, :], layers)
            with torch.no_grad():
                want = plain.generate(**b.inputs, **g)[:, vm.shape[1]:]
        assert torch.equal(got, want), kind
        changed += not torch.equal(got, clean)
    assert changed  # the knockout changed the answer in at least one case


def hook_snapshot(module):
    return [(name, tuple(m._forward_hooks), tuple(m._forward_pre_hooks)) for name, m in module.named_modules()]


def test_refusals_and_no_residue(tiny_vlm):
    vlm = tiny_vlm("llava")
    b = batch_of(vlm, "llava")
    with torch.no_grad():
        before = vlm.hf(**b.inputs).logits
    hooks = hook_snapshot(vlm.hf)
    g = dict(max_new_tokens=2, do_sample=False)
    for iv in (Prune(Positions([0, 1])), VisualEntry(1), VisualExit(1)):
        exp = vlm.experiment(b, interventions=[iv])
        with pytest.raises(ValueError, match=r"steps=tracer.iter"):  # run once in a generate trace: decode unfixed
            with vlm.generate(**b.inputs, **g):
                exp.execute(vlm.model)
    for iv in (VisualEntry(1), VisualExit(1)):
        with pytest.raises(ValueError, match="use_cache=False"):
            with applied(vlm, b, interventions=[iv]), torch.no_grad():
                vlm.hf.generate(**b.inputs, use_cache=False, **g)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(InputError, match="max_new_tokens"):
            mv.generate(vlm, [T.image(seed=1)], [T.prompt("llava")], max_new_tokens=bad)
    mv.generate(vlm, [T.image(seed=1)], [T.prompt("llava")], interventions=[VisualExit(1)], max_new_tokens=2)
    exp = vlm.experiment(b, interventions=[VisualEntry(1)])
    with pytest.raises(RuntimeError, match="boom"):  # an exception in the per-step trace, after the interventions
        with vlm.generate(max_new_tokens=2, do_sample=False) as tracer:
            with tracer.invoke(**b.inputs):
                exp.execute(vlm.model, steps=tracer.iter[:2])
                raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"):
        with applied(vlm, b, interventions=[VisualExit(2)]), torch.no_grad():
            vlm.hf.generate(**b.inputs, **g)
            raise RuntimeError("boom")
    assert hook_snapshot(vlm.hf) == hooks
    with torch.no_grad():
        assert torch.equal(vlm.hf(**b.inputs).logits, before)
