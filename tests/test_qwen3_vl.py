"""Qwen3-VL (dense and MoE): DeepStack, the vectors added to the residual stream between decoder layers.

Everything else the family shares with the other families is proven by the family-parametrised tests (sites vs HF,
geometry marker, probes vs plain torch, interventions, generation); here: the injection site
``blocks.{i}.hook_deepstack`` read by the probes against plain torch, and written (zeroed, rescaled) against a
reference forward whose LM call receives the changed DeepStack vectors, on both backends (nnsight, plain hooks) and
``remote="local"``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mech_vtokens import testing as T
from mech_vtokens.adapters.base import _resolve
from mech_vtokens.errors import InputError
from mech_vtokens.interventions import Rescale, ZeroSublayer, applied
from mech_vtokens.loop import forward
from mech_vtokens.probes import EmbedLens, LogitLens, NormTracker
from mech_vtokens.probes.activations import Activations
from mech_vtokens.token_sets import Positions

import families as FM

QWEN3 = tuple(f for f in FM.FAMILIES_AND_ONE_REAL if f.startswith("qwen3_vl") or f.startswith("Qwen/Qwen3-VL"))
ATOL = 1e-5


def _inputs(vlm, fam):
    return ([T.image(112, 0), T.image(96, 1).resize((150, 110))],
            [FM.prompt(vlm, fam), FM.prompt(vlm, fam, "is there a red circle on the left ?")])


def _run(vlm, batch, probes=(), interventions=(), remote=False):
    return list(forward(vlm, batch, list(probes), list(interventions), remote=remote).values())


def _sites(vlm):
    return [f"blocks.{i}.hook_deepstack" for i in vlm.adapter.injection_layers()]


def _hf(vlm, batch, edit=None):
    """Plain HF forward; returns (logits, packed DeepStack vectors the LM call received). ``edit(j, rows)`` -> the
    rows to hand the LM instead for layer j (a forward-pre hook on the LM rewrites its kwarg)."""
    got = {}

    def pre(mod, args, kwargs):
        rows = kwargs["deepstack_visual_embeds"]
        got["rows"] = [r.detach().clone() for r in rows]
        got["mask"] = kwargs["visual_pos_masks"].clone()
        if edit is not None:
            kwargs = dict(kwargs, deepstack_visual_embeds=[edit(j, r) for j, r in enumerate(rows)])
            return args, kwargs
        return None

    h = _resolve(vlm.hf, vlm.adapter.language_model).register_forward_pre_hook(pre, with_kwargs=True)
    try:
        with torch.no_grad():
            logits = vlm.hf(**batch.inputs).logits
    finally:
        h.remove()
    return logits, got["rows"], got["mask"]


@pytest.mark.parametrize("fam", QWEN3)
def test_deepstack_site_is_what_the_lm_adds_and_probes_read_it(tiny_vlm, fam):
    """The site holds the packed DeepStack vectors at the visual positions (zero elsewhere); EmbedLens, LogitLens
    and NormTracker on it equal plain torch on those vectors."""
    vlm = tiny_vlm(fam)
    ims, prs = _inputs(vlm, fam)
    batch = vlm.prepare(ims, prs)
    sites = _sites(vlm)
    assert len(sites) == len(vlm.hf.config.vision_config.deepstack_visual_indexes) >= 2
    _, rows, mask = _hf(vlm, batch)
    assert torch.equal(mask, batch.visual_mask)
    act, el, ll, nt = _run(vlm, batch, [Activations(sites), EmbedLens(k=4, sites=sites), LogitLens(k=4, sites=sites),
                                        NormTracker(vision=False)])
    W = vlm.hf.get_input_embeddings().weight.float()[:len(vlm.tokenizer)]
    Wout = vlm.hf.get_output_embeddings().weight.float()[:len(vlm.tokenizer)]
    att = batch.inputs["attention_mask"].bool()
    for j, site in enumerate(sites):
        full = act[site]
        assert torch.equal(full[batch.visual_mask], rows[j].to(full.dtype)), site
        assert bool((full[~batch.visual_mask] == 0).all())
        h = rows[j].float()
        v, i = (F.normalize(h, dim=1) @ F.normalize(W, dim=1).T).topk(4, dim=1)
        assert torch.equal(el.ids[site], i), site
        torch.testing.assert_close(el.scores[site], v, atol=ATOL, rtol=0)
        with torch.no_grad():
            v, i = (vlm.final_norm(rows[j]).float() @ Wout.T).topk(4, dim=1)
        assert torch.equal(ll.ids[site], i), site
        torch.testing.assert_close(ll.scores[site], v, atol=ATOL, rtol=0)
        torch.testing.assert_close(nt.data[site]["l2"], full[att].float().norm(dim=-1), atol=ATOL, rtol=1e-6)
        assert nt.data[site]["cos_prev"].isnan().all()  # outside the layer-to-layer chain
    # the chain skips the injection: cos_prev of layer 1's output is against layer 0's output
    order = list(nt.data)
    assert order.index("blocks.0.hook_resid_post") < order.index(sites[0]) < order.index("blocks.1.hook_resid_post")
    st = _run(vlm, batch, [Activations(["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"])])[0]
    x0, x1 = (st[f"blocks.{i}.hook_resid_post"][att].float() for i in (0, 1))
    torch.testing.assert_close(nt.data["blocks.1.hook_resid_post"]["cos_prev"], F.cosine_similarity(x1, x0, dim=-1),
                               atol=ATOL, rtol=0)


def _edits(vlm, batch):
    """(interventions, the same change on the packed DeepStack rows for the reference forward)."""
    n = batch.n_visual
    some = list(range(0, n, 3))
    keep = torch.ones(n, dtype=torch.bool)
    keep[some] = False
    return {
        "zero-all": ([ZeroSublayer("all", layers=list(vlm.adapter.injection_layers()), sublayer="injection")],
                     lambda j, r: torch.zeros_like(r)),
        "zero-some-layer-1": ([ZeroSublayer(Positions(some), layers=1, sublayer="injection")],
                              lambda j, r: r * keep[:, None].to(r.dtype) if j == 1 else r),
        "rescale-layer-0": ([Rescale("all", factor=0.5, site="blocks.0.hook_deepstack")],
                            lambda j, r: r * 0.5 if j == 0 else r),
    }


@pytest.mark.parametrize("case", ["zero-all", "zero-some-layer-1", "rescale-layer-0"])
@pytest.mark.parametrize("fam", QWEN3)
def test_writing_the_deepstack_site_equals_the_lm_receiving_changed_vectors(tiny_vlm, fam, case):
    """Zeroing / rescaling the injection at the site == the model run with those DeepStack rows changed in its LM
    call (bit for bit: the same elementwise add), in an nnsight trace, remote="local" and under plain hooks."""
    vlm = tiny_vlm(fam)
    ims, prs = _inputs(vlm, fam)
    batch = vlm.prepare(ims, prs)
    comps, edit = _edits(vlm, batch)[case]
    want, _, _ = _hf(vlm, batch, edit)
    clean, _, _ = _hf(vlm, batch)
    assert not torch.equal(want, clean)  # the change matters
    got = _run(vlm, batch, [Activations(["unembed.hook_out"])], comps)[0]["unembed.hook_out"]
    assert torch.equal(got, want)
    far = _run(vlm, batch, [Activations(["unembed.hook_out"])], comps, remote="local")[0]["unembed.hook_out"]
    assert torch.equal(far, want)
    with applied(vlm, batch, interventions=comps), torch.no_grad():
        hooked = vlm.hf(**batch.inputs).logits
    assert torch.equal(hooked, want)


def test_injection_site_exists_only_where_the_model_injects(tiny_vlm):
    vlm = tiny_vlm("qwen3_vl")
    n = vlm.n_layers
    assert len(vlm.adapter.injection_layers()) < n  # the fixture leaves the last layer without DeepStack
    with pytest.raises(InputError, match=r"only after decoder layers \[0, 1\]"):
        vlm.adapter.site(f"blocks.{n - 1}.hook_deepstack")
    batch = vlm.prepare(*_inputs(vlm, "qwen3_vl"))
    with pytest.raises(InputError, match=r"only after decoder layers"):
        _run(vlm, batch, interventions=[ZeroSublayer(layers=n - 1, sublayer="injection")])
    llava = tiny_vlm("llava")
    assert not [s for s in llava.sites if "deepstack" in s]
    with pytest.raises(InputError, match="adds nothing to the residual stream between layers"):
        _run(llava, llava.prepare([T.image(84)], [T.prompt("llava")]),
             interventions=[ZeroSublayer(sublayer="injection")])


def test_partition_on_qwen3_vl(tiny_vlm):
    """calibrate / classify / token sets on a DeepStack model: the partition classifies in the trace the same tokens
    whatever the batch, and Prune(part.token_set(g)) == Prune of the same positions given by hand."""
    from mech_vtokens.interventions import Prune
    from mech_vtokens.partition import calibrate

    vlm = tiny_vlm("qwen3_vl")
    ims = [T.image(112, s) for s in range(4)]
    prs = [T.prompt("qwen3_vl")] * 4
    part = calibrate(vlm, ims, prs)
    a = part.classify(ims[:2], prs[:2])
    b = part.classify(ims[:2], prs[:2], batch_size=1)
    assert torch.equal(a.codes, b.codes)
    batch = vlm.prepare(ims[:2], prs[:2])
    pruned = 0
    for group in ("dead", "alive"):
        sel = part.token_set(group).visual(batch)
        if not bool(sel.any()):  # (every visual token in one group: all DeepStack rows pruned, an edge case)
            continue
        by_set = _run(vlm, batch, [Activations(["unembed.hook_out"])], [Prune(part.token_set(group))])[0]
        by_hand = _run(vlm, batch, [Activations(["unembed.hook_out"])],
                       [Prune(Positions(sel.nonzero().flatten().tolist()))])[0]
        assert torch.equal(by_set["unembed.hook_out"], by_hand["unembed.hook_out"]), group
        pruned += 1
    assert pruned, "the tiny model's partition gave no group to prune"


@pytest.mark.parametrize("which", ["entry", "exit"])
@pytest.mark.parametrize("subset", [False, True])
def test_entry_exit_put_deepstack_back_only_where_the_tokens_are(tiny_vlm, which, subset):
    """VisualEntry(1) / VisualExit(1) on a model that injects after layers 0 and 1: the LM call holds one DeepStack
    mask for all layers, so the interventions take the vectors out of it and add them at their sites for the tokens
    in the sequence there (Entry: after layer 1 on the full sequence, after layer 0 only for tokens outside the set;
    Exit: the reverse). Equals the hand-run layers (tests/test_entry_knockout.py) on nnsight, remote="local" and
    plain hooks; a token subset keeps the other tokens' vectors in the shortened window."""
    from intervention_refs import batch_of, clean_lm_kwargs
    from test_entry_knockout import entry_reference, exit_reference

    from mech_vtokens.interventions import VisualEntry, VisualExit, resolve

    vlm = tiny_vlm("qwen3_vl")
    b = batch_of(vlm, "qwen3_vl")
    tokens = Positions(list(range(0, b.n_visual, 2))) if subset else "all"
    comp = (VisualEntry if which == "entry" else VisualExit)(1, tokens=tokens)
    sel = resolve(comp.tokens, b)
    clean = clean_lm_kwargs(vlm, b)
    got = _run(vlm, b, [Activations(["unembed.hook_out"] + _sites(vlm))], [comp])[0]
    logits = got["unembed.hook_out"]
    if which == "entry":
        for r, (cols, ref) in enumerate(entry_reference(vlm, clean, sel, 1)):
            assert (logits[r, cols] - ref).abs().max() < 1e-5
    else:
        for r, ref in enumerate(exit_reference(vlm, clean, sel, 1)):  # rows left-padded: the tail is the row
            assert (logits[r, -ref.shape[0]:] - ref).abs().max() < 1e-5
    # the DeepStack sites hold what was added: every row of the tokens in the sequence there, none of the others
    _, rows, _ = _hf(vlm, b)
    inside = {"entry": (1,), "exit": (0,)}[which]  # the injection on the full sequence
    for j, site in enumerate(_sites(vlm)):
        vis = got[site][b.visual_mask] if j in inside else None
        if vis is not None:
            assert torch.equal(vis, rows[j])
        else:  # in the shortened window: only the tokens outside the set, at their new positions
            kept = (~sel)[b.visual_mask]
            assert int((got[site].abs().sum(-1) > 0).sum()) == int(kept.sum())
    far = _run(vlm, b, [Activations(["unembed.hook_out"])], [comp], remote="local")[0]["unembed.hook_out"]
    assert torch.equal(far, logits)
    with applied(vlm, b, interventions=[comp]), torch.no_grad():
        hooked = vlm.hf(**b.inputs).logits
    assert torch.equal(hooked, logits)


