"""The README's main command (`mech-vtokens demo`) and `analyze`, offline."""

import pandas as pd
import pytest

from mech_vtokens.cli import main


def test_demo_writes_report_and_tables(tmp_path, capsys, tiny_dir):
    path = tiny_dir("llava")
    assert main(["demo", "--model", path, "--out", str(tmp_path), "--n-images", "2", "--k", "3"]) == 0
    printed = capsys.readouterr().out
    assert "embed_lens: most frequent top-1 token per site" in printed and "report: " in printed
    html = (tmp_path / "report.html").read_text()
    # 2 images: both in the patch viewer (one grid per batch); the BOS-sink section present
    assert html.count('class="panel" data-image="') >= 2 and "Label matching" in html and "BOS sink" in html
    assert "Sink / dead / alive partition" in html and "Semantic sparsity" in html
    part = pd.read_csv(tmp_path / "partition.csv")
    assert len(part) == 2 * 36 and set(part.group) <= {"vit_sink", "llm_sink", "dead", "alive"}
    n_sites = 1 + 3  # hook_embed + 3 decoder layers (tiny LLaVA)
    for name in ("embed_lens", "logit_lens"):
        df = pd.read_csv(tmp_path / f"{name}.csv")
        # 2 images x 36 visual tokens (6x6 grid) x 4 sites x k=3 ranks
        assert len(df) == 2 * 36 * n_sites * 3
        assert sorted(df["rank"].unique()) == [0, 1, 2]
        assert df.groupby(["site", "visual_index"]).size().eq(3).all()
    norms = pd.read_csv(tmp_path / "norms.csv")
    assert set(norms.tower) == {"vision", "lm"}


def test_demo_default_model_runs(tmp_path):
    assert main(["demo", "--out", str(tmp_path), "--n-images", "1", "--k", "2"]) == 0
    assert (tmp_path / "report.html").exists()


def test_analyze_folder_skips_broken_files(tmp_path, capsys, tiny_dir):
    from mech_vtokens import testing as T

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    T.image(100, seed=1).save(imgs / "a.png")
    T.image(80, seed=2).convert("RGBA").save(imgs / "b.png")
    (imgs / "broken.jpg").write_bytes(b"not an image")
    out = tmp_path / "out"
    assert main(["analyze", "--model", tiny_dir("qwen2_vl"), "--images", str(imgs), "--probes",
                 "embed_lens,norms", "--out", str(out), "--k", "2"]) == 0
    cap = capsys.readouterr()
    assert "skipped broken.jpg" in cap.err
    df = pd.read_csv(out / "embed_lens.csv")
    assert sorted(df.image.unique()) == [0, 1]


@pytest.mark.parametrize("argv,msg", [
    (["sites", "--model", "/definitely/missing"], "cannot load a config from"),
    (["analyze", "--model", "x", "--images", "/definitely/missing"], "not a directory"),
    (["analyze", "--model", "x", "--images", ".", "--probes", "bogus"], "unknown ['bogus']"),
])
def test_bad_input_is_a_clear_error(argv, msg, capsys):
    assert main(argv) == 2
    assert msg in capsys.readouterr().err


# ---- one CLI: every option explained, one meaning per name, validated before any work ---------------------------

