"""The PyTorch reference of the MSTM merge and the front door's input checks."""
import pytest
import torch

import fastprune
from fastprune.reference import mstm_merge


def brute_force_merge(x, scores, r, size, metric, p):
    """An independent, loop-by-loop statement of MSTM for one image, to check the vectorised reference."""
    N = x.shape[0]
    others = sorted(range(p, N), key=lambda j: (-float(scores[j]), j))
    kept = sorted(others[:N - p - r])
    slot = {i: i for i in range(p)}
    slot.update({j: p + k for k, j in enumerate(kept)})
    m = metric.double()
    m = m / m.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    index = []
    for i in range(N):
        if i in slot:
            index.append(slot[i])
        else:
            best = max(kept, key=lambda j: (float(m[i] @ m[j]), -j))
            index.append(slot[best])
    out = torch.zeros(N - r, x.shape[1], dtype=torch.float64)
    total = torch.zeros(N - r, dtype=torch.float64)
    for i, d in enumerate(index):
        out[d] += size[i] * x[i].double()
        total[d] += size[i]
    return out / total[:, None], total, torch.tensor(index)


@pytest.mark.parametrize("N,p,r", [(7, 1, 3), (13, 0, 12), (13, 5, 7), (20, 1, 1)])
def test_reference_matches_brute_force(N, p, r):
    B, C = 2, 6
    x = torch.randn(B, N, C)
    scores = torch.rand(B, N)
    size = torch.randint(1, 4, (B, N)).float()
    metric = torch.randn(B, N, 5)
    got = mstm_merge(x, scores, r, size=size, metric=metric, num_prefix_tokens=p)
    for b in range(B):
        out, total, index = brute_force_merge(x[b], scores[b], r, size[b], metric[b], p)
        torch.testing.assert_close(got.x[b].double(), out, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got.size[b].double(), total)
        assert torch.equal(got.index[b], index)


def test_ties_go_to_lower_index():
    x = torch.randn(1, 6, 4)
    scores = torch.tensor([[0.0, 0.5, 0.5, 0.5, 0.1, 0.5]])
    got = mstm_merge(x, scores, 3, num_prefix_tokens=1)
    # four tokens tie at 0.5; the two kept are the lowest indices 1 and 2
    assert got.index[0, 1].item() == 1 and got.index[0, 2].item() == 2
    assert set(got.index[0].tolist()) == {0, 1, 2}


def test_prefix_and_lone_tokens_bit_identical():
    x = torch.randn(2, 17, 8, dtype=torch.float16)
    attn = torch.rand(2, 3, 17)
    size = torch.rand(2, 17) * 3 + 0.5
    m = fastprune.merge_tokens(x, attn, 6, size=size, num_prefix_tokens=2, weight="size_attn")
    assert torch.equal(m.x[:, :2], x[:, :2])
    for b in range(2):
        counts = torch.bincount(m.index[b], minlength=11)
        for d in range(11):
            if counts[d] == 1:
                src = (m.index[b] == d).nonzero().item()
                assert torch.equal(m.x[b, d], x[b, src])


