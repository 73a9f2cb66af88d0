"""The one batch loop and the one signature rule: unknown keywords / old argument orders are refused naming the fix
before any forward; the forwards a job runs are counted and the report states the count; a token set that
classifies its batch runs on the backend of the job; old names are gone."""

import json
import math

import pytest

import mech_vtokens as mv
from mech_vtokens import testing as T
from mech_vtokens.errors import InputError
from mech_vtokens.probes import EmbedLens


@pytest.fixture()
def lm_calls(tiny_vlm):
    """(vlm, list): one entry per forward of the language model (a generate prefill counts one)."""
    vlm = tiny_vlm("llava")
    calls = []
    h = vlm.hf.get_decoder().register_forward_hook(lambda *a: calls.append(1))
    yield vlm, calls
    h.remove()


def _inputs(n):
    return [T.image(seed=s) for s in range(n)], [T.prompt("llava")] * n


@pytest.mark.parametrize("call, wrong, right", [
    (lambda v, i, p: mv.run(v, i, p, probes=[EmbedLens()], intervention=[]), "intervention", "interventions"),
    (lambda v, i, p: mv.run(v, i, p, prob=[EmbedLens()]), "prob", "probes"),
    (lambda v, i, p: mv.generate(v, i, p, intervention=[], max_new_tokens=2), "intervention", "interventions"),
    (lambda v, i, p: mv.generate(v, i, p, max_new_token=2), "max_new_token", "max_new_tokens"),
    (lambda v, i, p: mv.suite.analyze(v, i, p, batchsize=2), "batchsize", "batch_size"),
    (lambda v, i, p: mv.runner.run_dataset(v, mv.data.InMemory(i), probes=["norms"], remot=False), "remot",
     "remote"),
    (lambda v, i, p: mv.partition.calibrate(v, i, p, batch_sise=2), "batch_sise", "batch_size"),
    (lambda v, i, p: mv.partition.semantic_sparsity(v, i, p, annotation=[[], []]), "annotation", "annotations"),
    (lambda v, i, p: mv.partition.cluster_dominance(v, i, p, progres=False), "progres", "progress"),
    (lambda v, i, p: mv.evaluate.evaluate(v, mv.data.InMemory(i), {"b": []}, scorr="exact"), "scorr", "scorer"),
])
def test_unknown_keyword_names_the_close_match_before_any_forward(lm_calls, call, wrong, right):
    import mech_vtokens.data  # noqa: F401
    import mech_vtokens.evaluate  # noqa: F401
    import mech_vtokens.partition  # noqa: F401
    import mech_vtokens.runner  # noqa: F401
    import mech_vtokens.suite  # noqa: F401

    vlm, calls = lm_calls
    ims, prs = _inputs(2)
    with pytest.raises(InputError, match=rf"unknown keyword {wrong}=; did you mean {right}=\?"):
        call(vlm, ims, prs)
    assert calls == []


def test_processor_options_go_in_processor_kwargs(lm_calls):
    vlm, calls = lm_calls
    ims, prs = _inputs(1)
    with pytest.raises(InputError, match=r"unknown keyword max_pixels=.*processor_kwargs=\{\.\.\.\}"):
        mv.run(vlm, ims, prs, probes=[EmbedLens()], max_pixels=1000)
    assert calls == []
    # HF generate's own options still pass through generate
    out = mv.generate(vlm, ims, prs, max_new_tokens=2, min_new_tokens=2)
    assert out.ids.shape[1] == 2