def _subcommands():
    import argparse

    from mech_vtokens.cli import parser

    ap = parser()
    sub = next(a for a in ap._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


def test_every_option_of_every_subcommand_has_help():
    import argparse

    subs = _subcommands()
    assert set(subs) == {"demo", "analyze", "run", "sites"}
    missing = [(cmd, a.option_strings) for cmd, p in subs.items() for a in p._actions
               if not isinstance(a, argparse._HelpAction) and not (a.help or "").strip()]
    assert not missing, f"options without a help text: {missing}"
    for cmd, p in subs.items():  # the help renders (a bad %-format in a help text raises here)
        assert "--" in p.format_help()


def test_one_meaning_per_option_name():
    """An option name spelled in several subcommands has one type and one action there (a count in one command
    and a folder in another was `--images`); a renamed spelling is refused everywhere it is kept."""
    from mech_vtokens.cli import _Renamed

    seen = {}
    for cmd, p in _subcommands().items():
        for a in p._actions:
            if isinstance(a, _Renamed):
                continue
            for opt in a.option_strings:
                seen.setdefault(opt, set()).add((type(a).__name__, getattr(a.type, "__name__", None), a.nargs))
    assert {opt for opt, kinds in seen.items() if len(kinds) > 1} == set(), seen
    assert seen["--n-images"] == {("_StoreAction", "_positive_int", None)}
    assert seen["--images"] == {("_StoreAction", None, None)}


def test_renamed_option_names_the_new_one(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--images", "3"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--images was renamed to --n-images" in err and "folder in `analyze`" in err


@pytest.mark.parametrize("argv,msg", [
    (["analyze", "--images", "IMGS", "--probes", "labels"], "label matching needs each image's object labels"),
    (["analyze", "--images", "IMGS", "--probes", "embed_lens, norms,sinkz"],
     "unknown ['sinkz'] (did you mean 'sinks'?)"),
    (["analyze", "--images", "IMGS", "--probes", ","], "no probe name"),
    (["analyze", "--images", "IMGS", "--probes", ""], "no probe name"),  # was read as "all probes"
    (["run", "--data", "IMGS", "--probes", "partition"], "`mech-vtokens run` cannot run it"),
    (["run", "--data", "IMGS", "--probes", "embed_lens,lables"], "unknown ['lables'] (did you mean 'labels'?)"),
    (["run", "--data", "IMGS", "--images-dir", "/definitely/missing"], "--images-dir /definitely/missing: not a dir"),
    (["run", "--data", "IMGS", "--shard", "2of4"], "--shard '2of4': write I/N"),
])
def test_options_are_checked_before_the_model_loads(argv, msg, tmp_path, capsys, monkeypatch):
    """--probes is checked against the names the command can run (labels was accepted then dropped) and the other
    options are checked before any model is loaded: a load would fail on the missing model first."""
    import mech_vtokens as mv
    from mech_vtokens import testing as T

    T.image(64, seed=1).save(tmp_path / "a.png")
    T.image(64, seed=2).save(tmp_path / "b.png")
    monkeypatch.setattr(mv, "load", lambda *a, **k: pytest.fail("the model was loaded before the check"))
    argv = [str(tmp_path) if a == "IMGS" else a for a in argv] + ["--model", "/definitely/missing"]
    assert main(argv) == 2
    assert msg in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["demo", "--k", "0"], ["demo", "--batch-size", "0"], ["demo", "--n-images", "-1"],
                                  ["analyze", "--images", "IMGS", "--k", "0"],
                                  ["run", "--data", "IMGS", "--batch-size", "0"],
                                  ["run", "--data", "IMGS", "--limit", "0"],
                                  ["analyze", "--images", "IMGS", "--k", "two"]])
def test_counts_are_refused_before_the_model_loads(argv, tmp_path, capsys, monkeypatch):
    """--k / --batch-size / --n-images / --limit must be positive ints: argparse refuses 0, negatives and words
    (exit 2, naming the option) before any model is loaded (a 0 reached the model and failed after the load)."""
    import mech_vtokens as mv

    monkeypatch.setattr(mv, "load", lambda *a, **k: pytest.fail("the model was loaded before the check"))
    argv = [str(tmp_path) if a == "IMGS" else a for a in argv]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and argv[-2] in err and ("not positive" in err or "not an integer" in err), err


def test_sites_runs_on_the_default_model(capsys):
    import mech_vtokens as mv
    from mech_vtokens.defaults import default_model

    assert main(["sites"]) == 0
    cap = capsys.readouterr()
    want = mv.load(default_model()[0]).sites
    assert cap.out.split() == list(want) and "hook_embed" in want
    assert "# model: " in cap.err  # which model it listed


