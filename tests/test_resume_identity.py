"""Issue 15 classes 4 and 5: a resumable run trusts the model's WEIGHTS (not the path string), retries records it
skipped, says how to resume after Ctrl-C, and one bad batch does not end a long run."""

import json
import logging
import shutil

import pandas as pd
import pytest
import torch

import mech_vtokens as mv
from mech_vtokens import data as D
from mech_vtokens import testing as T
from mech_vtokens.errors import InputError
from mech_vtokens.evaluate import evaluate
from mech_vtokens.loop import Interrupted, over_records
from mech_vtokens.partition import model_identity
from mech_vtokens.runner import Store, run_dataset


def _src(n=3):
    return D.InMemory([T.image(60 + 4 * i, seed=i) for i in range(n)])


def _run(vlm, out, **kw):
    return run_dataset(vlm, _src(), probes=["norms"], out=out, batch_size=2, progress=False, **kw)


# ---- class 4: identity = the weights ---------------------------------------------------------------------------

def test_same_weights_from_another_spelling_of_the_path_resume(tmp_path, monkeypatch):
    path = T.tiny_model("llava", tmp_path / "llava")
    (tmp_path / "alias").symlink_to(tmp_path / "llava")
    first = _run(mv.load(path), tmp_path / "run")
    monkeypatch.chdir(tmp_path)
    for spelling in ("./llava/", "llava", "alias", str(tmp_path / "llava") + "/"):
        vlm = mv.load(spelling)
        calls = []
        monkeypatch.setattr(type(vlm), "prepare", lambda *a, **k: calls.append(1))
        again = _run(vlm, tmp_path / "run")  # the same weights: resumes (nothing to redo), not refused
        monkeypatch.undo()
        monkeypatch.chdir(tmp_path)
        assert not calls and again.records == first.records, spelling
        pd.testing.assert_frame_equal(first.frame("norms"), again.frame("norms"))


def test_other_weights_are_refused_naming_overwrite(tmp_path):
    path = T.tiny_model("llava", tmp_path / "llava")
    first = _run(mv.load(path), tmp_path / "run")
    other = T.tiny_model("llava", tmp_path / "other", seed=1)

    def later_layer(vlm):  # a fine-tune that leaves the embeddings alone: only one decoder layer differs
        with torch.no_grad():
            dict(vlm.hf.named_parameters())[[n for n, _ in vlm.hf.named_parameters() if "layers.1." in n][0]].add_(0.05)
        return vlm

    def same_path_other_weights():
        shutil.rmtree(tmp_path / "llava")
        shutil.copytree(other, tmp_path / "llava")
        return mv.load(tmp_path / "llava")

    dtype = mv.load(path).hf.dtype
    for make in (lambda: later_layer(mv.load(path)),
                 lambda: mv.load(path, dtype=torch.bfloat16 if dtype == torch.float32 else torch.float32),
                 same_path_other_weights):
        vlm = make()
        with pytest.raises(InputError, match=r"another model.*overwrite=True"):
            _run(vlm, tmp_path / "run")
        assert Store(tmp_path / "run").records == first.records  # nothing mixed in
    fresh = _run(vlm, tmp_path / "run", overwrite=True)
    assert fresh.records == first.records and fresh.manifest["identity"] == model_identity(vlm)
    assert fresh.manifest["identity"]["weights"] != first.manifest["identity"]["weights"]