def test_old_positional_orders_are_refused_naming_the_new_call(lm_calls):
    from mech_vtokens.partition import Partition, semantic_sparsity, summarize

    vlm, calls = lm_calls
    ims, prs = _inputs(2)
    with pytest.raises(InputError, match=r"run\(vlm, images, prompts, \*, probes=.*keyword-only"):
        mv.run(vlm, ims, prs, [EmbedLens()])
    part = Partition("reference", {}, reference={"k": 1, "ids": {"dead": [1]}}, vlm=vlm)
    with pytest.raises(InputError, match=r"old order: call summarize\(vlm, images, prompts, partition=partition\)"):
        summarize(part, ims, prs)
    ann = [[{"bbox": [0, 0, 4, 4], "label": "red"}], []]
    with pytest.raises(InputError, match=r"old order: call semantic_sparsity\(vlm, images, prompts, annotations="):
        semantic_sparsity(vlm, ims, ann, prs)
    assert calls == []


@pytest.mark.parametrize("n, batch_size", [(5, 2), (3, 8)])
def test_analyze_runs_the_forwards_its_report_states(lm_calls, tmp_path, n, batch_size):
    vlm, calls = lm_calls
    ims, prs = _inputs(n)
    _, report = mv.suite.analyze(vlm, ims, prs, probes=["embed_lens", "norms"], batch_size=batch_size, out=tmp_path,
                                 progress=False, overlays=1)
    expected = math.ceil(n / batch_size)  # one forward per batch for every probe
    assert len(calls) == expected
    assert json.loads((tmp_path / "forwards.json").read_text()) == {"forwards": expected}
    with open(report) as f:
        assert f"; {expected} forwards in all." in f.read()


def test_analyze_with_the_partition_counts_every_job(lm_calls, tmp_path):
    vlm, calls = lm_calls
    ims, prs = _inputs(5)
    mv.suite.analyze(vlm, ims, prs, probes=["norms", "partition"], batch_size=2, calibration=3, out=tmp_path,
                     progress=False, overlays=1)
    # calibration (3 images) + its summary (3) + cluster dominance (3) + the suite over all 5 images
    expected = 3 * math.ceil(3 / 2) + math.ceil(5 / 2)
    assert len(calls) == expected
    assert json.loads((tmp_path / "forwards.json").read_text()) == {"forwards": expected}


def test_counting_counts_run_generate_and_nested_blocks(lm_calls):
    from mech_vtokens.loop import counting

    vlm, calls = lm_calls
    ims, prs = _inputs(2)
    with counting() as outer:
        mv.run(vlm, ims, prs, probes=[EmbedLens()])
        with counting() as inner:
            mv.generate(vlm, ims, prs, max_new_tokens=1)
    assert (outer.n, inner.n) == (2, 1)
    assert len(calls) == 2  # one forward each (one new token: the prefill only)


def test_a_partition_token_set_classifies_on_the_jobs_backend(tiny_vlm, monkeypatch):
    from mech_vtokens.interventions import Prune
    from mech_vtokens.partition import Partition

    vlm = tiny_vlm("llava")
    ims, prs = _inputs(2)
    from mech_vtokens.partition import model_identity

    part = Partition("reference", model_identity(vlm), reference={"k": 1, "ids": {"dead": [1]}}, vlm=vlm)
    seen = []
    check = vlm.check_remote
    monkeypatch.setattr(vlm, "check_remote", lambda remote: (seen.append(remote), check(remote))[1])
    from mech_vtokens.loop import counting

    with counting() as c:
        mv.run(vlm, ims, prs, probes=[EmbedLens()], interventions=[Prune(part.token_set("alive"))], remote="local")
    assert c.n == 2  # the classification of the batch is a forward of the job: counted
    assert seen and all(r == "local" for r in seen), seen


def test_old_names_are_gone():
    import mech_vtokens.partition as P
    import mech_vtokens.single_patch as SP

    assert not hasattr(P, "Figure1") and hasattr(P, "ClusterDominance")
    assert not hasattr(SP, "generate") and callable(SP.make_samples)
    import mech_vtokens.evaluate as E
    import mech_vtokens.organism.evaluate as OE

    assert not hasattr(E, "generate") and callable(E.answer_batch)  # one public generate: mech_vtokens.generate
    assert not hasattr(OE, "evaluate") and callable(OE.measure)  # one public evaluate: mech_vtokens.evaluate
