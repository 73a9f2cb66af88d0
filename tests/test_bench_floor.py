"""The probe-suite bench stays alive: its bare-torch floor (bench/suite_floor.py) computes the same numbers as the
suite on both backends (nnsight trace, plain hooks), here on the tiny LLaVA in bf16 (so the lenses' fp32 re-rank
runs), and its exact lens ids equal a full fp32 computation."""

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
K, DIMS = 5, [1, 3]


def _floor_module():
    spec = importlib.util.spec_from_file_location("bench_suite_floor", ROOT / "bench" / "suite_floor.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def setup(tiny_dir):
    import mech_vtokens as mv
    from mech_vtokens import testing as T

    vlm = mv.load(tiny_dir("llava"), dtype=torch.bfloat16)
    # two rows of different lengths: padding, a BOS per row, ranks per row
    prompts = [vlm.prompt("describe the image ."), vlm.prompt("what is the red circle in the image ?")]
    batch = vlm.prepare([T.image(84, seed=0), T.image(84, seed=1)], prompts)
    SF = _floor_module()
    inv = SF.inverse_row_norms(vlm.embedding_matrix.detach())
    return vlm, batch, SF, SF.floor(vlm, batch, K, DIMS, inv, exact=True)


def _suite(vlm, batch, SF, backend):
    import nnsight
    from mech_vtokens.harness import applied

    probes = SF.suite_probes(K, DIMS)
    if backend == "nnsight":
        exp = vlm.experiment(batch, probes=probes)
        with torch.no_grad(), vlm.trace(**batch.inputs):
            raw = nnsight.save(exp.execute(vlm.model))
        return exp.results(raw)
    with torch.no_grad(), applied(vlm, batch, probes=probes) as h:
        vlm.hf(**batch.inputs)
    return h.experiment.results(h.raw)


@pytest.mark.parametrize("backend", ["nnsight", "hooks"])
def test_floor_does_the_suites_work(setup, backend):
    vlm, batch, SF, fl = setup
    checks = SF.check(vlm, _suite(vlm, batch, SF, backend), fl)
    assert len(checks) == 14
    assert {k: v for k, v in checks.items() if not v[0]} == {}


def test_exact_floor_ids_equal_fp32(setup):
    vlm, batch, SF, fl = setup
    assert batch.inputs["attention_mask"].eq(0).any()  # the rows really differ in length
    W, U = vlm.embedding_matrix.detach().float(), vlm.unembed.weight.detach().float()
    x = SF.states(vlm, batch)
    n_ids = 0
    for p in ["hook_embed"] + [f"blocks.{i}.hook_resid_post" for i in range(vlm.n_layers)]:
        h = (x["embed"] if p == "hook_embed" else x[f"post.{p.split('.')[1]}"])[batch.visual_mask]
        cos = F.normalize(h.float(), dim=1) @ F.normalize(W, dim=1).T
        logits = vlm.final_norm(h).float() @ U.T
        assert torch.equal(fl[("embed", p)][0], cos.topk(K, dim=1).indices)
        assert torch.equal(fl[("logit", p)][0], logits.topk(K, dim=1).indices)
        torch.testing.assert_close(fl[("embed", p)][1], cos.topk(K, dim=1).values, rtol=1e-5, atol=1e-5)
        n_ids += cos.shape[0]
    assert n_ids == (vlm.n_layers + 1) * batch.n_visual


def test_exact_topk_resolves_bf16_near_ties():
    """Forty rows whose scores differ below bf16's resolution (one channel of a common row carries j * 2^-10), in a
    random order: the bf16 pass cannot rank them, the fp32 re-rank and the full-vocabulary look must."""
    SF = _floor_module()
    g = torch.Generator().manual_seed(0)
    d, n_rows = 64, 40
    base = torch.randn(d, generator=g).to(torch.bfloat16)
    mat = base.repeat(n_rows + 24, 1)
    mat[:n_rows, 0] = torch.arange(n_rows, dtype=torch.float32).to(torch.bfloat16) * 2.0 ** -10
    mat[n_rows:] = torch.randn(24, d, generator=g).to(torch.bfloat16) * 0.01  # far below: never in the top-k
    mat = mat[torch.randperm(len(mat), generator=g)]
    h = torch.cat([torch.ones(1), base[1:].float()])[None].to(torch.bfloat16).repeat(3, 1)
    want = (h.float() @ mat.float().T).topk(K, dim=1)
    v, ids = SF.exact_topk(h, mat, K, chunk=16)
    assert torch.equal(ids, want.indices)
    torch.testing.assert_close(v, want.values, rtol=1e-6, atol=1e-6)
