"""Issue 15: no silent wrong results. Each class of bad or unusual input (2: one image, two inputs; 3: arguments
validated at the API boundary; 6: thresholds a model can never reach; 7: bugs) is fed SEVERAL inputs and must give
the right result exactly, or an InputError raised before any forward whose message names the fix."""

import pytest
import torch

from mech_vtokens.ops import topk_rerank


# ---- class 7: bugs ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 5])
def test_topk_any_chunk_equals_unchunked(dtype, k):
    """The running top-k merge over vocabulary chunks gives the unchunked ids EXACTLY for every chunk size, also
    chunks smaller than the candidate count (which used to ask topk for more candidates than a chunk pair holds),
    with a bias, a -inf penalty and the log-sum-exp."""
    g = torch.Generator().manual_seed(1)
    vocab, d = 37, 16
    W = torch.randn(vocab, d, generator=g).to(dtype)
    h = torch.randn(6, d, generator=g).to(dtype)
    bias = torch.randn(vocab, generator=g)
    pen = torch.zeros(vocab)
    pen[[0, 3, 30]] = float("-inf")
    n_cand = max(2 * k, k + 3)
    ref_v, ref_i, _, ref_lse = topk_rerank(h, W, k, n_cand, vocab, bias=bias, penalty=pen, want_lse=True)
    exact = (h.float() @ W.float().T + bias + pen).topk(k, dim=1)
    assert torch.equal(ref_i, exact.indices)
    for chunk in sorted({1, 2, max(1, k - 1), k, n_cand - 1, vocab - 1, vocab, 10 * vocab}):
        v, i, _, lse = topk_rerank(h, W, k, n_cand, chunk, bias=bias, penalty=pen, want_lse=True)
        assert torch.equal(i, ref_i), chunk
        torch.testing.assert_close(v, ref_v, atol=1e-5, rtol=0)  # fp32 gemms of other shapes: rounding only
        torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-5)
