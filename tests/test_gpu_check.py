"""The device check (bench/gpu.py, scripts/gpu_check.sh) stays alive on the CPU: its smaller CPU variant runs on the
real-config fixtures and every check it makes passes (lens ids == fp32, trace == plain hooks for every intervention,
mv.generate == HF generate under the hooks, results on the CPU). On a GPU the same script runs at real widths."""

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _gpu_module(monkeypatch, cache):
    monkeypatch.setenv("MECH_VTOKENS_BENCH_CACHE", str(cache))
    monkeypatch.syspath_prepend(str(BENCH))
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH / "gpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_check_runs_on_cpu_and_every_check_passes(monkeypatch, tmp_path, capsys):
    gpu = _gpu_module(monkeypatch, tmp_path)
    cks = ["llava-hf/llava-1.5-7b-hf", "Qwen/Qwen2.5-VL-7B-Instruct", "OpenGVLab/InternVL3-1B-hf"]
    rc = gpu.main(["--device", "cpu", "--small", "--repeats", "1", "--new-tokens", "2", "--checkpoints", *cks,
                   "--out", str(tmp_path / "table.txt")])
    out = capsys.readouterr().out
    assert rc == 0 and "ALL CHECKS PASSED" in out, out
    import pandas as pd

    rows = pd.read_csv(tmp_path / "table.csv")
    assert list(rows["family"]) == ["llava", "qwen2_5_vl", "internvl"]
    assert rows[["interventions_ok", "knockout_ok", "generate_ids_equal", "results_on_cpu"]].all().all()
    assert (rows["interventions_maxdiff"] <= 1e-4).all()


def test_gpu_check_fails_loudly_when_a_lens_disagrees_with_fp32(monkeypatch, tmp_path, capsys):
    gpu = _gpu_module(monkeypatch, tmp_path)
    real = gpu._agreement
    monkeypatch.setattr(gpu, "_agreement", lambda ours, ref: real(ours.flip(1), ref))  # a planted wrong ranking
    rc = gpu.main(["--device", "cpu", "--small", "--repeats", "1", "--new-tokens", "1", "--checkpoints",
                   "llava-hf/llava-1.5-7b-hf"])
    assert rc == 1 and "SOME CHECKS FAILED" in capsys.readouterr().out
    sys.modules.pop("bench_gpu", None)
