"""Qwen3.5 (dense and MoE): the hybrid decoder (linear-attention layers between full-attention ones), each against an
independent reference.

The family-parametrised tests (sites vs HF, geometry marker, every probe vs plain torch, every intervention vs a
reference forward, cached generation == re-running the forward, partition, remote="local", the TL bridge) run on the
tiny Qwen3.5 fixtures (layers: linear, full, full) and the real-file fixtures (linear, full) too; here:

- the sites declared per layer kind: ``hook_attn_out`` is the gated delta net's output on a linear layer (plain torch
  hooks), the residual decomposition holds on both kinds, ``attn.hook_pattern`` exists on full layers only;
- what reads or edits attention weights (AttentionKnockout, HeadKnockout, the pattern site) refuses a linear layer
  before any forward, naming the layers it can act on;
- sequence changes AFTER a linear layer's position in the stack (a 4-layer variant: full, linear, full, linear):
  Prune / VisualEntry / VisualExit against hand-built per-row forwards (the LM's own modules on the unpadded rows),
  and HF's cached generate under them == re-running the intervened forward (the recurrent state of the changed
  sequence is what the decode steps continue);
- the real fixture's boxes against the processor's own resize arithmetic (``smart_resize``).
"""

from __future__ import annotations

import pytest
import torch

import mech_vtokens as mv
from mech_vtokens import testing as T
from mech_vtokens.adapters.base import _resolve
from mech_vtokens.errors import InputError
from mech_vtokens.interventions import AttentionKnockout, HeadKnockout, Prune, VisualEntry, VisualExit
from mech_vtokens.probes.activations import Activations
from mech_vtokens.token_sets import Positions

import families as FM
from intervention_refs import batch_of, clean_lm_kwargs, lm_of, nn_run

QWEN35 = ("qwen3_5", "qwen3_5_moe", "Qwen/Qwen3.5-0.8B@float32", "Qwen/Qwen3.5-35B-A3B@float32")
TOL = 1e-5


def _kinds(vlm):
    return list(vlm.hf.config.get_text_config().layer_types)