def test_skipped_records_are_retried_on_resume(tmp_path, tiny_vlm):
    vlm = tiny_vlm("llava")
    folder = tmp_path / "imgs"
    folder.mkdir()
    good = {f"{i}.png": T.image(60 + 4 * i, seed=i) for i in range(5)}
    for name, im in good.items():
        im.save(folder / name)
    (folder / "1.png").write_bytes(b"corrupt")      # unreadable
    (folder / "3.png").write_bytes(b"")             # empty
    first = run_dataset(vlm, folder, probes=["norms"], out=tmp_path / "run", batch_size=2, progress=False)
    assert sorted(first.skipped) == ["1.png", "3.png"] and first.records == ["0.png", "2.png", "4.png"]
    good["1.png"].save(folder / "1.png")            # the images are there now
    good["3.png"].save(folder / "3.png")
    again = run_dataset(vlm, folder, probes=["norms"], out=tmp_path / "run", batch_size=2, progress=False)
    assert again.skipped == {} and sorted(again.records) == sorted(good) and again.complete
    assert sorted(again.retried) == ["1.png", "3.png"] and again.retried["1.png"].startswith("skipped: not a readable")
    clean = run_dataset(vlm, folder, probes=["norms"], out=tmp_path / "clean", batch_size=2, progress=False)
    for rid in good:  # a retried record's rows are those of a run that found it the first time
        ra, rb = again.record(rid)["norms"], clean.record(rid)["norms"]
        assert len(ra) and len(ra) == len(rb)
        pd.testing.assert_frame_equal(ra.reset_index(drop=True), rb.reset_index(drop=True), check_exact=False,
                                      rtol=1e-4, atol=1e-4)


def _coco(root, layout):
    ann = {"images": [{"id": i, "file_name": f"{i:012d}.jpg"} for i in range(3)],
           "annotations": [{"image_id": 0, "category_id": 1, "bbox": [1, 1, 10, 10]}],
           "categories": [{"id": 1, "name": "cat"}]}
    (root / "annotations").mkdir(parents=True)
    path = root / "annotations" / "instances_val2017.json"
    path.write_text(json.dumps(ann))
    imgs = root / layout
    imgs.mkdir(parents=True, exist_ok=True)
    for i in range(3):
        T.image(64, seed=i).save(imgs / f"{i:012d}.jpg")
    return path


def test_coco_standard_layout_and_images_dir(tmp_path, tiny_vlm):
    vlm = tiny_vlm("llava")
    std = _coco(tmp_path / "std", "val2017")  # annotations/ + val2017/: found without images_dir
    s = run_dataset(vlm, std, probes=["norms"], out=tmp_path / "a", progress=False)
    assert s.records == ["0", "1", "2"] and not s.skipped
    elsewhere = _coco(tmp_path / "else", "pics/coco")
    for fn in (lambda: run_dataset(vlm, elsewhere, probes=["norms"], out=tmp_path / "b", progress=False),
               lambda: evaluate(vlm, D.Source([D.Record(r.id, r.image, "q?", answers=["a"])
                                               for r in D.open_source(elsewhere)]), {"baseline": []},
                                progress=False)):
        with pytest.raises(InputError, match="images_dir="):
            fn()
    s = run_dataset(vlm, elsewhere, probes=["norms"], out=tmp_path / "b", progress=False,
                    images_dir=tmp_path / "else" / "pics" / "coco")
    assert s.records == ["0", "1", "2"]


def test_ctrl_c_says_how_far_and_keeps_what_was_committed(tmp_path):
    recs = [D.Record(i, None) for i in range(7)]
    seen = []

    def step(batch):
        seen.append([r.id for r in batch])
        if len(seen) == 3:
            raise KeyboardInterrupt
        return {"records": [r.id for r in batch],
                "frames": {"t": pd.DataFrame({"record_id": [r.id for r in batch], "v": [int(r.id) for r in batch]})}}

    kw = dict(kind="run_dataset", settings={"a": 1}, tables=["t"], batch_size=2)
    for out in (tmp_path / "run", None):
        seen.clear()
        with pytest.raises(Interrupted, match=r"^interrupted; 4/7 records done .*run the same call again to resume"
                           ) as err:
            over_records(recs, step, out=out, **kw)
        assert isinstance(err.value, KeyboardInterrupt) and err.value.__suppress_context__
    assert Store(tmp_path / "run").records == ["0", "1", "2", "3"]
    seen.clear()
    s = over_records(recs, step, out=tmp_path / "run", **kw)  # resumes: only the rest runs
    assert seen == [["4", "5"], ["6"]] and s.records == [str(i) for i in range(7)]
    assert s.frame("t").v.tolist() == list(range(7))


# ---- class 5: one bad batch does not end the run -----------------------------------------------------------------

