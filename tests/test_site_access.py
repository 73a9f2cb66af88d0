"""One site access for both backends (mech_vtokens.sites): the nnsight Experiment and the plain-hook harness
(interventions.applied) run the same plan and must give bit-identical logits and probe results for a mix of probes
and interventions, a sequence change (Prune) included."""

from __future__ import annotations

import nnsight
import pytest
import torch

from mech_vtokens.interventions import Positions, Prune, Rescale, ZeroSublayer, applied, resolve
from mech_vtokens.probes.activations import Activations
from mech_vtokens.probes.norm_tracker import NormTracker
from mech_vtokens.sites import HookCall, read, write
from intervention_refs import batch_of


def same(a, b):
    """Bit-identical, NaN where NaN (rows of pruned tokens read after the prune are NaN)."""
    return a.shape == b.shape and torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


def _components():
    sites = ["vision_projector.hook_out", "hook_embed", "blocks.0.hook_resid_post", "blocks.1.hook_attn_out",
             "blocks.1.hook_mlp_out", "ln_final.hook_normalized"]
    ivs = [Prune(Positions([0, 1, 2])), Rescale(Positions([5, 6]), 2.0), ZeroSublayer(Positions([7, 8]), 1, "mlp")]
    probes = [Activations(sites), Activations(sites[1:], visual_only=True), NormTracker()]
    return ivs, probes


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "qwen3_vl", "idefics3"])
def test_nnsight_and_hook_backends_bit_identical(tiny_vlm, family):
    vlm = tiny_vlm(family)
    b = batch_of(vlm, family)
    ivs, probes = _components()
    exp = vlm.experiment(b, probes=probes, interventions=ivs)
    with torch.no_grad(), vlm.trace(**b.inputs):
        raw = nnsight.save(exp.execute(vlm.model))
        nn_logits = nnsight.save(vlm.model.output.logits)
    nn_res = exp.results(raw)
    with applied(vlm, b, interventions=ivs, probes=probes) as run:
        with torch.no_grad():
            hook_logits = vlm.hf(**b.inputs).logits
    hook_res = run.experiment.results(run.raw)
    with torch.no_grad():
        clean = vlm.hf(**b.inputs).logits
    # the interventions really acted: rows lost their pruned tokens (left-padded to one width), the logits moved
    pruned = resolve(ivs[0].tokens, b).sum(1)
    assert int(pruned.sum()) == 3 and nn_logits.shape[1] == clean.shape[1] - int(pruned.min())
    assert not torch.allclose(nn_logits[:, -1], clean[:, -1])
    assert same(nn_logits, hook_logits)
    for a, h in ((nn_res[p], hook_res[p]) for p in probes[:2]):  # Activations, full and visual-only
        assert a.values.keys() == h.values.keys()
        for site in a.values:
            assert same(a[site], h[site]), site
    full, vis = nn_res[probes[0]], nn_res[probes[1]]
    assert full["hook_embed"].shape[1] == clean.shape[1]  # read before the prune: full length
    assert full["blocks.0.hook_resid_post"].shape[1] == nn_logits.shape[1]  # after it: shortened
    assert vis["blocks.0.hook_resid_post"].shape[0] == b.n_visual - 3  # the pruned tokens are gone
    nt, nh = nn_res["norm_tracker"].to_pandas(), hook_res["norm_tracker"].to_pandas()
    assert len(nt) > 0 and nt.equals(nh)


def test_hook_call_reads_and_writes_like_an_envoy():
    """HookCall gives the hook's output / (args, kwargs) the envoy's accessors; write replaces one part only."""
    x, y = torch.ones(2), torch.zeros(2)
    call = HookCall(output=(x, "attn"))
    assert read(call, "output", 0) is x and not call.written
    write(call, "output", 0, y)
    assert call.written and call.output[0] is y and call.output[1] == "attn"
    call = HookCall(inputs=((x, 3), {"mask": None}))
    assert read(call, "input", None) is x
    write(call, "input", None, y)
    assert call.inputs == ((y, 3), {"mask": None})
    call = HookCall(inputs=((), {"hidden_states": x, "mask": 1}))
    assert read(call, "input", None) is x and read(call, "kwarg", "mask") == 1
    write(call, "kwarg", "mask", 2)
    assert call.inputs[1] == {"hidden_states": x, "mask": 2}
    write(call, "input", None, y)
    assert call.inputs[1]["hidden_states"] is y and call.inputs[1]["mask"] == 2