# ---- sites per layer kind ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", QWEN35)
def test_block_sites_per_layer_kind_equal_plain_hooks(tiny_vlm, family):
    vlm = tiny_vlm(family)
    kinds = _kinds(vlm)
    assert "linear_attention" in kinds and "full_attention" in kinds  # the fixture exercises both kinds
    ad = vlm.adapter
    for i, kind in enumerate(kinds):
        mixer = "linear_attn" if kind == "linear_attention" else "self_attn"
        assert ad.site(f"blocks.{i}.hook_attn_out")[1] == f"{ad.decoder_layers}.{i}.{mixer}"
        assert f"blocks.{i}.hook_attn_out" in vlm.sites
        if kind == "full_attention":
            ad.site(f"blocks.{i}.attn.hook_pattern")
    full = [i for i, k in enumerate(kinds) if k == "full_attention"]
    assert ad.layers_with("attn.hook_pattern") == full
    # values: plain torch hooks on each layer's mixer, MLP, input and output (no nnsight, no site table)
    batch = batch_of(vlm, family)
    got, hooks = {}, []
    for i, layer in enumerate(_resolve(vlm.hf, ad.decoder_layers)):
        mixer = layer.linear_attn if kinds[i] == "linear_attention" else layer.self_attn

        def keep(name, index=None):
            def fn(mod, args, out):
                got[name] = (out if index is None else out[index]).detach().clone()
            return fn
        hooks.append(mixer.register_forward_hook(keep(f"blocks.{i}.hook_attn_out",
                                                      None if kinds[i] == "linear_attention" else 0)))
        hooks.append(layer.mlp.register_forward_hook(keep(f"blocks.{i}.hook_mlp_out")))
        hooks.append(layer.register_forward_hook(keep(f"blocks.{i}.hook_resid_post")))
    try:
        with torch.no_grad():
            vlm.hf(**batch.inputs)
    finally:
        for h in hooks:
            h.remove()
    sites = [f"blocks.{i}.{h}" for i in range(vlm.n_layers)
             for h in ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post")]
    acts = nn_run(vlm, batch, [], [Activations(sites)])[1]["activations"]
    for name, want in got.items():
        assert torch.equal(acts[name], want), name
    for i in range(vlm.n_layers):  # the residual decomposition, on both kinds, bit for bit (the model's own adds)
        a = {h: acts[f"blocks.{i}.{h}"] for h in ("hook_resid_pre", "hook_attn_out", "hook_resid_mid",
                                                   "hook_mlp_out", "hook_resid_post")}
        assert torch.equal(a["hook_resid_pre"] + a["hook_attn_out"], a["hook_resid_mid"]), (i, kinds[i])
        assert torch.equal(a["hook_resid_mid"] + a["hook_mlp_out"], a["hook_resid_post"]), (i, kinds[i])


@pytest.mark.parametrize("family", ["qwen3_5", "qwen3_5_moe"])
def test_pattern_consumers_refuse_linear_layers_before_any_work(tiny_dir, family):
    vlm = mv.load(tiny_dir(family), attn_implementation="eager")
    linear = [i for i, k in enumerate(_kinds(vlm)) if k == "linear_attention"]
    assert linear == [0]
    calls = []
    hook = vlm.hf.model.visual.register_forward_pre_hook(lambda *a: calls.append(1))  # the first module to run
    imgs, prompts = [T.image(seed=1), T.image(seed=2)], [T.prompt(family), T.prompt(family, "describe the image")]
    msg = r"decoder layer 0 of this qwen3_5\w* model is a 'linear_attention' layer, .*the layers that have it: \[1, 2\]"
    try:
        for kw in ({"interventions": [AttentionKnockout("vt", 0)]},
                   {"interventions": [AttentionKnockout("vv", [-3, 1])]},
                   {"interventions": [HeadKnockout([0], layers=[0, 1])]},
                   {"interventions": [HeadKnockout({0: [1]})]},
                   {"probes": [Activations(["blocks.0.attn.hook_pattern"])]}):
            with pytest.raises(InputError, match=msg):
                mv.run(vlm, imgs, prompts, **kw)
        assert not calls  # refused before any forward
        with pytest.raises(InputError, match=msg):
            mv.generate(vlm, imgs, prompts, interventions=[AttentionKnockout("vt", 0, every_step=True)],
                        max_new_tokens=2)
        assert not calls
        clean = mv.run(vlm, imgs, prompts, probes=[Activations(["unembed.hook_out"])])["activations"]
        cut = mv.run(vlm, imgs, prompts, probes=[Activations(["unembed.hook_out"])],
                     interventions=[AttentionKnockout("vt", [1, 2])])["activations"]
        assert (clean["unembed.hook_out"] - cut["unembed.hook_out"]).abs().max() > 1e-3  # the full layers: it acts
    finally:
        hook.remove()


# ---- sequence changes with linear layers after them -------------------------------------------------------------

_HYBRID = ["full_attention", "linear_attention", "full_attention", "linear_attention"]


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory):
    """The tiny Qwen3.5 with 4 decoder layers: full, linear, full, linear (the shared fixture's only linear layer is
    layer 0, before any entry / exit): linear layers run on the changed sequence, at a prefill and on decode steps."""
    out = tmp_path_factory.mktemp("qwen3_5_hybrid")
    return mv.load(T._save(*T._qwen3_5(0, False, layer_types=_HYBRID), out))


def _reference_rows(vlm, clean, keep_cols, pos_of):
    """Per row: the LM (its own module, its own masks) on the row's kept real columns, no padding, at ``pos_of``'s
    position ids; the logits of those columns."""
    lm = lm_of(vlm)
    out = []
    with torch.no_grad():
        for r in range(clean["inputs_embeds"].shape[0]):
            cols = keep_cols[r]
            h = lm(inputs_embeds=clean["inputs_embeds"][r:r + 1, cols], position_ids=pos_of(r, cols)).last_hidden_state
            out.append(vlm.hf.lm_head(h)[0])
    return out


