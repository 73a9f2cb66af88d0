"""``Results`` (what ``mv.run`` returns): keys by component name, duplicate suffixes, lookup by the component object,
the KeyError's message, ``to_pandas`` over results with one table shape, every probe result's ``plot`` a Figure; and
``Intervention.report``: the logits / answer log-probs of the intervened forward, read in the trace, equal to plain
HF logits of the same forward under ``applied`` (the plain-torch path)."""

import matplotlib
import pandas as pd
import pytest
import torch

import mech_vtokens as mv
from mech_vtokens import testing as T
from mech_vtokens.errors import InputError
from mech_vtokens.interventions import Positions, Prune, Rescale, ZeroSublayer, applied
from mech_vtokens.probes import Activations, EmbedLens, LabelMatching, LogitLens, NormTracker, SinkChannels, ViTSinks
from mech_vtokens.results import InterventionResult, Results

FAM = "llava"


def _inputs(n=2):
    ims = [T.image(seed=1), T.image(seed=2)][:n]
    prs = [T.prompt(FAM), T.prompt(FAM, "how many objects are there in this picture ?")][:n]
    return ims, prs


@pytest.fixture(scope="module")
def vlm32(tiny_vlm):
    return tiny_vlm(FAM)


def test_keys_duplicates_object_lookup_and_key_errors(vlm32):
    ims, prs = _inputs()
    lens, lens2, logit, acts = EmbedLens(k=2), EmbedLens(k=3), LogitLens(k=2), Activations(["hook_embed"])
    prune = Prune(Positions([0, 1]))
    res = mv.run(vlm32, ims, prs, probes=[lens, logit, lens2, acts], interventions=[prune])
    assert list(res) == ["embed_lens", "logit_lens", "embed_lens_1", "activations", "prune"]  # probes, then ivs
    assert isinstance(res, Results) and len(res) == 5
    assert res[lens] is res["embed_lens"] and res[lens2] is res["embed_lens_1"] and res[prune] is res["prune"]
    # the suffix follows list order: the second EmbedLens (k=3) is embed_lens_1
    assert res[lens].ids["hook_embed"].shape[1] == 2 and res[lens2].ids["hook_embed"].shape[1] == 3
    assert isinstance(res["prune"], InterventionResult) and res["prune"].logits is None  # nothing asked
    assert lens in res and "logit_lens" in res and EmbedLens() not in res and "nope" not in res
    with pytest.raises(KeyError, match=r"did you mean 'embed_lens'\?.*'embed_lens_1', 'activations', 'prune'"):
        res["embed_len"]
    with pytest.raises(KeyError, match=r"not position: use res\['embed_lens'\]"):
        res[0]
    with pytest.raises(KeyError, match="is not a component of this run"):
        res[NormTracker()]
    with pytest.raises(TypeError):  # read-only
        res["x"] = 1
    assert "'embed_lens_1': LensResult [" in repr(res) and "'prune': InterventionResult [1 rows]" in repr(res)
    html = res._repr_html_()
    assert "<td>embed_lens_1</td><td>LensResult</td>" in html and html.count("<tr>") == 6
    # one object passed twice: its two results, ambiguous by object, distinct by key
    twice = mv.run(vlm32, ims, prs, probes=[acts, acts])
    assert list(twice) == ["activations", "activations_1"]
    with pytest.raises(KeyError, match=r"passed 2 times.*\['activations', 'activations_1'\]"):
        twice[acts]
    # a name of its own; the default names of every component class
    named = mv.run(vlm32, ims, prs, probes=[EmbedLens(k=2).named("early"), EmbedLens(k=2)])
    assert list(named) == ["early", "embed_lens"]
    with pytest.raises(InputError, match="non-empty string"):
        EmbedLens().named("")
    from mech_vtokens.interventions import AttentionKnockout, VisualEntry, VisualExit
    from mech_vtokens.partition import GroupDynamics, Partition

    names = {c.__name__: c.name for c in (EmbedLens, LogitLens, NormTracker, SinkChannels, ViTSinks, LabelMatching,
                                          Activations, Prune, Rescale, ZeroSublayer, AttentionKnockout, VisualEntry,
                                          VisualExit, Partition, GroupDynamics)}
    assert names == {"EmbedLens": "embed_lens", "LogitLens": "logit_lens", "NormTracker": "norm_tracker",
                     "SinkChannels": "sink_channels", "ViTSinks": "vit_sinks", "LabelMatching": "label_matching",
                     "Activations": "activations", "Prune": "prune", "Rescale": "rescale",
                     "ZeroSublayer": "zero_sublayer", "AttentionKnockout": "attention_knockout",
                     "VisualEntry": "visual_entry", "VisualExit": "visual_exit", "Partition": "partition",
                     "GroupDynamics": "group_dynamics"}


