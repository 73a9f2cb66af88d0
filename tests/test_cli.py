"""The README's main command (`mech-vtokens demo`) and `analyze`, offline."""

import pandas as pd
import pytest

from mech_vtokens.cli import main


def test_demo_writes_report_and_tables(tmp_path, capsys, tiny_dir):
    path = tiny_dir("llava")
    assert main(["demo", "--model", path, "--out", str(tmp_path), "--images", "2", "--k", "3"]) == 0
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
    assert main(["demo", "--out", str(tmp_path), "--images", "1", "--k", "2"]) == 0
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
