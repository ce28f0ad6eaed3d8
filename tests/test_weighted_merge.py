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


def _formula(x, scores, size, index, n_out, size_attn, size_weight, normalize):
    """``x'_d = sum_{i -> d} (w_i / W_d) x_i`` (or ``sum w_i x_i``), float64, with the options' weights."""
    ones = torch.ones_like(index, dtype=torch.float64)
    s = ones if size is None else size.double()
    w = (s if size_weight else ones) * (scores.double().clamp_min(WEIGHT_EPS) if size_attn else ones)
    B, N, C = x.shape
    W = torch.zeros(B, n_out, dtype=torch.float64, device=x.device).scatter_add(1, index, w)
    share = w / W.gather(1, index) if normalize else w
    out = torch.zeros(B, n_out, C, dtype=torch.float64, device=x.device).scatter_add(
        1, index[..., None].expand(B, N, C), share[..., None] * x.double())
    return out, torch.zeros(B, n_out, dtype=torch.float64, device=x.device).scatter_add(1, index, s)


def _tail_map(B, N, S, tail, device):
    """An index map whose last ``tail`` outputs share most tokens (EViT: one fused token; BAT: clusters)."""
    index = _index_map(B, N, S, device)
    busy = torch.rand(B, N, device=device) < 0.6
    fill = S - tail + torch.randint(0, tail, (B, N), device=device)
    first = torch.zeros(B, S, dtype=torch.long, device=device).scatter_(  # keep one token on every output
        1, index, torch.arange(N, device=device).expand(B, N).contiguous())
    keep = torch.zeros(B, N, dtype=torch.bool, device=device).scatter_(1, first, True)
    return torch.where(busy & ~keep, fill, index)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("B,N,S,C,tail", [(2, 41, 12, 70, 1), (1, 70, 9, 130, 3), (2, 6, 1, 5, 1),
                                          (1, 90, 14, 40, 10)])  # BAT's 10 clusters: 16 padded rows
@pytest.mark.parametrize("size_attn,size_weight,normalize", [(True, False, True), (True, False, False),
                                                             (False, True, True), (True, True, False)])
def test_tail_rows_and_weight_options_match_the_formula(device, dtype, tol, B, N, S, C, tail, size_attn,
                                                        size_weight, normalize):
    x = torch.randn(B, N, C, device=device).to(dtype)
    x[:, ::5, ::3] = -0.0  # signed zeros of lone tokens must survive
    scores = torch.rand(B, N, device=device)
    size = torch.randint(1, 5, (B, N), device=device).float()
    index = _tail_map(B, N, S, tail, device)
    out, size_out, wsum = weighted_merge(x, scores, size, index, S, size_attn, size_weight=size_weight,
                                         normalize=normalize, tail=tail)
    want, want_size = _formula(x.float(), scores, size, index, S, size_attn, size_weight, normalize)
    torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol)
    torch.testing.assert_close(size_out.double(), want_size)
    if normalize:  # a lone token, in a gathered row or a tail row, is that token bit for bit
        counts = torch.zeros(B, S, device=device).scatter_add(1, index, torch.ones_like(scores))
        for b, d in (counts == 1).nonzero().tolist():
            i = (index[b] == d).nonzero().item()
            assert torch.equal(out[b, d].view(torch.int16 if dtype != torch.float32 else torch.int32),
                               x[b, i].view(torch.int16 if dtype != torch.float32 else torch.int32))


@pytest.mark.parametrize("size_attn,size_weight,normalize", [(True, False, True), (True, False, False),
                                                             (True, True, True), (False, True, False)])
def test_tail_rows_and_weight_options_gradients(device, size_attn, size_weight, normalize):
    B, N, S, C, tail = 2, 37, 10, 70, 2
    x = torch.randn(B, N, C, device=device, dtype=torch.float64, requires_grad=True)
    scores = torch.rand(B, N, device=device, dtype=torch.float64, requires_grad=True)
    size = (torch.rand(B, N, device=device, dtype=torch.float64) + 0.5).requires_grad_()
    index = _tail_map(B, N, S, tail, device)
    g, gs = torch.randn(B, S, C, device=device), torch.randn(B, S, device=device)
    want, want_size = _formula(x, scores, size, index, S, size_attn, size_weight, normalize)
    ((want * g).sum() + (want_size * gs).sum()).backward()
    xf, sf, zf = x.detach().float(), scores.detach().float(), size.detach().float()
    out, _, wsum = weighted_merge(xf, sf, zf, index, S, size_attn, size_weight=size_weight, normalize=normalize,
                                  tail=tail)
    gx, gsc, gz = weighted_merge_backward(g, gs, xf, out, index, wsum, sf, zf, size_attn, True, size_attn, True,
                                          size_weight=size_weight, normalize=normalize)
    torch.testing.assert_close(gx.double(), x.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gz.double(), size.grad, rtol=1e-4, atol=1e-4)
    if size_attn:
        torch.testing.assert_close(gsc.double(), scores.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_token_reaches_only_its_own_row_with_tail_rows(device, bad):
    B, N, S, C, tail = 1, 30, 8, 20, 2
    index = _tail_map(B, N, S, tail, device)
    scores = torch.rand(B, N, device=device)
    for victim in (0, int((index[0] >= S - tail).nonzero()[0])):  # a token of a gathered row, of a tail row
        x = torch.randn(B, N, C, device=device)
        x[0, victim, 3] = bad
        out, _, _ = weighted_merge(x, scores, None, index, S, True, size_weight=False, tail=tail)
        hit = ~torch.isfinite(out[0]).all(dim=1)
        assert hit.nonzero().flatten().tolist() == [int(index[0, victim])]


def test_tail_rows_need_an_index_map(device):
    x = torch.randn(1, 6, 4, device=device)
    plan = torch.zeros(1, 6 + 5 + 2, dtype=torch.long, device=device)
    with pytest.raises(ValueError, match="index map"):
        weighted_merge(x, None, None, plan, 5, False, tail=1)
