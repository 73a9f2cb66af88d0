"""Issue 15 classes 8 and 9: own code between probe sites (a custom component, its contract in the README) and
the layer conventions that shift a comparison (the library's blocks vs the authors' output_hidden_states)."""

import nnsight
import pytest
import torch

from mech_vtokens import testing as T
from mech_vtokens.component import Probe
from mech_vtokens.errors import InputError
from mech_vtokens.loop import forward
from mech_vtokens.probes import EmbedLens


class BlockOutput(Probe):
    """The README's example component: the residual stream after one decoder block, at the visual tokens."""

    def __init__(self, layer=1):
        self.layer = layer

    def sites(self, vlm):
        return [f"blocks.{self.layer}.hook_resid_post"]

    def at(self, site, value, ctx, out):
        out["resid"] = value.detach().float()

    def collect(self, raw, batch, vlm):
        return raw["resid"]


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_own_component_between_probe_sites_equals_plain_hf(tiny_vlm, family):
    vlm = tiny_vlm(family)
    batch = vlm.prepare([T.image(60, seed=1)], [vlm.prompt("describe the image .")])
    exp = vlm.experiment(batch, probes=[EmbedLens(k=3), BlockOutput(1)])
    with vlm.trace(**batch.inputs):
        raw = nnsight.save(exp.execute(vlm.model))
    res = exp.results(raw)
    with torch.no_grad():
        hs = vlm.hf(**batch.inputs, output_hidden_states=True).hidden_states
    got = res["block_output"]
    assert got.shape == hs[2].shape
    assert torch.allclose(got, hs[2].float(), atol=1e-5, rtol=1e-4)  # block 1's output = hidden_states[2]
    assert "embed_lens" in res


def test_own_read_out_of_order_with_execute_names_the_component_pattern(tiny_vlm):
    vlm = tiny_vlm("llava")
    batch = vlm.prepare([T.image(60, seed=1)], [vlm.prompt("describe the image .")])
    layers = vlm.model.model.language_model.layers
    reads = [lambda: layers[1].output, lambda: layers[2].input, lambda: vlm.model.lm_head.output]
    for read in reads:  # each: a read of one's own placed before execute, which visits earlier sites
        exp = vlm.experiment(batch, probes=[EmbedLens(k=3)])
        with pytest.raises(InputError, match="Write your own component") as err:
            with vlm.trace(**batch.inputs):
                nnsight.save(read())
                nnsight.save(exp.execute(vlm.model))
        assert "already ran past" in str(err.value) and "Probe" in str(err.value)


@pytest.mark.parametrize("remote", [False, "local"])
def test_own_read_after_execute_at_a_passed_site_names_the_component_pattern(tiny_vlm, remote):
    """A read placed AFTER exp.execute: at a site the plan already passed (a block before its last site, the LM
    input, the vision tower) -> the InputError naming the component pattern, from the trace's exit; at a site
    after the plan's last one it works and equals plain HF; a later trace without an Experiment keeps nnsight's own
    error (the translation belongs to the run that executed)."""
    vlm = tiny_vlm("llava")
    batch = vlm.prepare([T.image(60, seed=1)], [vlm.prompt("describe the image .")])
    m = vlm.model.model
    passed = [lambda: m.language_model.layers[0].output, lambda: m.language_model.layers[1].input,
              lambda: m.language_model.layers[0].mlp.output, lambda: m.vision_tower.encoder.layers[0].output]
    for read in passed:
        exp = vlm.experiment(batch, probes=[BlockOutput(1)])
        with pytest.raises(InputError, match="Write your own component") as err:
            with vlm.trace(**batch.inputs, remote=remote):
                nnsight.save(exp.execute(vlm.model))
                nnsight.save(read())
        assert "already ran past" in str(err.value) and "Probe" in str(err.value)
    exp = vlm.experiment(batch, probes=[BlockOutput(0)])
    with vlm.trace(**batch.inputs, remote=remote):
        raw = nnsight.save(exp.execute(vlm.model))
        later = nnsight.save(m.language_model.layers[1].output)
    with torch.no_grad():
        hs = vlm.hf(**batch.inputs, output_hidden_states=True).hidden_states
    later = later[0] if isinstance(later, tuple) else later
    assert torch.allclose(later.float(), hs[2].float(), atol=1e-5, rtol=1e-4)  # block 1's output
    assert torch.allclose(exp.results(raw)["block_output"], hs[1].float(), atol=1e-5, rtol=1e-4)
    if remote is False:
        with pytest.raises(Exception, match="already ran past") as raw_err:  # no Experiment in this trace
            with vlm.trace(**batch.inputs):
                nnsight.save(m.language_model.layers[1].output)
                nnsight.save(m.language_model.layers[0].output)
        assert not isinstance(raw_err.value, InputError)


# ---- class 9: the layer convention is a name, stated in the table -------------------------------------------------

