"""The one site parser (``mech_vtokens.site_names``): every site of every family, the layer convention, the ordered
``site`` column of every probe table, one ``ln_final`` layer number everywhere, sink-dims presets from the adapter."""

from __future__ import annotations

import pytest

import mech_vtokens as mv
from mech_vtokens import testing as T
from mech_vtokens.errors import InputError

FAMILIES = T.FAMILIES


def _inputs(fam):
    return ([T.image(112, 0), T.image(96, 1)],
            [T.prompt(fam), T.prompt(fam, "is there a red circle on the left ?")])


@pytest.mark.parametrize("fam", FAMILIES)
def test_parser_on_every_site_of_every_family(tiny_vlm, fam):
    """Expected (tower, layer) from the adapter's MODULE PATHS (not from the name): a site whose module lies in
    vision block i is (vision, i), in decoder layer i is (lm, i); the LM's input sites are -1, the final norm and the
    unembedding n_layers."""
    a = tiny_vlm(fam).adapter
    n = a.n_layers
    assert a.forward_order[:a.n_vision_layers] == [f"vision.blocks.{i}.hook_resid_post"
                                                    for i in range(a.n_vision_layers)]
    kinds = set()
    for name in a.forward_order:
        info = a.parse_site(name)
        _, path, kind, index = a.site(name)
        if kind == "addend":  # a vector added after layer i (DeepStack): read at the NEXT module's input
            want = ("lm", a.parse_site(index[0]).layer)
            assert path in (f"{a.decoder_layers}.{want[1] + 1}", a.final_norm), (name, path)
        elif path.startswith(a.vision_layers + "."):
            want = ("vision", int(path[len(a.vision_layers) + 1:].split(".")[0]))
        elif path.startswith(a.decoder_layers + "."):
            want = ("lm", int(path[len(a.decoder_layers) + 1:].split(".")[0]))
        elif path in (a.final_norm, a.lm_head) or name == "unembed.hook_out":  # Gemma 4: the root's capped logits
            want = ("lm", n)
        else:
            assert path in (a.projector, a.language_model), (name, path)
            want = ("lm", -1)
        assert (info.tower, info.layer) == want, name
        assert info.name == name and name.endswith(info.hook)
        kinds.add(info.kind)
    assert kinds == {"vision_block", "projector", "embed", "lm_inputs", "block", "final_norm", "unembed"}
    # negative indices resolve first; the canonical-only parser refuses them with the fix named
    assert a.parse_site("blocks.-1.hook_mlp_out") == a.parse_site(f"blocks.{n - 1}.hook_mlp_out")
    assert a.parse_site("vision.blocks.-1.hook_resid_post").layer == a.n_vision_layers - 1
    from mech_vtokens.site_names import parse_site

    with pytest.raises(InputError, match="canonical"):
        parse_site("blocks.-1.hook_resid_post", n)


@pytest.fixture(scope="module")
def tables(tiny_vlm):
    """Every probe's table from one forward of a tiny Qwen2-VL (4 decoder layers)."""
    from mech_vtokens.probes import (Activations, EmbedLens, LabelMatching, LogitLens, NormTracker, SinkChannels,
                                     ViTSinks)

    vlm = tiny_vlm("qwen2_vl")
    ims, prs = _inputs("qwen2_vl")
    lens_sites = ["blocks.1.hook_resid_post", "ln_final.hook_normalized", "hook_embed", "blocks.0.hook_resid_post"]
    probes = [EmbedLens(k=2, sites=lens_sites), LogitLens(k=2), SinkChannels(dims=[1, 2], threshold=2.0),
              NormTracker(), ViTSinks(threshold=1.0), Activations(["blocks.1.hook_resid_post", "hook_embed"]),
              LabelMatching([["red"], ["blue"]], k=2, sites=lens_sites, lenses="EmbedLens")]
    res = mv.run(vlm, ims, prs, probes=probes)
    el, ll, sc, nt, vs, act, lm = (res[p] for p in probes)
    return vlm, {"EmbedLens": el.to_pandas(), "LogitLens": ll.to_pandas(), "SinkChannels": sc.to_pandas(),
                 "rank_tracking": sc.rank_tracking(), "NormTracker": nt.to_pandas(), "by_group": nt.by_group(),
                 "ViTSinks": vs.to_pandas(), "Activations": act.to_pandas(), "LabelMatching": lm.to_pandas(),
                 "hits": lm.hits()}