def test_sizes_add_up_and_index_in_range():
    x = torch.randn(3, 50, 16)
    m = fastprune.merge_tokens(x, torch.rand(3, 50), 20)
    assert m.x.shape == (3, 30, 16)
    torch.testing.assert_close(m.size.sum(1), torch.full((3,), 50.0))
    assert m.index.min() >= 0 and m.index.max() < 30
    assert torch.equal(m.index[:, 0], torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("weight", ["size", "size_attn"])
def test_gradcheck_reference_float64(weight):
    B, N, C, p, r = 2, 9, 4, 1, 4
    x = torch.randn(B, N, C, dtype=torch.float64, requires_grad=True)
    scores = torch.rand(B, N, dtype=torch.float64, requires_grad=True)
    size = (torch.rand(B, N, dtype=torch.float64) + 0.5).requires_grad_()
    metric = torch.randn(B, N, 3, dtype=torch.float64)

    def f(x, scores, size):
        out = mstm_merge(x, scores, r, size=size, metric=metric, num_prefix_tokens=p, weight=weight)
        return out.x, out.size

    assert torch.autograd.gradcheck(f, (x, scores, size))


def test_r_zero_returns_input_unchanged():
    x = torch.randn(2, 10, 4)
    m = fastprune.merge_tokens(x, torch.rand(2, 10), 0)
    assert m.x is x
    assert fastprune.merge(x, torch.rand(2, 10), 0) is x
    assert torch.equal(m.index, torch.arange(10).expand(2, 10))


def test_attention_forms_agree():
    x = torch.randn(2, 12, 8)
    full = torch.rand(2, 3, 12, 12)
    a = fastprune.merge_tokens(x, full, 5)
    b = fastprune.merge_tokens(x, full[:, :, 0, :], 5)
    c = fastprune.merge_tokens(x, full[:, :, 0, :].mean(1), 5)
    assert torch.equal(a.index, b.index) and torch.equal(b.index, c.index)
    torch.testing.assert_close(a.x, c.x)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_large_values_do_not_overflow(dtype):
    x = (torch.randn(2, 30, 16) * 3e4).clamp(-6e4, 6e4).to(dtype)
    m = fastprune.merge_tokens(x, torch.rand(2, 30), 12, size=torch.full((2, 30), 100.0))
    assert torch.isfinite(m.x.float()).all()
    assert m.x.dtype == dtype


x0 = torch.randn(2, 10, 4)
a0 = torch.rand(2, 10)


@pytest.mark.parametrize("call,exc,words", [
    (lambda: fastprune.merge(x0[0], a0, 2), ValueError, "x must have shape [B, N, C]"),
    (lambda: fastprune.merge(x0.long(), a0, 2), TypeError, "x must be float32"),
    (lambda: fastprune.merge(x0.numpy(), a0, 2), TypeError, "x must be a torch.Tensor"),
    (lambda: fastprune.merge(x0, a0[:, :9], 2), ValueError, "attn must match"),
    (lambda: fastprune.merge(x0, a0[:1], 2), ValueError, "attn must match"),
    (lambda: fastprune.merge(x0, torch.rand(2, 3, 10, 9), 2), ValueError, "attn of rank 4"),
    (lambda: fastprune.merge(x0, torch.rand(2, 1, 1, 10, 10), 2), ValueError, "attn must have shape"),
    (lambda: fastprune.merge(x0, a0.long(), 2), TypeError, "attn must be a floating-point"),
    (lambda: fastprune.merge(x0, a0, 9), ValueError, "r must satisfy 0 <= r <= 8"),
    (lambda: fastprune.merge(x0, a0, -1), ValueError, "r must satisfy"),
    (lambda: fastprune.merge(x0, a0, 2.0), TypeError, "r must be an int"),
    (lambda: fastprune.merge(x0, a0, True), TypeError, "r must be an int"),
    (lambda: fastprune.merge(x0, a0, 5, num_prefix_tokens=5), ValueError, "r must satisfy 0 <= r <= 4"),
    (lambda: fastprune.merge(x0, a0, 1, num_prefix_tokens=10), ValueError, "num_prefix_tokens must satisfy"),
    (lambda: fastprune.merge(x0, a0, 2, size=torch.ones(2, 9)), ValueError, "size must have shape"),
    (lambda: fastprune.merge(x0, a0, 2, metric=torch.ones(2, 9, 3)), ValueError, "metric must have shape"),
    (lambda: fastprune.merge(x0, a0, 2, metric=torch.ones(2, 10, 3, dtype=torch.float64)), TypeError,
     "metric must be float32"),
    (lambda: fastprune.merge(x0, a0, 2, weight="attn"), ValueError, "weight must be"),
    (lambda: fastprune.merge(x0, a0, 2, backend="cuda-graph"), ValueError, "backend must be one of"),
])
def test_invalid_inputs_raise(call, exc, words):
    with pytest.raises(exc, match=None) as info:
        call()
    assert words in str(info.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device to mismatch")
def test_device_mismatch_raises():
    with pytest.raises(ValueError, match="same device"):
        fastprune.merge(x0.cuda(), a0, 2)


def test_device_mismatch_raises_meta():
    with pytest.raises(ValueError, match="attn is on meta"):
        fastprune.merge(x0, a0.to("meta"), 2)
