"""The weighted merge as a gather (kernels/weighted_merge.py), through MSTM and ToMe: a NaN/inf token
reaches only its output row, lone tokens are copied bit-exactly, and results do not depend on the
run (Triton kernels, interpreted on CPU)."""
import pytest
import torch

import fastprune
from fastprune.kernels.merge import mstm_merge_triton
from fastprune.kernels.tome import tome_merge_triton
from fastprune.tome import tome_merge_reference


def _assert_non_finite_only_in_row_of(got, j):
    """Only the output row that token ``j`` of image 0 went to is non-finite."""
    nonfinite = ~torch.isfinite(got.x.float()).all(-1)
    expected = torch.zeros_like(nonfinite)
    expected[0, got.index[0, j]] = True
    assert torch.equal(nonfinite, expected)


def _assert_lone_tokens_copied(got, again, x, size):
    """Same results twice; every output that received one token is that token; sizes add up.
    Returns the number of such outputs."""
    B, N = got.index.shape
    S = got.x.shape[1]
    assert torch.equal(got.x, again.x) and torch.equal(got.size, again.size) and torch.equal(got.index, again.index)
    counts = torch.zeros(B, S, dtype=torch.long, device=x.device).scatter_add_(1, got.index,
                                                                              torch.ones_like(got.index))
    n_lone = 0
    for b in range(B):
        for s in (counts[b] == 1).nonzero().flatten().tolist():
            i = (got.index[b] == s).nonzero().item()
            assert torch.equal(got.x[b, s], x[b, i])
            n_lone += 1
    ones = torch.ones(B, N, device=x.device) if size is None else size
    torch.testing.assert_close(got.size, torch.zeros(B, S, device=x.device).scatter_add(1, got.index, ones))
    return n_lone


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("p,r", [(1, 3), (0, 1), (5, 9)])
def test_non_finite_token_stays_in_its_output_row(device, dtype, bad, p, r):
    B, N, C = 2, 23, 40
    x = torch.randn(B, N, C, device=device).to(dtype)
    scores = torch.rand(B, N, device=device)
    metric = torch.randn(B, N, C, device=device)  # finite: the matching does not see the bad value
    j = N - 2
    x[0, j, 3] = bad
    got = mstm_merge_triton(x, scores, r, metric=metric, num_prefix_tokens=p)
    ref = fastprune.merge_tokens(x, scores, r, metric=metric, num_prefix_tokens=p, backend="reference")
    assert torch.equal(got.index, ref.index)
    _assert_non_finite_only_in_row_of(got, j)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_lone_tokens_bit_identical_and_deterministic(device, dtype):
    B, N, C, r = 3, 31, 24, 6
    x = torch.randn(B, N, C, device=device).to(dtype)
    scores = torch.rand(B, N, device=device)
    size = torch.randint(1, 5, (B, N), device=device).float()
    got = mstm_merge_triton(x, scores, r, size=size, weight="size_attn")
    again = mstm_merge_triton(x, scores, r, size=size, weight="size_attn")
    _assert_lone_tokens_copied(got, again, x, size)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("p,r,j", [(1, 3, 21), (0, 1, 4), (2, 9, 8), (1, 5, 1)])
def test_tome_non_finite_token_stays_in_its_output_row(device, dtype, bad, p, r, j):
    """``j`` even: an A token (merged or kept); odd: a B token (a destination or not)."""
    B, N, C = 2, 23, 40
    x = torch.randn(B, N, C, device=device).to(dtype)
    metric = torch.randn(B, N, C, device=device)  # finite: the matching does not see the bad value
    x[0, j, 3] = bad
    got = tome_merge_triton(x, r, metric=metric, num_prefix_tokens=p)
    assert torch.equal(got.index, tome_merge_reference(x, r, metric=metric, num_prefix_tokens=p).index)
    _assert_non_finite_only_in_row_of(got, j)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_size", [False, True])
def test_tome_lone_tokens_bit_identical_and_deterministic(device, dtype, with_size):
    B, N, C, r = 3, 31, 24, 6
    x = torch.randn(B, N, C, device=device).to(dtype)
    size = torch.randint(1, 5, (B, N), device=device).float() if with_size else None
    got = tome_merge_triton(x, r, size=size)
    again = tome_merge_triton(x, r, size=size)
    assert torch.equal(got.index, tome_merge_reference(x, r, size=size).index)
    assert _assert_lone_tokens_copied(got, again, x, size) >= B * (N - 3 * r)  # most outputs absorb nothing


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_evit_kept_non_finite_token_does_not_reach_the_fused_token(device, dtype):
    from fastprune.kernels.evit import evit_triton

    B, N, C = 2, 19, 32
    x = torch.randn(B, N, C, device=device).to(dtype)
    scores = torch.rand(B, N, device=device)
    j = int(scores[0, 1:].argmax()) + 1  # the most attended patch: always kept
    x[0, j, 0] = float("nan")
    got = evit_triton(x, scores, 9)
    _assert_non_finite_only_in_row_of(got, j)


@pytest.mark.parametrize("seed", [0, 1])
def test_nan_in_metric_and_scores_gives_the_references_index_map(seed):
    """ToMe and BAT through the primitives follow the reference's NaN rules (NaN ranks first)."""
    from fastprune.bat import bat_tokens
    from fastprune.tome import tome_merge_tokens

    g = torch.Generator().manual_seed(seed)
    x, m = torch.randn(2, 17, 8, generator=g), torch.randn(2, 17, 8, generator=g)
    m[0, 3], m[1, 6, 2] = float("nan"), float("nan")
    attn = torch.rand(2, 17, generator=g)
    attn[0, 5] = float("nan")
    dev = lambda t: t.to("cuda" if torch.cuda.is_available() else "cpu")  # noqa: E731
    a = tome_merge_tokens(x, 4, metric=m, backend="reference")
    b = tome_merge_tokens(dev(x), 4, metric=dev(m), backend="triton")
    assert torch.equal(a.index, b.index.cpu())
    a = bat_tokens(x, attn, 0.6, metric=m, backend="reference")
    b = bat_tokens(dev(x), dev(attn), 0.6, metric=dev(m), backend="triton")
    assert torch.equal(a.index, b.index.cpu())