def test_every_probe_table_orders_site_in_forward_order(tables):
    vlm, dfs = tables
    import pandas as pd

    order = vlm.adapter.forward_order
    for name, df in dfs.items():
        col = df["site"]
        assert isinstance(col.dtype, pd.CategoricalDtype) and col.cat.ordered, name
        cats = list(col.cat.categories)
        assert set(cats) == set(col.astype(str)), name  # categories: the sites read, nothing else
        assert cats == sorted(cats, key=order.index), name
        # sorting the table follows the forward pass: hook_embed before every block, blocks in layer order
        assert list(dict.fromkeys(df.sort_values("site", kind="stable")["site"].astype(str))) == cats, name
        if name not in ("ViTSinks", "NormTracker", "by_group"):
            assert cats[0] == "hook_embed", name
    assert list(dfs["NormTracker"]["site"].cat.categories[:2]) == ["vision.blocks.0.hook_resid_post",
                                                                 "vision.blocks.1.hook_resid_post"]
    nt_lm = [c for c in dfs["NormTracker"]["site"].cat.categories if not c.startswith("vision.")]
    assert nt_lm[0] == "hook_embed" and nt_lm[1:] == [f"blocks.{i}.hook_resid_post" for i in range(vlm.n_layers)]
    # groupby follows the forward order too (not alphabetical: "blocks.*" < "hook_embed" < "ln_final" < "vision")
    g = dfs["EmbedLens"].groupby("site", observed=True).score.mean()
    assert list(g.index) == ["hook_embed", "blocks.0.hook_resid_post", "blocks.1.hook_resid_post",
                             "ln_final.hook_normalized"]


def test_one_layer_number_per_site_in_every_table(tables):
    """ln_final = n_layers, hook_embed = -1, blocks.i = i, vision blocks their own index with tower 'vision', in
    every table that has a layer column (SparsityResult included)."""
    from mech_vtokens.partition.sparsity import SparsityResult

    vlm, dfs = tables
    n = vlm.n_layers
    want = {"hook_embed": -1, "ln_final.hook_normalized": n, **{f"blocks.{i}.hook_resid_post": i for i in range(n)},
            **{f"blocks.{i}.hook_resid_mid": i for i in range(n)}}
    sp = SparsityResult({s: [1, 2, 1, 4] for s in ["hook_embed", "blocks.1.hook_resid_post",
                                                     "ln_final.hook_normalized"]}, n, 5).to_pandas()
    seen = set()
    for name, df in {**dfs, "SparsityResult": sp}.items():
        if "layer" not in df:
            continue
        lm = df[df.tower == "lm"] if "tower" in df else df
        for site, layer in zip(lm.site.astype(str), lm.layer):
            assert layer == want[site], (name, site, layer)
            seen.add(site)
    assert "ln_final.hook_normalized" in seen and "hook_embed" in seen
    v = dfs["NormTracker"][dfs["NormTracker"].tower == "vision"]
    assert sorted(set(zip(v.site.astype(str), v.layer))) == [(f"vision.blocks.{i}.hook_resid_post", i)
                                                            for i in range(vlm.n_vision_layers)]
    assert (dfs["ViTSinks"].vision_layer == vlm.n_vision_layers - 1).all()


def test_sink_dims_presets_come_from_the_adapter(tiny_vlm, monkeypatch):
    """A preset is looked up on the model's adapter: LLaVA declares the LLaMA-2 channels (keyed by checkpoint and
    by LM), Qwen declares none, so the same preset is refused there before the forward."""
    from mech_vtokens.adapters.llava import LlavaAdapter
    from mech_vtokens.probes import SinkChannels

    assert LlavaAdapter.sink_dims["llava-hf/llava-1.5-7b-hf"] == (1415, 2533)
    vlm = tiny_vlm("llava")
    ims, prs = _inputs("llava")
    with pytest.raises(InputError, match="outside the hidden size"):  # found for llava; 1415 >= d_model 64
        mv.run(vlm, ims, prs, probes=[SinkChannels(dims="llava-hf/llava-1.5-7b-hf")])
    q = tiny_vlm("qwen2_vl")
    with pytest.raises(InputError, match="not declared for this qwen2_vl model"):
        mv.run(q, *_inputs("qwen2_vl"), probes=[SinkChannels(dims="llama2-7b")])
    # a preset declared on the adapter with this model's width is what the probe uses
    monkeypatch.setattr(LlavaAdapter, "sink_dims", {**LlavaAdapter.sink_dims, "tiny": (3, 10)})
    sc = mv.run(vlm, ims, prs, probes=[SinkChannels(dims="tiny", threshold=2.0)])["sink_channels"]
    assert sc.sink_dims == [3, 10]
    ref = mv.run(vlm, ims, prs, probes=[SinkChannels(dims=[3, 10], threshold=2.0)])["sink_channels"]
    assert sc.to_pandas().phi.equals(ref.to_pandas().phi)