@pytest.mark.parametrize("remote", [False, "local"])
def test_generate_without_deepstack_equals_hf_generate_with_it_zeroed(tiny_vlm, remote):
    """mv.generate under ZeroSublayer(sublayer="injection") == HF greedy generate whose LM call receives zeroed
    DeepStack rows (they exist on the prefill only); and the change matters."""
    import mech_vtokens as mv

    vlm = tiny_vlm("qwen3_vl")
    ims, prs = _inputs(vlm, "qwen3_vl")
    batch = vlm.prepare(ims, prs)
    zero = ZeroSublayer("all", layers=list(vlm.adapter.injection_layers()), sublayer="injection")
    out = mv.generate(vlm, ims, prs, interventions=[zero], max_new_tokens=6, min_new_tokens=6, do_sample=False,
                      remote=remote)

    def pre(mod, args, kwargs):
        rows = kwargs.get("deepstack_visual_embeds")
        if rows is None:
            return None
        return args, dict(kwargs, deepstack_visual_embeds=[torch.zeros_like(r) for r in rows])

    h = _resolve(vlm.hf, vlm.adapter.language_model).register_forward_pre_hook(pre, with_kwargs=True)
    try:
        with torch.no_grad():
            want = vlm.hf.generate(**batch.inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    finally:
        h.remove()
    with torch.no_grad():
        clean = vlm.hf.generate(**batch.inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert torch.equal(out.sequences, want)
    assert not torch.equal(want, clean)


def test_prune_slices_deepstack_with_the_sequence(tiny_vlm):
    """Prune removes the pruned tokens' DeepStack rows and mask entries with them: the injection site after the prune
    reads, for each visual token still in the sequence, its own row on nnsight, remote="local" and plain hooks, and
    the logits equal the hand-built pruned forward (tests/test_interventions.py, every family)."""
    from intervention_refs import batch_of

    from mech_vtokens.interventions import Prune

    vlm = tiny_vlm("qwen3_vl")
    b = batch_of(vlm, "qwen3_vl")
    some = list(range(1, b.n_visual, 3))
    _, rows, _ = _hf(vlm, b)
    probe = Activations(_sites(vlm), visual_only=True)
    res = [_run(vlm, b, [probe, Activations(["unembed.hook_out"])], [Prune(Positions(some))], remote=rm)
           for rm in (False, "local")]
    with applied(vlm, b, interventions=[Prune(Positions(some))], probes=[probe]) as ap, torch.no_grad():
        hooked = vlm.hf(**b.inputs).logits
    hooked_rows = ap.experiment.results(ap.raw)[probe]
    pruned = torch.zeros(b.n_visual, dtype=torch.bool)
    pruned[some] = True
    for j, site in enumerate(_sites(vlm)):
        for got in (res[0][0][site], res[1][0][site], hooked_rows[site]):
            assert torch.equal(got, rows[j][~pruned])  # the visual tokens still in the sequence, in order
    assert torch.equal(res[0][1]["unembed.hook_out"], res[1][1]["unembed.hook_out"])
    assert torch.equal(res[0][1]["unembed.hook_out"], hooked)
