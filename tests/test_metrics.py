"""Answer metrics (probes/metrics.py) equal a plain-torch computation on the HF model's logits, on the tiny fixture
of every family, through ``remote="local"``; bad answers are refused before the forward."""

from __future__ import annotations

import pytest
import torch

import families as FM
import mech_vtokens as mv
from mech_vtokens import InputError
from mech_vtokens import testing as T
from mech_vtokens.probes import AnswerLogProb, ChoiceProb, KLToClean, LogitDiff

TOL = 1e-5


def _batch(vlm, name, tail=("", " red")):
    """Three rows of different lengths (left padding): two images, one prompt repeated with an appended answer."""
    p = FM.prompt(vlm, name)
    return vlm.prepare([T.image(seed=1), T.image(seed=2), T.image(seed=3)],
                       [p + tail[0], FM.prompt(vlm, name, "describe the image"), p + tail[1]])


def _reference(vlm, batch):
    """(full logits, each row's last attended position): a plain HF forward, no package code."""
    with torch.no_grad():
        logits = vlm.hf(**batch.inputs).logits.float()
    am = batch.inputs["attention_mask"]
    last = torch.tensor([int(am[r].nonzero().max()) for r in range(len(am))])
    return logits, last


@pytest.mark.parametrize("family", FM.FAMILIES)
def test_metrics_equal_plain_torch(tiny_vlm, family):
    vlm = tiny_vlm(family)
    tok = vlm.processor.tokenizer
    red, blue, green = (tok.convert_tokens_to_ids(w) for w in ("red", "blue", "green"))
    batch = _batch(vlm, family)
    logits, last = _reference(vlm, batch)
    rows = torch.arange(len(last))
    ll = logits[rows, last]
    lp = torch.log_softmax(ll, -1)
    probes = [AnswerLogProb("red"), LogitDiff("red", [blue, green, blue]), ChoiceProb(["red", "blue", "green"]),
              KLToClean([1, 1, 0])]
    with mv.loop.remote_of("local"):
        res = mv.loop.forward(vlm, batch, probes=probes, remote="local")
    assert torch.allclose(res["answer_log_prob"].values, lp[:, red], atol=TOL)
    want_ld = ll[:, red] - ll[rows, torch.tensor([blue, green, blue])]
    assert torch.allclose(res["logit_diff"].values, want_ld, atol=TOL)
    opts = torch.tensor([red, blue, green])
    assert torch.allclose(res["choice_prob"].values, torch.softmax(ll[:, opts], -1), atol=TOL)
    assert torch.allclose(res["choice_prob"].vocab_prob, lp[:, opts].exp(), atol=TOL)
    clean = lp[torch.tensor([1, 1, 0])]
    want_kl = (clean.exp() * (clean - lp)).sum(-1)
    assert torch.allclose(res["kl_to_clean"].values, want_kl, atol=TOL)
    assert float(res["kl_to_clean"].values[1]) == 0.0  # its own clean row
    df = res["choice_prob"].to_pandas()
    assert len(df) == 9 and set(df.columns) >= {"row", "option", "value", "answer", "answer_id", "vocab_prob"}
    assert df["answer"].tolist()[:3] == ["red", "blue", "green"]


@pytest.mark.parametrize("family", FM.FAMILIES[:2])
def test_forced_answer_sums_teacher_forced_tokens(tiny_vlm, family):
    """A two-token answer appended to the prompt: the sum of log p(a_j | prompt, a_<j) at the right positions."""
    vlm = tiny_vlm(family)
    tok = vlm.processor.tokenizer
    ans = [tok.convert_tokens_to_ids(w) for w in ("top", "left")]
    batch = _batch(vlm, family, tail=(" top left", " top left"))
    logits, last = _reference(vlm, batch)
    lp = torch.log_softmax(logits, -1)
    end1 = int(batch.inputs["input_ids"][1, last[1]])  # row 1: its own last token, a one-token forced answer
    want = torch.tensor([float(lp[r, last[r] - 2, ans[0]] + lp[r, last[r] - 1, ans[1]]) for r in (0, 2)])
    res = mv.loop.forward(vlm, batch, probes=[AnswerLogProb([ans, [end1], ans], forced=True)])
    got = res["answer_log_prob"].values
    assert torch.allclose(got[[0, 2]], want, atol=TOL)
    assert abs(float(got[1]) - float(lp[1, last[1] - 1, end1])) < TOL
    # row 1 does not end with "top left": refused before the forward
    with pytest.raises(InputError, match="does not end with"):
        mv.loop.forward(vlm, batch, probes=[AnswerLogProb([ans, ans, ans], forced=True)])


def test_metric_inputs_refused_before_forward(no_forward):
    vlm = no_forward
    ims = [T.image(seed=1)]
    p = T.prompt("llava")
    with pytest.raises(InputError, match="2 tokens"):
        mv.run(vlm, ims, [p], probes=[AnswerLogProb("top left")])
    with pytest.raises(InputError, match="outside the vocabulary"):
        mv.run(vlm, ims, [p], probes=[LogitDiff(10 ** 6, 1)])
    with pytest.raises(InputError, match="one per row"):
        mv.run(vlm, ims, [p], probes=[LogitDiff(["red", "blue"], "blue")])
    with pytest.raises(InputError, match="clean row"):
        mv.run(vlm, ims, [p], probes=[KLToClean(3)])
    with pytest.raises(InputError, match="at least two"):
        ChoiceProb(["red"])


def test_metric_in_the_runner_per_record(tiny_vlm, tmp_path):
    """run_dataset stores a metric per record (its ``row`` column made record-relative), equal to mv.run."""
    from mech_vtokens.data import InMemory
    from mech_vtokens.runner import run_dataset

    vlm = tiny_vlm("llava")
    ims = [T.image(seed=s) for s in (1, 2, 3)]
    q = "what color is the object ?"
    store = run_dataset(vlm, InMemory(ims, questions=[q] * 3), probes=[LogitDiff("red", "blue")], out=tmp_path / "r",
                        batch_size=2, progress=False)
    got = store.frame("logit_diff").sort_values("record_id")["value"].to_numpy()
    want = mv.run(vlm, ims, [vlm.prompt(q)] * 3, probes=[LogitDiff("red", "blue")])["logit_diff"].values
    assert torch.allclose(torch.tensor(got), want, atol=TOL)
