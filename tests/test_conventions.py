"""Issue 15 classes 8 and 9: own code between probe sites (a custom component, its contract in the README) and
the layer conventions that shift a comparison (the library's blocks vs the authors' output_hidden_states)."""

import nnsight
import pytest
import torch

import mech_vtokens as mv
from mech_vtokens import testing as T
from mech_vtokens.component import Probe
from mech_vtokens.errors import InputError
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
