"""The one weighted merge (kernels/weighted_merge.py) under every method: any index map (outputs
receiving one token or more tokens than a program has rows, several channel blocks) against the
reference formula, values, sizes and gradients. Triton kernels, interpreted on CPU; the methods
through it: tests/test_merge_gather.py."""
import pytest
import torch

from fastprune import reference
from fastprune.kernels.weighted_merge import weighted_merge, weighted_merge_backward

WEIGHT_EPS = reference.WEIGHT_EPS


def _index_map(B, N, S, device, crowded=False):
    """A random index map onto ``[0, S)`` in which every output receives at least one token; with
    ``crowded`` one output receives a third of the tokens (more than a program's rows)."""
    rows = []
    for _ in range(B):
        first = torch.randperm(N)[:S]  # one token per output, anywhere
        rest = torch.randint(0, 2 if crowded else S, (N,))
        row = rest.clone()
        row[first] = torch.arange(S)
        if crowded:
            row[torch.randperm(N)[: N // 3]] = 1
            row[first] = torch.arange(S)
        rows.append(row)
    return torch.stack(rows).to(device)


def _reference(x, scores, size, index, n_out, size_attn):
    s = torch.ones_like(index, dtype=torch.float32) if size is None else size
    w = s * scores.clamp_min(WEIGHT_EPS) if size_attn else s
    return reference.weighted_merge(x, w, s, index, n_out)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("B,N,S,C,crowded", [(2, 23, 17, 40, False), (1, 50, 20, 300, True), (3, 5, 1, 7, False)])
@pytest.mark.parametrize("size_attn,with_size", [(False, False), (False, True), (True, True)])
def test_any_index_map_matches_the_formula(device, dtype, tol, B, N, S, C, crowded, size_attn, with_size):
    x = torch.randn(B, N, C, device=device).to(dtype)
    scores = torch.rand(B, N, device=device)
    size = torch.randint(1, 5, (B, N), device=device).float() if with_size else None
    index = _index_map(B, N, S, device, crowded)
    out, size_out, wsum = weighted_merge(x, scores, size, index, S, size_attn)
    want, want_size = _reference(x, scores, size, index, S, size_attn)
    torch.testing.assert_close(out.float(), want.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(size_out, want_size.float())
    lone = torch.zeros(B, S, device=device).scatter_add(1, index, torch.ones_like(scores)) == 1
    # an output that receives one token is that token, bit for bit
    first = torch.full((B, S), -1, dtype=torch.long, device=device).scatter_(1, index, torch.arange(N, device=device)
                                                                            .expand(B, N).contiguous())
    for b, s in lone.nonzero().tolist():
        assert torch.equal(out[b, s], x[b, first[b, s]])


@pytest.mark.parametrize("size_attn", [False, True])
def test_any_index_map_gradients(device, size_attn):
    B, N, S, C = 2, 19, 8, 36
    x = torch.randn(B, N, C, device=device, requires_grad=True)
    scores = torch.rand(B, N, device=device, requires_grad=True)
    size = (torch.rand(B, N, device=device) + 0.5).requires_grad_()
    index = _index_map(B, N, S, device)
    g, gs = torch.randn(B, S, C, device=device), torch.randn(B, S, device=device)
    want, want_size = _reference(x, scores, size, index, S, size_attn)
    ((want * g).sum() + (want_size * gs).sum()).backward()
    out, _, wsum = weighted_merge(x.detach(), scores.detach(), size.detach(), index, S, size_attn)
    gx, gsc, gz = weighted_merge_backward(g, gs, x.detach(), out, index, wsum, scores.detach(), size.detach(),
                                          size_attn, True, size_attn, True)
    torch.testing.assert_close(gx, x.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gz, size.grad, rtol=1e-4, atol=1e-5)
    if size_attn:
        torch.testing.assert_close(gsc, scores.grad, rtol=1e-4, atol=1e-5)
    else:
        assert gsc is None