def _hf_states(vlm, batch):
    with torch.no_grad():
        out = vlm.hf(**batch.inputs, output_hidden_states=True)
    return out.hidden_states, out.logits


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_hidden_states_convention_equals_plain_torch_on_hf_output_hidden_states(tiny_vlm, family):
    from mech_vtokens.probes import LogitLens

    vlm = tiny_vlm(f"{family}@float32")
    batch = vlm.prepare([T.image(60, seed=2), T.image(72, seed=3)], [vlm.prompt("describe the image .")] * 2)
    k, n, V = 4, vlm.n_layers, len(vlm.tokenizer)
    res = forward(vlm, batch, probes=[EmbedLens(k=k, layers="hidden_states"), LogitLens(k=k, layers="hidden_states"),
                                     EmbedLens(k=k).named("blocks_lens")])
    hs, logits = _hf_states(vlm, batch)
    assert len(hs) == n + 1
    vm = batch.visual_mask
    E = vlm.embedding_matrix[:V].float()
    W = vlm.hf.get_output_embeddings().weight[:V].float()
    norm = vlm.hf.get_decoder().norm
    emb, log = res["embed_lens"], res["logit_lens"]
    for lens in (emb, log):
        assert lens.layers == "hidden_states"
    for i in range(n + 1):
        h = hs[i][vm].float()
        want = torch.nn.functional.normalize(h, dim=-1) @ torch.nn.functional.normalize(E, dim=-1).T
        site = [s for s in emb.ids if emb.layer_of(s) == i]
        assert len(site) == 1 and torch.equal(emb.ids[site[0]], want.topk(k, dim=-1).indices), (family, i, site)
        lsite = [s for s in log.ids if log.layer_of(s) == i]
        wl = logits[vm][:, :V] if i == n else norm(hs[i])[vm].float() @ W.T  # the last entry: the model's logits
        assert len(lsite) == 1 and torch.equal(log.ids[lsite[0]], wl.topk(k, dim=-1).indices), (family, i)
    df = emb.to_pandas()
    assert "hidden_state" in df and "layer" not in df and df.attrs["layers"] == "hidden_states"
    assert sorted(df.hidden_state.unique()) == list(range(n + 1))
    assert df.loc[df.hidden_state == n, "site"].iloc[0] == "ln_final.hook_normalized"  # after the final norm
    dfb = res["blocks_lens"].to_pandas()  # the library's default, unchanged: -1 = LM input, n-1 = last block
    assert sorted(dfb.layer.unique()) == list(range(-1, n)) and dfb.attrs["layers"] == "blocks"
    assert res["blocks_lens"].layer_of(f"blocks.{n - 1}.hook_resid_post") == n - 1  # before the final norm


def test_label_matching_in_either_convention_and_bad_conventions_refused(tiny_vlm):
    from mech_vtokens.probes import LabelMatching, LogitLens

    vlm = tiny_vlm("llava")
    n = vlm.n_layers
    batch = vlm.prepare([T.image(60, seed=2)], [vlm.prompt("describe the image .")])
    res = forward(vlm, batch, probes=[LabelMatching([["cat", "dog"]], layers="hidden_states"),
                                     LabelMatching([["cat", "dog"]]).named("lm_blocks")])
    a, b = res["label_matching"].to_pandas(), res["lm_blocks"].to_pandas()
    assert a.attrs["layers"] == "hidden_states" and sorted(a.hidden_state.unique()) == list(range(n + 1))
    assert b.attrs["layers"] == "blocks" and sorted(b.layer.unique()) == list(range(-1, n))
    fig = res["label_matching"].plot()
    assert "output_hidden_states" in fig.axes[0].get_xlabel()
    bad = [lambda: EmbedLens(layers="hidden_state"), lambda: LogitLens(layers="paper"),
           lambda: LabelMatching([["cat"]], layers="Blocks"),
           lambda: EmbedLens(layers="hidden_states", sites=[f"blocks.{n - 1}.hook_resid_post"]).sites(vlm),
           lambda: EmbedLens(layers="hidden_states", sites=["blocks.0.hook_attn_out"]).sites(vlm),
           lambda: LogitLens(layers="hidden_states", sites=["hook_embed", "ln_final.hook_normalized"]).sites(vlm)]
    for make in bad:
        with pytest.raises(InputError, match="layers=|output_hidden_states|LogitLens cannot read"):
            make()


def test_own_read_in_a_second_invoke_next_to_execute_equals_plain_hf(tiny_vlm):
    """The other pattern the out-of-order message names: the read in its own tracer.invoke() block."""
    vlm = tiny_vlm("llava")
    batch = vlm.prepare([T.image(60, seed=1)], [vlm.prompt("describe the image .")])
    exp = vlm.experiment(batch, probes=[EmbedLens(k=3)])
    with vlm.trace() as tracer:
        with tracer.invoke(**batch.inputs):
            raw = nnsight.save(exp.execute(vlm.model))
        with tracer.invoke():
            mine = nnsight.save(vlm.model.model.language_model.layers[1].output)
    mine = mine[0] if isinstance(mine, tuple) else mine
    hs, _ = _hf_states(vlm, batch)
    assert torch.allclose(mine.float(), hs[2].float(), atol=1e-5, rtol=1e-4)
    with vlm.trace(**batch.inputs):
        ref = nnsight.save(vlm.experiment(batch, probes=[EmbedLens(k=3)]).execute(vlm.model))
    for site, ids in exp.results(raw)["embed_lens"].ids.items():
        assert torch.equal(ids, exp.results(ref)["embed_lens"].ids[site])
