"""Image sources and the resumable runner: bad images never crash a run, records are keyed by stable ids and made
record-relative, a run SIGKILLed at 5 seeded random points and resumed equals an uninterrupted run record for record."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import mech_vtokens as mv
from mech_vtokens import data as D
from mech_vtokens import testing as T
from mech_vtokens.runner import Store, run_dataset
from mech_vtokens.probes import EmbedLens, NormTracker

HERE = Path(__file__).parent


def _zoo(folder: Path) -> dict:
    """Good and bad image files; returns {name: expected outcome ('ok', a note fragment, or 'skipped: ...')}."""
    folder.mkdir(parents=True, exist_ok=True)
    T.image(100, seed=1).save(folder / "a_good.png")
    T.image(90, seed=2).save(folder / "b_good.jpg")
    T.image(80, seed=3).convert("L").save(folder / "c_grey.png")
    rgba = T.image(80, seed=4).convert("RGBA")
    rgba.putalpha(Image.new("L", rgba.size, 0))  # fully transparent: composited on white
    rgba.save(folder / "d_rgba.png")
    T.image(64, seed=5).convert("P").save(folder / "e_palette.gif")
    Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 7).astype(np.uint16)).save(folder / "f_16bit.png")
    T.image(8, seed=6).save(folder / "g_tiny.png")
    Image.new("RGB", (5000, 300), (10, 200, 30)).save(folder / "h_huge.png")
    (folder / "i_corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    good = (folder / "b_good.jpg").read_bytes()
    (folder / "j_truncated.jpg").write_bytes(good[: len(good) // 3])
    (folder / "k_empty.png").write_bytes(b"")
    Image.new("RGB", (3000, 10)).save(folder / "l_sliver.png")
    (folder / "notes.txt").write_text("not an image, ignored by suffix")
    return {"a_good.png": None, "b_good.jpg": None, "c_grey.png": "converted L to RGB",
            "d_rgba.png": "converted RGBA to RGB (alpha on white)", "e_palette.gif": "converted P to RGB",
            "f_16bit.png": "to RGB", "g_tiny.png": "upscaled 8x8 to 28x28", "h_huge.png": "downscaled 5000x300",
            "i_corrupt.jpg": "skipped: not a readable image", "j_truncated.jpg": "skipped: not a readable image",
            "k_empty.png": "skipped: not a readable image", "l_sliver.png": "skipped: aspect ratio 300:1"}


def test_bad_images_are_converted_or_skipped_with_a_reason(tmp_path):
    expected = _zoo(tmp_path)
    src = D.ImageFolder(tmp_path)
    assert [r.id for r in src] == sorted(expected)  # ids: relative paths, sorted; .txt ignored
    assert [r.id for r in D.ImageFolder(tmp_path)] == [r.id for r in src]  # stable
    for r in src:
        im, note = r.load()
        want = expected[r.id]
        if want is None:
            assert note is None and im.mode == "RGB"
        elif want.startswith("skipped"):
            assert im is None and want in note, (r.id, note)
        else:
            assert im.mode == "RGB" and want in note, (r.id, note)
            assert min(im.size) >= D.MIN_SIDE and max(im.size) <= D.MAX_SIDE
    im, _ = D.load_image(tmp_path / "d_rgba.png")
    assert np.asarray(im).min() == 255  # transparent -> white, not black
    im, _ = D.load_image(tmp_path / "f_16bit.png")
    a16 = (np.arange(64 * 64).reshape(64, 64) * 7).astype(np.uint16)  # 16-bit scaled by 255/65535 (data.to_rgb,
    assert np.array_equal(np.asarray(im)[..., 0], np.rint(a16 * (255 / 65535)).astype(np.uint8))  # every path)
    assert D.load_image(tmp_path / "missing.png")[1].startswith("skipped: file not found")


def test_coco_and_vqa_sources(tmp_path):
    T.image(60, seed=1).save(tmp_path / "1.png")
    T.image(60, seed=2).save(tmp_path / "2.png")
    coco = {"images": [{"id": 7, "file_name": "1.png", "width": 60, "height": 60},
                       {"id": 9, "file_name": "2.png", "width": 60, "height": 60},
                       {"id": 11, "file_name": "3.png"}],
            "annotations": [{"image_id": 7, "category_id": 1, "bbox": [1, 2, 10, 20]},
                            {"image_id": 7, "category_id": 2, "bbox": [5, 5, 5, 5]},
                            {"image_id": 7, "category_id": 1, "bbox": [30, 30, 5, 5]}],
            "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]}
    (tmp_path / "inst.json").write_text(json.dumps(coco))
    src = D.open_source(tmp_path / "inst.json")
    assert [r.id for r in src] == ["7", "9", "11"]
    assert src[0].labels == ["cat", "dog"] and src[0].boxes[0] == ("cat", 1.0, 2.0, 10.0, 20.0)
    assert src[1].labels == [] and src[2].load()[1].startswith("skipped: file not found")
    assert [r.id for r in D.CocoInstances(tmp_path / "inst.json", only_annotated=True)] == ["7"]
    lines = ['{"image": "1.png", "question": "what color ?", "answer": "red", "id": "q1"}',
             '{"image": "2.png", "question": "shape ?", "answers": ["circle", "round"]}',
             "{not json",
             '{"image": "2.png"}',
             '{"image": "1.png", "question": "which ?", "choices": ["red", "blue"], "answer": "B"}']
    (tmp_path / "vqa.jsonl").write_text("\n".join(lines) + "\n")
    vqa = D.open_source(tmp_path / "vqa.jsonl")
    assert [r.id for r in vqa] == ["q1", "line2", "line5"]
    assert vqa[1].answers == ["circle", "round"] and vqa[2].choices == ["red", "blue"]
    assert sorted(vqa.bad_lines) == [3, 4]


def test_run_dataset_records_match_single_image_runs(tmp_path, tiny_vlm):
    """Batched records (different question lengths: left padding) equal each image run alone, made record-relative;
    bad files are skipped with their reason, conversions noted, progress shown."""
    vlm = tiny_vlm("llava")
    folder = tmp_path / "imgs"
    folder.mkdir()
    T.image(100, seed=1).save(folder / "a.png")
    T.image(70, seed=2).convert("LA").save(folder / "b.png")
    (folder / "c.jpg").write_bytes(b"broken")
    T.image(90, seed=3).save(folder / "d.png")
    qs = {"a.png": "what color is the object ?", "b.png": "describe", "d.png": "how many circle are there ?"}
    src = D.Source([D.Record(r.id, r.image, qs.get(r.id)) for r in D.ImageFolder(folder)])
    store = run_dataset(vlm, src, probes=[EmbedLens(k=3), NormTracker(vision=False)], out=tmp_path / "out",
                        batch_size=3)
    assert store.records == ["a.png", "b.png", "d.png"] and store.complete
    assert store.skipped["c.jpg"].startswith("skipped: not a readable image")
    assert "converted LA to RGB" in store.notes["b.png"]
    lens = store.frame("embed_lens")
    norms = store.frame("norm_tracker")
    from mech_vtokens.defaults import prompt

    for rid in store.records:
        im, _ = D.load_image(folder / rid)
        alone = mv.run(vlm, [im], [prompt(vlm, qs[rid])], probes=[EmbedLens(k=3), NormTracker(vision=False)])
        alone_lens, alone_norms = alone["embed_lens"], alone["norm_tracker"]
        for got, want in ((lens[lens.record_id == rid], alone_lens.to_pandas()),
                          (norms[norms.record_id == rid], alone_norms.to_pandas())):
            got = got.drop(columns="record_id").reset_index(drop=True)
            assert list(got.columns) == list(want.columns)
            num = [c for c in want.columns if want[c].dtype.kind == "f"]
            exact = [c for c in want.columns if c not in num and c not in ("token_id", "token")]
            pd.testing.assert_frame_equal(got[exact], want[exact], check_dtype=False)
            np.testing.assert_allclose(got[num].to_numpy(), want[num].to_numpy(), rtol=1e-4, atol=1e-4)
            if "rank" in want:  # top-1 ids agree (near-ties at lower ranks may swap under padding)
                top = want["rank"] == 0
                assert (got.token_id[top].to_numpy() == want.token_id[top].to_numpy()).mean() > 0.97
    assert store.record("b.png")["embed_lens"].record_id.eq("b.png").all()


def test_runner_remote_local_and_device_map_pass_through(tmp_path, tiny_vlm, tiny_dir):
    vlm = tiny_vlm("qwen2_vl")
    src = D.InMemory([T.image(60, seed=i) for i in range(3)])
    local = run_dataset(vlm, src, probes=["norms"], out=tmp_path / "a", batch_size=2, progress=False)
    remote = run_dataset(vlm, src, probes=["norms"], out=tmp_path / "b", batch_size=2, remote="local",
                         progress=False)
    pd.testing.assert_frame_equal(local.frame("norms"), remote.frame("norms"))
    auto = run_dataset(tiny_dir("qwen2_vl"), src, probes=["norms"], out=tmp_path / "c", batch_size=2,
                       device_map="auto", progress=False)
    pd.testing.assert_frame_equal(local.frame("norms"), auto.frame("norms"))


def test_rerun_of_a_finished_run_does_nothing(tmp_path, tiny_vlm, monkeypatch):
    vlm = tiny_vlm("llava")
    src = D.InMemory([T.image(60, seed=i) for i in range(3)])
    first = run_dataset(vlm, src, probes=["norms"], out=tmp_path, batch_size=2, progress=False)
    calls = []
    monkeypatch.setattr(type(vlm), "prepare", lambda *a, **k: calls.append(1))
    again = run_dataset(vlm, src, probes=["norms"], out=tmp_path, batch_size=2, progress=False)
    assert not calls and again.records == first.records
    pd.testing.assert_frame_equal(first.frame("norms"), again.frame("norms"))


def test_sigkill_at_5_random_points_then_resume_equals_uninterrupted(tmp_path, tiny_dir):
    """A worker process runs the same dataset; 5 attempts are SIGKILLed at seeded random points (at the n-th atomic
    write: before it, half-written temp file, just after the rename — the only moments the store changes — or by
    os.kill from outside at a random moment of a later batch); a final attempt finishes.
    The result equals an uninterrupted run
    record for record, with no record lost or duplicated."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(21):
        T.image(60 + 3 * i, seed=i).save(folder / f"{i:02d}.png")
    (folder / "07b.png").write_bytes(b"corrupt")  # a skipped record must be remembered across kills too
    rng = random.Random(8)
    # each batch = 2 parquet writes + 1 manifest write; the run starts with one manifest write
    kills = []
    n = 1
    for j in range(5):
        if j in (1, 3):
            kills.append({"kind": "progress", "parts": rng.randint(1, 2), "delay": round(rng.uniform(0, 0.05), 3)})
        else:
            n = rng.randint(1, 4)
            kills.append({"kind": "write", "n": n, "phase": rng.choice(["before", "mid", "after"])})
    resumed, clean = tmp_path / "resumed", tmp_path / "clean"
    plan = [{"out": str(resumed), "kill": k} for k in kills] + [{"out": str(resumed), "kill": None},
                                                                {"out": str(clean), "kill": None}]
    env = dict(os.environ, PYTHONPATH=str(HERE.parent))
    proc = subprocess.run([sys.executable, str(HERE / "runner_worker.py"), tiny_dir("llava"), str(folder),
                           json.dumps(plan)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    statuses = json.loads(proc.stdout.strip().splitlines()[-1])
    assert statuses[:5] == [-9] * 5, (statuses, kills, proc.stderr[-2000:])  # every attempt really was SIGKILLed
    assert statuses[5:] == [0, 0]
    a, b = Store(resumed), Store(clean)
    assert a.complete and b.complete
    assert a.records == b.records and len(set(a.records)) == len(a.records) == 21
    assert a.skipped == b.skipped and list(a.skipped) == ["07b.png"]
    for probe in ("norms", "embed_lens"):
        fa, fb = a.frame(probe), b.frame(probe)
        assert fa.groupby("record_id").size().to_dict() == fb.groupby("record_id").size().to_dict()
        pd.testing.assert_frame_equal(fa, fb)  # bit for bit (one thread, same batches)
    assert not list(resumed.rglob(".*.tmp*"))  # temp files of killed attempts are cleaned up on resume
    parts = {str(p.relative_to(resumed)) for p in resumed.rglob("*.parquet")}
    assert {f for p in a.parts for f in p["files"].values()} <= parts


def test_three_writer_processes_on_one_store_lose_and_duplicate_nothing(tmp_path, tiny_dir):
    """Three forked processes run shard=(i, 3) of the same dataset into ONE out at the same time (commits interleave
    under the store's lock). Read back: every record once, and each record's rows equal those of that shard run
    alone into its own store (same batches: bit for bit)."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(11):
        T.image(60 + 3 * i, seed=i).save(folder / f"{i:02d}.png")
    (folder / "04b.png").write_bytes(b"corrupt")  # a skip, committed by the shard that owns it
    shared = tmp_path / "shared"
    plan = [{"parallel": [{"out": str(shared), "shard": [i, 3]} for i in range(3)]}]
    plan += [{"out": str(tmp_path / f"alone{i}"), "shard": [i, 3]} for i in range(3)]
    env = dict(os.environ, PYTHONPATH=str(HERE.parent))
    proc = subprocess.run([sys.executable, str(HERE / "runner_worker.py"), tiny_dir("llava"), str(folder),
                           json.dumps(plan)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [[0, 0, 0], 0, 0, 0], proc.stderr[-2000:]
    ids = sorted(p.name for p in folder.iterdir())
    merged = Store(shared)
    alone = [Store(tmp_path / f"alone{i}") for i in range(3)]
    assert merged.complete and not any(a.complete for a in alone)  # only the shared store holds every shard
    assert sorted(merged.records) == sorted(r for a in alone for r in a.records) == [i for i in ids if i != "04b.png"]
    assert len(set(merged.records)) == len(merged.records)
    assert merged.skipped == {k: v for a in alone for k, v in a.skipped.items()} and list(merged.skipped) == ["04b.png"]
    assert {tuple(p["shard"]) for p in merged.parts} == {(0, 3), (1, 3), (2, 3)}
    for i, a in enumerate(alone):  # shard i: positions i, i+3, ... of the source
        assert a.records == [x for x in ids[i::3] if x != "04b.png"]
    for probe in ("norms", "embed_lens"):
        got = merged.frame(probe).sort_values("record_id", kind="stable").reset_index(drop=True)
        want = pd.concat([a.frame(probe) for a in alone]).sort_values("record_id", kind="stable")
        pd.testing.assert_frame_equal(got, want.reset_index(drop=True))


def test_overlapping_writers_commit_each_record_once(tmp_path):
    """Two writers whose shares overlap (shard (0, 2) and the whole set), both opened before either commits: the
    later commit leaves out the record the other one committed meanwhile, rows included."""
    from mech_vtokens.store import Writer

    def rows(ids, tag):
        return {"t": pd.DataFrame({"record_id": [i for i in ids for _ in range(2)], "v": [tag] * 2 * len(ids)})}

    settings = {"x": 1}
    with Writer(tmp_path, "test", settings, ["t"], shard=(0, 2)) as a, Writer(tmp_path, "test", settings, ["t"]) as b:
        assert a.done == b.done == set()
        assert a.commit(["r0", "r2"], rows(["r0", "r2"], "a"), skipped={"r4": "skipped: bad"}) == ["r0", "r2"]
        assert b.commit(["r0", "r1"], rows(["r0", "r1"], "b"), skipped={"r4": "skipped: other"}) == ["r1"]
        assert not b.finish(["r0", "r1", "r2", "r3", "r4"]) and a.finish(["r0", "r1", "r2", "r4"])
    s = Store(tmp_path)
    assert s.records == ["r0", "r2", "r1"] and s.skipped == {"r4": "skipped: bad"}
    f = s.frame("t")
    assert f.groupby("record_id").v.agg(list).to_dict() == {"r0": ["a", "a"], "r1": ["b", "b"], "r2": ["a", "a"]}


def test_store_of_another_version_is_refused_with_the_fix(tmp_path, tiny_vlm):
    import pytest

    from mech_vtokens.errors import InputError

    src = D.InMemory([T.image(60, seed=0)])
    run_dataset(tiny_vlm("llava"), src, probes=["norms"], out=tmp_path, progress=False)
    m = json.loads((tmp_path / "manifest.json").read_text())
    m["version"] = 1
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    for call in (lambda: Store(tmp_path),
                 lambda: run_dataset(tiny_vlm("llava"), src, probes=["norms"], out=tmp_path, progress=False)):
        with pytest.raises(InputError, match=r"format version 1, this mech_vtokens reads version 2: .*(new out "
                                             r"directory|write a new one)"):
            call()
    again = run_dataset(tiny_vlm("llava"), src, probes=["norms"], out=tmp_path, progress=False, overwrite=True)
    assert again.records == ["0"] and again.manifest["version"] == 2


def test_store_tables_are_named_as_results_keys():
    """A probe object's store table has the name its result has in mv.run's Results (ViTSinks -> "vit_sinks", not
    a second naming scheme), and a name given with .named() is kept."""
    from mech_vtokens.probes import ViTSinks
    from mech_vtokens.runner import _Spec

    for probe, want in ((ViTSinks(), "vit_sinks"), (EmbedLens(k=2), "embed_lens"), (NormTracker(), "norm_tracker"),
                        (EmbedLens(k=2).named("early"), "early")):
        assert _Spec(probe, "probe", 5).name == probe.name == want


def test_partition_as_a_probe_name_is_refused_not_dropped(tmp_path, tiny_vlm, no_forward):
    """'partition' is a suite name but no probe of one forward: run_dataset used to accept it and write nothing for
    it; now it is refused before any work, naming the calls that run the partition."""
    from mech_vtokens import InputError

    T.image(64, seed=1).save(tmp_path / "a.png")
    with pytest.raises(InputError, match="partition.calibrate"):
        run_dataset(tiny_vlm("llava"), tmp_path, probes=["embed_lens", "partition"], out=tmp_path / "out",
                    progress=False)
    assert not (tmp_path / "out").exists()
