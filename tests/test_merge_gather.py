"""The MSTM weighted merge as a gather: a NaN/inf token reaches only its output row, lone tokens are
copied bit-exactly, and results do not depend on the run (Triton kernel, interpreted on CPU)."""
import pytest
import torch

import fastprune
from fastprune.kernels.merge import mstm_merge_triton


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
    nonfinite = ~torch.isfinite(got.x.float()).all(-1)
    expected = torch.zeros_like(nonfinite)
    expected[0, got.index[0, j]] = True
    assert torch.equal(nonfinite, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_lone_tokens_bit_identical_and_deterministic(device, dtype):
    B, N, C, r = 3, 31, 24, 6
    x = torch.randn(B, N, C, device=device).to(dtype)
    scores = torch.rand(B, N, device=device)
    size = torch.randint(1, 5, (B, N), device=device).float()
    got = mstm_merge_triton(x, scores, r, size=size, weight="size_attn")
    again = mstm_merge_triton(x, scores, r, size=size, weight="size_attn")
    assert torch.equal(got.x, again.x) and torch.equal(got.size, again.size)
    counts = torch.zeros(B, N - r, dtype=torch.long, device=device).scatter_add_(1, got.index,
                                                                                torch.ones_like(got.index))
    for b in range(B):
        for s in (counts[b] == 1).nonzero().flatten().tolist():
            i = (got.index[b] == s).nonzero().item()
            assert torch.equal(got.x[b, s], x[b, i])
    torch.testing.assert_close(got.size, torch.zeros(B, N - r, device=device).scatter_add(1, got.index, size))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_evit_kept_non_finite_token_does_not_reach_the_fused_token(device, dtype):
    from fastprune.kernels.evit import evit_triton

    B, N, C = 2, 19, 32
    x = torch.randn(B, N, C, device=device).to(dtype)
    scores = torch.rand(B, N, device=device)
    j = int(scores[0, 1:].argmax()) + 1  # the most attended patch: always kept
    x[0, j, 0] = float("nan")
    got = evit_triton(x, scores, 9)
    nonfinite = ~torch.isfinite(got.x.float()).all(-1)
    expected = torch.zeros_like(nonfinite)
    expected[0, got.index[0, j]] = True
    assert torch.equal(nonfinite, expected)