def _coco_layout(root, n=3):
    """annotations/instances.json naming files that live in images/ (not beside the JSON)."""
    import json

    from mech_vtokens import testing as T

    (root / "annotations").mkdir(parents=True)
    (root / "images").mkdir()
    ims = []
    for i in range(n):
        im = T.image(64 + 8 * i, seed=10 + i)
        im.save(root / "images" / f"{i}.png")
        ims.append(im)
    coco = {"images": [{"id": i, "file_name": f"{i}.png"} for i in range(n)],
            "annotations": [{"image_id": i, "category_id": 1, "bbox": [1, 1, 9, 9]} for i in range(n)],
            "categories": [{"id": 1, "name": "red"}]}
    (root / "annotations" / "instances.json").write_text(json.dumps(coco))
    return root / "annotations" / "instances.json", root / "images", ims


def test_run_reads_a_coco_layout_through_images_dir(tmp_path, capsys, tiny_dir, tiny_vlm):
    """`run --data annotations/instances.json --images-dir images/` finds the images and its tables equal
    mv.run on the same images (independent of the store and the data loader)."""
    import mech_vtokens as mv
    from mech_vtokens.defaults import prompt
    from mech_vtokens.probes import EmbedLens
    from mech_vtokens.store import Store

    js, images_dir, ims = _coco_layout(tmp_path / "coco")
    out = tmp_path / "out"
    base = ["run", "--model", tiny_dir("llava"), "--data", str(js), "--probes", "embed_lens,labels", "--k", "2",
            "--question", "what color is it ?", "--no-progress"]
    assert main(base + ["--out", str(tmp_path / "no_dir")]) == 2  # the images are not beside the JSON
    assert "images exists" in (err := capsys.readouterr().err) and "pass --images-dir " in err
    assert main(base + ["--images-dir", str(images_dir), "--out", str(out), "--batch-size", "2"]) == 0
    assert "3 records done, 0 skipped" in capsys.readouterr().out
    store = Store(out)
    assert store.records == ["0", "1", "2"] and set(store.tables) == {"embed_lens", "labels"}
    got = store.frame("embed_lens")
    vlm = tiny_vlm("llava")
    for i, im in enumerate(ims):
        want = mv.run(vlm, [im], [prompt(vlm, "what color is it ?")], probes=[EmbedLens(k=2)])["embed_lens"]
        want = want.to_pandas()
        mine = got[got.record_id == str(i)]
        assert mine.token_id.tolist() == want.token_id.tolist()
        assert mine.score.to_numpy() == pytest.approx(want.score.to_numpy(), abs=1e-5)


def _bars(err: str) -> list[str]:
    """The tqdm bars in captured stderr (a bar line has 'N/M [' with its rate)."""
    import re

    return sorted({m.group(1).strip() for m in re.finditer(r"(?:^|\r)([^\r\n:]*):\s+\d+%\|", err)})


def test_progress_bars_follow_no_progress(tmp_path, capsys, tiny_dir):
    """Every long phase shows a bar (loading the weights, the run's records, the analysis' passes), and
    --no-progress hides them all."""
    js, images_dir, _ = _coco_layout(tmp_path / "coco", n=2)
    common = ["--model", tiny_dir("llava"), "--k", "2"]
    assert main(["run", "--data", str(js), "--images-dir", str(images_dir), "--out", str(tmp_path / "r1")]
                + common) == 0
    bars = _bars(capsys.readouterr().err)
    assert "records" in bars, bars
    assert main(["run", "--data", str(js), "--images-dir", str(images_dir), "--out", str(tmp_path / "r2"),
                 "--no-progress"] + common) == 0
    assert _bars(capsys.readouterr().err) == []
    assert main(["analyze", "--images", str(images_dir), "--probes", "embed_lens,norms", "--out",
                 str(tmp_path / "a1")] + common) == 0
    assert _bars(capsys.readouterr().err), "analyze showed no progress bar"
    assert main(["analyze", "--images", str(images_dir), "--probes", "embed_lens,norms", "--out",
                 str(tmp_path / "a2"), "--no-progress"] + common) == 0
    assert _bars(capsys.readouterr().err) == []
