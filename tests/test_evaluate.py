"""Evaluation with interventions: scorers, the paper-shaped table, answers under an intervention equal a hand-hooked
HF generate, seeds recorded and results identical twice, resume from disk, the external-harness adapter."""

import json

import pandas as pd
import pytest
import torch

from mech_vtokens.interventions import AllVisual, MatchedRandom, TokenSet, ZeroSublayer
import mech_vtokens as mv
from mech_vtokens import data as D
from mech_vtokens import testing as T
from mech_vtokens.evaluate import (HarnessModel, choice_letter, contains, evaluate, exact_match, paper_conditions)


class FirstOfEachImage(TokenSet):
    """The first ``n`` visual tokens of every image (a stand-in for a sink / dead set)."""

    def __init__(self, n):
        self.n = n

    def visual(self, batch):
        img = batch.tokens["image"]
        sel = torch.zeros(len(img), dtype=torch.bool)
        for i in img.unique():
            sel[(img == i).nonzero().flatten()[: self.n]] = True
        return sel


def test_scorers():
    assert exact_match("The red.", ["red"]) == 1.0 and exact_match("red circle", ["red"]) == 0.0
    assert contains("it is a red circle", ["red"]) == 1.0 and contains("reddish", ["red"]) == 0.0
    assert choice_letter("(B) blue", ["B"]) == 1.0 and choice_letter("answer: b", ["B"], ["red", "blue"]) == 1.0
    assert choice_letter("A", ["blue"], ["red", "blue"]) == 0.0 and \
        choice_letter("B.", ["blue"], ["red", "blue"]) == 1.0
    assert choice_letter("none", ["A"], ["x", "y"]) == 0.0


