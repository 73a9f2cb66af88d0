"""The README's main command: `mech-vtokens demo` on the embedded default model, offline."""

import pandas as pd

from mech_vtokens.cli import main


def test_demo_writes_both_lens_tables(tmp_path, capsys, tiny_dir):
    path = tiny_dir("llava")
    assert main(["demo", "--model", path, "--out", str(tmp_path), "--images", "2", "--k", "3"]) == 0
    printed = capsys.readouterr().out
    assert "embed_lens: most frequent top-1 token per site" in printed
    for name in ("embed_lens", "logit_lens"):
        df = pd.read_csv(tmp_path / f"{name}.csv")
        # 2 images x 36 visual tokens x 3 sites x k=3 ranks (tiny LLaVA: 6x6 patch grid)
        assert len(df) == 2 * 36 * 3 * 3
        assert sorted(df["rank"].unique()) == [0, 1, 2]
        assert df.groupby(["site", "visual_index"]).size().eq(3).all()


def test_demo_default_model_runs(tmp_path):
    assert main(["demo", "--out", str(tmp_path), "--images", "1", "--k", "2"]) == 0
    assert (tmp_path / "embed_lens.csv").exists()


def test_bad_model_is_a_clear_error(tmp_path, capsys):
    assert main(["sites", "--model", str(tmp_path / "missing")]) == 2
    assert "cannot load a config from" in capsys.readouterr().err