def test_to_pandas_concatenates_same_shaped_tables(vlm32):
    ims, prs = _inputs()
    res = mv.run(vlm32, ims, prs, probes=[EmbedLens(k=2, sites=["blocks.1.hook_resid_post"]),
                                          LogitLens(k=2, sites=["hook_embed", "blocks.0.hook_resid_post"])])
    df = res.to_pandas()
    e, lg = res["embed_lens"].to_pandas(), res["logit_lens"].to_pandas()
    assert list(df.columns) == ["result"] + list(e.columns) and len(df) == len(e) + len(lg)
    assert df["result"].tolist() == ["embed_lens"] * len(e) + ["logit_lens"] * len(lg)
    for key, want in (("embed_lens", e), ("logit_lens", lg)):
        got = df[df["result"] == key].drop(columns="result").reset_index(drop=True)
        pd.testing.assert_frame_equal(got.astype({"site": str}), want.astype({"site": str}))
    # the site column: ordered, the union of both in forward order (hook_embed < blocks.0 < blocks.1)
    assert df["site"].cat.ordered
    assert list(df["site"].cat.categories) == ["hook_embed", "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    assert df.sort_values("site", kind="stable")["site"].iloc[0] == "hook_embed"
    mixed = mv.run(vlm32, ims, prs, probes=[EmbedLens(k=2), NormTracker()])
    with pytest.raises(InputError, match=r"different tables.*pick one: res\['norm_tracker'\]\.to_pandas\(\)"):
        mixed.to_pandas()


def test_every_probe_result_plots_a_figure(vlm32):
    import matplotlib.pyplot as plt

    ims, prs = _inputs()
    probes = [EmbedLens(k=2), LogitLens(k=2), NormTracker(), SinkChannels(dims=[1, 2], threshold=2.0),
              ViTSinks(threshold=1.0), LabelMatching([["red"], ["blue"]], k=2)]
    iv = Rescale(Positions([3]), 2.0).report(answer_ids=[3, 4])
    res = mv.run(vlm32, ims, prs, probes=probes + [Activations(["hook_embed"])], interventions=[iv])
    before = plt.get_fignums()
    for key in [p.name for p in probes] + ["rescale"]:
        fig = res[key].plot()
        assert isinstance(fig, matplotlib.figure.Figure) and fig.axes, key
    assert plt.get_fignums() == before, "plot() must leave no open pyplot figure (nor show one)"
    with pytest.raises(InputError, match="ActivationsResult has no plot"):
        res["activations"].plot()
    plain = mv.run(vlm32, ims, prs, interventions=[Rescale(Positions([3]), 2.0)])
    with pytest.raises(InputError, match=r"report\(answer_ids="):
        plain["rescale"].plot()


def _last_attended(am):
    """Each row's last attended position, from the mask alone (an independent formula: the highest index whose
    mask is 1)."""
    idx = torch.arange(am.shape[1]).expand_as(am)
    return torch.where(am.bool(), idx, torch.full_like(idx, -1)).max(1).values


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_report_equals_plain_hf_logits_under_applied(vlm32, padding_side):
    """The report of Rescale + ZeroSublayer (and of Prune, whose forward is shorter) == the plain HF forward's logits
    under ``applied``, at each row's last attended position; its log-probs == log_softmax of those logits."""
    ims, prs = _inputs()
    batch = vlm32.prepare(ims, prs, padding_side=padding_side)
    am = batch.inputs["attention_mask"]
    last = _last_attended(am)
    if padding_side == "right":
        assert len(set(last.tolist())) == 2, "the rows must end at different positions"
    ids = [[3, 7, 11], [5, 2, 9]]  # one list per row
    cases = [lambda: [Rescale(Positions([2, 3]), 3.0), ZeroSublayer(Positions([5]), 1, "mlp")]]
    if padding_side == "left":  # Prune left-pads its shortened rows: the last position is the last column
        cases.append(lambda: [Prune(Positions([0, 4, 9]))])
    for make in cases:
        ivs = make()
        ivs[0].report(answer_ids=ids)
        res = mv.run(vlm32, ims, prs, probes=[EmbedLens(k=2)], interventions=ivs,
                     processor_kwargs={"padding_side": padding_side})
        with applied(vlm32, batch, interventions=make()), torch.no_grad():
            ref = vlm32.hf(**batch.inputs).logits.float()
        shortened = ref.shape[1] != am.shape[1]
        pos = torch.full_like(last, ref.shape[1] - 1) if shortened else last
        want = ref[torch.arange(2), pos]
        got = res[ivs[0]]
        assert torch.equal(got.position, pos)
        assert got.logits.device.type == "cpu" and got.logits.shape == want.shape
        assert float((got.logits - want).abs().max()) <= 1e-5
        lp = torch.log_softmax(want, -1).gather(1, torch.tensor(ids))
        assert float((got.logprob - lp).abs().max()) <= 1e-5
        df = got.to_pandas()
        assert df["answer_id"].tolist() == [3, 7, 11, 5, 2, 9] and df["row"].tolist() == [0, 0, 0, 1, 1, 1]
        assert abs(df["logprob"].to_numpy() - lp.flatten().numpy()).max() <= 1e-5
        assert res[ivs[1]].logits is None if len(ivs) > 1 else True  # only the one asked reports
        # the clean forward differs: the report sees the intervened one
        with torch.no_grad():
            clean = vlm32.hf(**batch.inputs).logits.float()[torch.arange(2), last]
        assert float((got.logits - clean).abs().max()) > 1e-3


def test_report_in_generate_and_remote_local(vlm32):
    """Under generate the report reads the prefill (HF keeps only the last logits there): equal to HF's own first
    step logits; remote='local' gives the same numbers."""
    ims, prs = _inputs()
    iv = Rescale(Positions([2, 3]), 3.0).report()
    gen = mv.generate(vlm32, ims, prs, interventions=[iv], max_new_tokens=2, return_dict_in_generate=True,
                      output_logits=True)
    step0 = gen.output.logits[0].float()
    assert float((gen.results[iv].logits - step0).abs().max()) <= 1e-5
    assert gen.results[iv].logprob is None and "top_id" in gen.results[iv].to_pandas()
    local = mv.run(vlm32, ims, prs, interventions=[iv])
    remote = mv.run(vlm32, ims, prs, interventions=[iv], remote="local")
    assert torch.equal(local[iv].logits, remote[iv].logits)
    assert float((local[iv].logits - step0).abs().max()) <= 1e-5


def test_report_adds_nothing_unless_asked_and_refuses_bad_input(vlm32):
    ims, prs = _inputs()
    batch = vlm32.prepare(ims, prs)
    quiet = vlm32.experiment(batch, interventions=[Rescale(Positions([2]), 2.0)])
    assert [s.name for s in quiet.plan] == ["hook_embed"] and len(quiet.comps) == 1
    asked = vlm32.experiment(batch, interventions=[Rescale(Positions([2]), 2.0).report()])
    assert [s.name for s in asked.plan] == ["hook_embed", "unembed.hook_out"]
    with pytest.raises(InputError, match="unknown report 'logits'"):
        Prune().report("logits")
    with pytest.raises(InputError, match="needs answer_ids"):
        Prune().report("answer_logprob")
    with pytest.raises(InputError, match="int token ids"):
        Prune().report(answer_ids=[0.5])
    vocab = vlm32.hf.lm_head.out_features
    with pytest.raises(InputError, match="outside the vocabulary"):
        mv.run(vlm32, ims, prs, interventions=[Rescale(Positions([2]), 2.0).report(answer_ids=[vocab])])
    with pytest.raises(InputError, match="3 lists of answer_ids for 2 prompts"):
        mv.run(vlm32, ims, prs, interventions=[Rescale(Positions([2]), 2.0).report(answer_ids=[[1], [2], [3]])])


def test_sparsity_table_orders_site_in_forward_order(vlm32):
    """SparsityResult's ``site`` is the ordered categorical every probe table has (its counts come in any order)."""
    from mech_vtokens.partition.sparsity import SparsityResult

    counts = {s: [1, 2, 1, 4] for s in ["ln_final.hook_normalized", "blocks.1.hook_resid_post", "hook_embed"]}
    df = SparsityResult(counts, vlm32.n_layers, 5, order=vlm32.adapter.forward_order).to_pandas()
    assert df["site"].cat.ordered
    want = ["hook_embed", "blocks.1.hook_resid_post", "ln_final.hook_normalized"]
    assert list(df.sort_values("site")["site"]) == want