def test_a_failing_batch_is_skipped_with_its_reason(tmp_path, caplog):
    recs = [D.Record(i, None) for i in range(7)]
    bad = {"2", "5"}  # batches [2, 3] and [4, 5] fail, as a token set empty on that batch would

    def step(batch):
        ids = [r.id for r in batch]
        if bad & set(ids):
            raise InputError(f"token set 'dead' is empty on this batch ({ids})")
        return {"records": ids, "frames": {"t": pd.DataFrame({"record_id": ids, "v": [int(i) for i in ids]})}}

    kw = dict(kind="run_dataset", settings={"a": 1}, tables=["t"], batch_size=2)
    for out in (tmp_path / "run", None):
        with caplog.at_level(logging.WARNING, logger="mech_vtokens"):
            s = over_records(recs, step, out=out, **kw)
        assert s.records == ["0", "1", "6"] and s.frame("t").v.tolist() == [0, 1, 6]
        assert sorted(s.skipped) == ["2", "3", "4", "5"]
        assert all("its batch failed (token set 'dead' is empty" in why and "on_error='raise'" in why
                   for why in s.skipped.values())
        assert [e["records"] for e in s.batch_errors] == [["2", "3"], ["4", "5"]]
        assert "2 batch(es) (4 records) were skipped" in caplog.text
        caplog.clear()
    for out in (tmp_path / "raise", None):
        with pytest.raises(InputError, match="is empty on this batch"):
            over_records(recs, step, out=out, on_error="raise", **kw)
    assert Store(tmp_path / "raise").records == ["0", "1"]  # what ran before stays committed
    with pytest.raises(InputError, match="on_error='sikp'.*'skip'.*'raise'"):
        over_records(recs, step, on_error="sikp", **kw)


def test_evaluate_skips_a_batch_whose_condition_fails_and_says_so(tiny_vlm):
    from mech_vtokens.interventions import AllVisual, ZeroSublayer

    vlm = tiny_vlm("llava")
    src = D.Source([D.Record(i, T.image(60, seed=i), "what is it?", answers=["x"]) for i in range(4)])
    calls = []

    def flaky(vlm_, batch):  # a factory whose token set is empty on the second batch
        calls.append(1)
        if len(calls) == 2:
            raise InputError("token set 'dead' is empty on this batch")
        return ZeroSublayer(AllVisual(), [0], "mlp")

    res = evaluate(vlm, src, {"baseline": [], "knock": [flaky]}, batch_size=2, max_new_tokens=2, progress=False)
    assert sorted(res.skipped) == ["2", "3"] and set(res.answers.record_id) == {"0", "1"}
    t = res.table()
    assert sorted(t.attrs["skipped"]) == ["2", "3"] and t.attrs["batch_errors"][0]["records"] == ["2", "3"]
    assert (t.n == 2).all()
    calls.clear()
    with pytest.raises(InputError, match="empty on this batch"):
        evaluate(vlm, src, {"baseline": [], "knock": [flaky]}, batch_size=2, max_new_tokens=2, progress=False,
                 on_error="raise")


def test_an_experiment_reused_on_another_batch_is_refused_at_the_forward_start(tiny_vlm):
    import nnsight

    from mech_vtokens.probes import EmbedLens

    vlm = tiny_vlm("llava")
    q = vlm.prompt("describe the image .")
    a = vlm.prepare([T.image(60, seed=1)], [q])
    others = {"more prompts": vlm.prepare([T.image(60, seed=1), T.image(60, seed=2)], [q, q]),
              "longer prompt": vlm.prepare([T.image(60, seed=1)], [vlm.prompt("describe the image in detail .")]),
              "same shape, other tokens": vlm.prepare([T.image(60, seed=1)], [vlm.prompt("describe the photo .")])}
    assert others["same shape, other tokens"].inputs["input_ids"].shape == a.inputs["input_ids"].shape
    exp = vlm.experiment(a, probes=[EmbedLens(k=3)])
    for what, b in others.items():
        with pytest.raises(InputError, match="built for another batch.*vlm.experiment\\(batch") as err:
            with vlm.trace(**b.inputs):
                nnsight.save(exp.execute(vlm.model))
        assert "num_beams" not in str(err.value), what
    with vlm.trace(**a.inputs):  # its own batch still runs
        raw = nnsight.save(exp.execute(vlm.model))
    assert exp.results(raw)["embed_lens"].ids