def test_prune_on_a_hybrid_stack_equals_the_lm_on_the_kept_tokens(hybrid):
    vlm = hybrid
    b = batch_of(vlm, "qwen3_5")
    clean = clean_lm_kwargs(vlm, b)
    am, pos, vm = clean["attention_mask"], clean["position_ids"], b.visual_mask
    assert not am.bool().all()  # a left-padded row: the recurrent state must not see its padding
    drop = [0, 2, 5, 9]
    logits, _ = nn_run(vlm, b, [Prune(Positions.each_image(drop))])
    keep = []
    for r in range(vm.shape[0]):
        vis = vm[r].nonzero().flatten()
        gone = torch.zeros_like(vm[r])
        gone[vis[torch.tensor(drop)]] = True
        keep.append((am[r].bool() & ~gone).nonzero().flatten())
    refs = _reference_rows(vlm, clean, keep, lambda r, cols: pos[:, r:r + 1, cols])  # original positions (gaps)
    for r, ref in enumerate(refs):
        assert (logits[r, -ref.shape[0]:] - ref).abs().max() < TOL, r


@pytest.mark.parametrize("k", [1, 2])
def test_entry_exit_on_a_hybrid_stack_equal_hand_built_forwards(hybrid, k):
    from test_entry_knockout import entry_reference, exit_reference

    vlm = hybrid
    b = batch_of(vlm, "qwen3_5")
    clean = clean_lm_kwargs(vlm, b)
    assert "linear_attention" in _kinds(vlm)[k:]  # a linear layer runs on the changed sequence
    logits, _ = nn_run(vlm, b, [VisualEntry(k)])
    for r, (cols, ref) in enumerate(entry_reference(vlm, clean, b.visual_mask, k)):
        assert (logits[r, cols] - ref).abs().max() < TOL, ("entry", k, r)
    logits, _ = nn_run(vlm, b, [VisualExit(k)])
    for r, ref in enumerate(exit_reference(vlm, clean, b.visual_mask, k)):
        assert (logits[r, -ref.shape[0]:] - ref).abs().max() < TOL, ("exit", k, r)


def test_cached_generate_on_a_hybrid_stack_equals_rerunning_the_forward(hybrid):
    """HF's cached generate (hybrid cache: conv + recurrent state on linear layers, keys on full ones) under each
    sequence change == greedy decoding by re-running the whole intervened forward on prompt + generated tokens; and
    mv.generate == HF's generate."""
    from test_generate import CASES, cached_generate, rerun_reference, special_ids

    vlm = hybrid
    b = batch_of(vlm, "qwen3_5")
    clean, clean_ids = cached_generate(vlm, b, [])
    ref, _ = rerun_reference(vlm, b, [])
    assert (clean - ref).abs().max() < TOL
    cases = dict(CASES, **{"entry-3": lambda: [VisualEntry(3)], "exit-3": lambda: [VisualExit(3)]})
    for name, make in cases.items():
        got, ids = cached_generate(vlm, b, make())
        ref, ref_ids = rerun_reference(vlm, b, make())
        assert (got - ref).abs().max() < TOL, name
        assert torch.equal(ids, ref_ids), name
        assert (got[:, 1:] - clean[:, 1:]).abs().max() > 1e-3, name  # it acted on the decode steps too
    out = mv.generate(vlm, b.images, b.prompts, interventions=[VisualExit(1)], max_new_tokens=4,
                      suppress_tokens=special_ids(vlm))
    _, want = cached_generate(vlm, b, [VisualExit(1)], steps=4)
    assert torch.equal(out.sequences, want)


# ---- geometry of the real fixture ----------------------------------------------------------------------------

def test_real_boxes_follow_the_processors_resize(tiny_vlm):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    vlm = tiny_vlm("Qwen/Qwen3.5-0.8B@float32")
    ip = vlm.processor.image_processor
    img = T.image(seed=3, size=224).resize((300, 170))
    b = vlm.prepare([img], [FM.prompt(vlm, "Qwen/Qwen3.5-0.8B")])
    factor = ip.patch_size * ip.merge_size  # 16 x 2 on the hub
    assert factor == 32
    h, w = smart_resize(170, 300, factor=factor, min_pixels=ip.size["shortest_edge"],
                        max_pixels=ip.size["longest_edge"])
    rows, cols = h // factor, w // factor
    assert b.grids == [{"rows": rows, "cols": cols, "tiles": 1}] and b.n_visual == rows * cols
    box = b.tokens["box"]
    r, c = b.tokens["row"], b.tokens["col"]
    want = torch.stack([c * 300 / cols, r * 170 / rows, (c + 1) * 300 / cols, (r + 1) * 170 / rows], 1)
    assert torch.allclose(box.double(), want.double(), atol=1e-4)