@pytest.fixture()
def vqa(tmp_path):
    for i in range(3):
        T.image(80 + 10 * i, seed=i).save(tmp_path / f"{i}.png")
    lines = [{"image": "0.png", "question": "what color is the object ?", "answer": "red", "id": "q0"},
             {"image": "1.png", "question": "what shape ?", "answers": ["circle", "square"], "id": "q1"},
             {"image": "2.png", "question": "which color ?", "choices": ["red", "blue"], "answer": "A", "id": "q2"}]
    (tmp_path / "vqa.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    return tmp_path / "vqa.jsonl"


def test_paper_table_and_answers_under_intervention_equal_hand_hooks(vqa, tiny_vlm, tmp_path):
    vlm = tiny_vlm("llava")
    conds = paper_conditions(vlm, sinks=FirstOfEachImage(1), dead=FirstOfEachImage(3), seed=5)
    res = evaluate(vlm, vqa, conds, max_new_tokens=4, batch_size=2, seed=5, progress=False)
    t = res.table()
    assert list(t.condition) == ["baseline", "-sinks", "-dead", "-matched random", "-vMHA", "-vFFN"]
    assert (t.n == 3).all() and t.score.between(0, 1).all() and t.delta.iloc[0] == 0
    assert "seed=5" in t.interventions[3][0] and (t.seed == 5).all() and res.settings["seed"] == 5
    assert len(res.answers) == 18 and set(res.answers.record_id) == {"q0", "q1", "q2"}
    # baseline = plain HF generate; -vFFN = generate with hand-written hooks zeroing the MLP output of visual tokens
    from mech_vtokens.evaluate import _prepare_left, _prompt_text

    recs = list(D.open_source(vqa))
    batch = _prepare_left(vlm, [r.load()[0] for r in recs[:2]], [_prompt_text(vlm, r) for r in recs[:2]])
    n0 = batch.inputs["input_ids"].shape[1]

    def greedy():
        ids = vlm.hf.generate(**batch.inputs, max_new_tokens=4, do_sample=False,
                              pad_token_id=vlm.tokenizer.pad_token_id)
        return [s.strip() for s in vlm.tokenizer.batch_decode(ids[:, n0:], skip_special_tokens=True)]

    got = res.answers.set_index(["condition", "record_id"]).prediction
    assert greedy() == [got["baseline", "q0"], got["baseline", "q1"]]
    mask = batch.visual_mask

    def zero(mod, args, out):
        if out.shape[1] == n0:  # prefill only
            return out.masked_fill(mask.unsqueeze(-1), 0.0)

    hs = [layer.mlp.register_forward_hook(zero) for layer in vlm.hf.get_decoder().layers]
    try:
        hand = greedy()
    finally:
        for h in hs:
            h.remove()
    assert hand == [got["-vFFN", "q0"], got["-vFFN", "q1"]]
    assert greedy() == [got["baseline", "q0"], got["baseline", "q1"]]  # no residue


def test_identical_twice_and_resume(vqa, tiny_vlm, tmp_path, monkeypatch):
    vlm = tiny_vlm("qwen2_vl")
    conds = {"baseline": [], "-random": [lambda vlm, batch: ZeroSublayer(MatchedRandom(FirstOfEachImage(2), seed=1),
                                                                         [0, 1], "both")]}
    a = evaluate(vlm, vqa, conds, max_new_tokens=3, batch_size=2, out=tmp_path / "e", progress=False)
    b = evaluate(vlm, vqa, conds, max_new_tokens=3, batch_size=2, progress=False)
    pd.testing.assert_frame_equal(a.answers, b.answers)
    assert (tmp_path / "e" / "table.csv").exists()
    calls = []
    monkeypatch.setattr("mech_vtokens.evaluate.answer_batch", lambda *x, **k: calls.append(1))
    c = evaluate(vlm, vqa, conds, max_new_tokens=3, batch_size=2, out=tmp_path / "e", progress=False)
    assert not calls
    pd.testing.assert_frame_equal(a.answers, c.answers)


def test_harness_adapter_matches_evaluate(vqa, tiny_vlm):
    vlm = tiny_vlm("llava")
    ivs = [ZeroSublayer(AllVisual(), [0, 2], "attn")]
    recs = list(D.open_source(vqa))
    model = HarnessModel(vlm, ivs, max_new_tokens=4)
    from mech_vtokens.evaluate import _prompt_text

    texts = model([r.load()[0] for r in recs], [_prompt_text(vlm, r) for r in recs])
    res = evaluate(vlm, vqa, {"x": ivs}, max_new_tokens=4, batch_size=8, progress=False)
    assert texts == list(res.answers.prediction)
    assert model(recs[0].load()[0], recs[0].question) == texts[:1]  # bare question: wrapped in the prompt format


def test_entry_exit_rows_generate_like_mv_generate(vqa, tiny_vlm):
    """Table 3's L_in / exit rows: answers under VisualEntry / VisualExit on every generated token, the same as
    mech_vtokens.generate (the nnsight per-step path) for the same records."""
    from mech_vtokens.evaluate import _prompt_text

    vlm = tiny_vlm("llava")
    conds = paper_conditions(vlm, entry=[1, 2], exit=[1])
    assert [c for c in conds if c.startswith(("L_in", "exit"))] == ["L_in = 1", "L_in = 2", "exit = 1"]
    res = evaluate(vlm, vqa, {k: conds[k] for k in ("baseline", "L_in = 1", "exit = 1")}, max_new_tokens=4,
                   batch_size=1, progress=False)
    recs = list(D.open_source(vqa))
    for name in ("L_in = 1", "exit = 1"):
        got = list(res.answers[res.answers.condition == name].sort_values("record_id").prediction)
        want = [mv.generate(vlm, [r.load()[0]], [_prompt_text(vlm, r)], interventions=conds[name],
                            max_new_tokens=4, pad_token_id=vlm.tokenizer.pad_token_id).text[0].strip()
                for r in sorted(recs, key=lambda r: r.id)]
        assert got == want, name


def test_sharded_evaluation_into_one_store_equals_one_run(vqa, tiny_vlm, tmp_path):
    """evaluate writes through the same Store as run_dataset: two shards into one out (batch 1: the same forwards
    as one unsharded run) hold every answer once, equal to the unsharded answers; the table appears when the store
    is complete."""
    from mech_vtokens.store import Store

    vlm = tiny_vlm("llava")
    conds = {"baseline": [], "-vFFN": [ZeroSublayer(AllVisual(), [0, 1], "mlp")]}
    whole = evaluate(vlm, vqa, conds, max_new_tokens=3, batch_size=1, progress=False)
    out = tmp_path / "shards"
    first = evaluate(vlm, vqa, conds, max_new_tokens=3, batch_size=1, out=out, shard=(1, 2), progress=False)
    assert sorted(first.answers.record_id.unique()) == ["q1"] and not (out / "table.csv").exists()
    both = evaluate(vlm, vqa, conds, max_new_tokens=3, batch_size=1, out=out, shard=(0, 2), progress=False)
    store = Store(out)
    assert store.kind == "evaluate" and store.complete and sorted(store.records) == ["q0", "q1", "q2"]
    key = ["record_id", "condition"]
    got = both.answers.sort_values(key).reset_index(drop=True)
    want = whole.answers.sort_values(key).reset_index(drop=True)
    assert not got.duplicated(key).any() and len(got) == 6
    pd.testing.assert_frame_equal(got.drop(columns="answers"), want.drop(columns="answers"))
    assert (out / "table.csv").exists()


def test_evaluate_sigkilled_then_resumed_loses_and_duplicates_no_answer(tmp_path, tiny_dir):
    """evaluate runs on the same record loop and store as run_dataset: a worker process is SIGKILLed 4 times at
    seeded random points (at the n-th atomic write: before it, half-written, just after the rename; or from outside
    during a later batch), then finishes. The answers equal an uninterrupted run's row for row: every record once,
    both conditions each, the corrupt record skipped once; the table appears only when complete."""
    import os
    import random
    import subprocess
    import sys
    from pathlib import Path

    from mech_vtokens.store import Store

    here = Path(__file__).parent
    lines = []
    for i in range(9):
        T.image(60 + 4 * i, seed=i).save(tmp_path / f"{i}.png")
        lines.append({"image": f"{i}.png", "question": f"what is {i} ?", "answer": "red", "id": f"q{i}"})
    (tmp_path / "bad.png").write_bytes(b"corrupt")
    lines.insert(4, {"image": "bad.png", "question": "what ?", "answer": "red", "id": "qbad"})
    vqa = tmp_path / "vqa.jsonl"
    vqa.write_text("\n".join(json.dumps(x) for x in lines))
    rng = random.Random(3)
    # each batch = 1 parquet write + 1 manifest write; a run starts with one manifest write
    kills = [{"kind": "write", "n": rng.randint(2, 4), "phase": rng.choice(["before", "mid", "after"])},
             {"kind": "progress", "parts": 1, "delay": round(rng.uniform(0, 0.05), 3)},
             {"kind": "write", "n": rng.randint(2, 3), "phase": "mid"},
             {"kind": "write", "n": 3, "phase": "after"}]
    resumed, clean = tmp_path / "resumed", tmp_path / "clean"
    plan = [{"out": str(resumed), "kill": k, "job": "evaluate"} for k in kills]
    plan += [{"out": str(resumed), "job": "evaluate"}, {"out": str(clean), "job": "evaluate"}]
    env = dict(os.environ, PYTHONPATH=str(here.parent))
    proc = subprocess.run([sys.executable, str(here / "runner_worker.py"), tiny_dir("llava"), str(vqa),
                           json.dumps(plan)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    statuses = json.loads(proc.stdout.strip().splitlines()[-1])
    assert statuses == [-9] * 4 + [0, 0], (statuses, kills, proc.stderr[-2000:])
    a, b = Store(resumed), Store(clean)
    assert a.kind == b.kind == "evaluate" and a.complete and b.complete
    assert a.records == b.records and sorted(a.records) == sorted(f"q{i}" for i in range(9))
    assert len(set(a.records)) == len(a.records) and list(a.skipped) == ["qbad"] == list(b.skipped)
    fa, fb = a.frame("answers"), b.frame("answers")
    assert not fa.duplicated(["record_id", "condition"]).any() and len(fa) == 18
    pd.testing.assert_frame_equal(fa, fb)  # bit for bit: one thread, the same batches
    assert (resumed / "table.csv").read_text() == (clean / "table.csv").read_text()
    assert not list(resumed.rglob(".*.tmp*"))


def test_metrics_in_evaluate_equal_plain_torch_logits(vqa, tiny_vlm):
    """evaluate(metrics=...): each answer metric, under each condition, equals the plain HF logits of the same
    left-padded batch (at each row's last position), with hand-written hooks zeroing the visual MLP output for the
    -vFFN condition; a per-record factory reads each record's own answer."""
    from mech_vtokens.evaluate import _prepare_left, _prompt_text
    from mech_vtokens.probes import AnswerLogProb, LogitDiff

    vlm = tiny_vlm("llava")
    tok = vlm.tokenizer
    a, b = 5, 6
    ans = lambda vlm, recs: AnswerLogProb([r.answers[0] for r in recs])  # noqa: E731 - the factory a user writes
    conds = {"baseline": [], "-vFFN": [ZeroSublayer("all", list(range(vlm.n_layers)), "mlp")]}
    res = evaluate(vlm, vqa, conds, max_new_tokens=2, batch_size=3, progress=False,
                   metrics=[LogitDiff(a, b), ans])
    df = res.answers.set_index(["condition", "record_id"])
    assert {"logit_diff", "answer_log_prob"} <= set(res.answers.columns)
    recs = list(D.open_source(vqa))
    batch = _prepare_left(vlm, [r.load()[0] for r in recs], [_prompt_text(vlm, r) for r in recs])
    n0, mask = batch.inputs["input_ids"].shape[1], batch.visual_mask

    def zero(mod, args, out):
        return out.masked_fill(mask.unsqueeze(-1), 0.0)

    for cond in conds:
        hs = [layer.mlp.register_forward_hook(zero) for layer in vlm.hf.get_decoder().layers] if cond != "baseline" \
            else []
        try:
            with torch.no_grad():
                logits = vlm.hf(**batch.inputs).logits[:, n0 - 1].float()  # left padding: the last column
        finally:
            for h in hs:
                h.remove()
        logp = logits.log_softmax(-1)
        for i, r in enumerate(recs):
            want_ld = float(logits[i, a] - logits[i, b])
            first = tok.encode(r.answers[0], add_special_tokens=False)[0]
            assert abs(df.loc[(cond, r.id), "logit_diff"] - want_ld) < 1e-5, (cond, r.id)
            assert abs(df.loc[(cond, r.id), "answer_log_prob"] - float(logp[i, first])) < 1e-5, (cond, r.id)
    assert (df.loc["baseline", "logit_diff"] != df.loc["-vFFN", "logit_diff"]).all()  # the condition acted


def test_metrics_in_evaluate_refuse_what_is_no_metric(vqa, tiny_vlm, no_forward):
    from mech_vtokens import InputError

    with pytest.raises(InputError, match="neither a metric probe"):
        evaluate(tiny_vlm("llava"), vqa, {"baseline": []}, metrics=[42], progress=False)
