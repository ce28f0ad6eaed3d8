"""The compiled extension (csrc/) against the PyTorch reference, the specification.

Selection (top-k by float32 score, ties to the lower index) only compares the inputs, so the kept
set must match the reference exactly. Matching (cosine argmax) does arithmetic: where the best and
second-best kept candidates are closer than ``TIE_TOL`` a different summation order may pick the
other one, so there the test only requires a near-best candidate, and otherwise the exact index.
Outputs and gradients are compared with the reference's weighted merge evaluated on the same index
map (the reference's selection and matching are detached, so this is its exact gradient).

The C++ kernels run on CPU tensors; with a GPU and the CUDA extension built, the same tests run the
CUDA kernels. Skipped (with the reason) when the extension is not built, except under
``FASTPRUNE_REQUIRE_EXT=1`` (CI), where a missing extension is a failure.
"""
import os

import pytest
import torch

from fastprune import _ext
from fastprune.reference import (COSINE_EPS, compute_dtype, merge_weights, mstm_merge, topk_keep_mask,
                                 weighted_merge)

requires_ext = pytest.mark.skipif(
    not _ext.available(),
    reason=f"fastprune's C++ extension is not built ({_ext.load_error()}); "
           "build it with `pip install --no-build-isolation -e .`")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and _ext.cuda_available() else [])
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
#: (atol, rtol) of outputs and input gradients, per token dtype (the result is rounded to it).
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 1.6e-2),
       torch.float64: (1e-12, 1e-12)}
#: Cosine gaps below this may be resolved either way by a different summation order.
TIE_TOL = 1e-5
#: (B, N, C, p): tiny, odd/prime N, C not a power of two, several prefix tokens, ViT-S/16-like.
SHAPES = [(1, 7, 5, 0), (2, 13, 12, 1), (3, 31, 33, 5), (2, 197, 48, 1)]


def r_values(N, p):
    return sorted({1, (N - p) // 2, N - p - 1})


def test_extension_built_when_required():
    """CI builds the extension and sets FASTPRUNE_REQUIRE_EXT=1: then it must load."""
    if os.environ.get("FASTPRUNE_REQUIRE_EXT") != "1":
        pytest.skip("FASTPRUNE_REQUIRE_EXT is not 1: the extension is optional here")
    assert _ext.available(), f"FASTPRUNE_REQUIRE_EXT=1 but fastprune._C did not load: {_ext.load_error()}"
    assert hasattr(torch.ops.fastprune, "mstm_merge")


def test_import_reports_state():
    assert isinstance(_ext.available(), bool) and isinstance(_ext.cuda_available(), bool)
    assert (_ext.load_error() is None) == _ext.available()
    assert (_ext.cuda_load_error() is None) == _ext.cuda_available()


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def make_inputs(B, N, C, dtype, device, with_size=False, metric_dim=None, generator=None):
    x = torch.randn(B, N, C, generator=generator).to(device=device, dtype=dtype)
    scores = torch.rand(B, N, generator=generator).to(device)
    size = (torch.rand(B, N, generator=generator) * 3 + 0.5).to(device) if with_size else None
    metric = (torch.randn(B, N, metric_dim, generator=generator).to(device=device, dtype=torch.float16)
              if metric_dim else None)
    return x, scores, size, metric


def near_ties(metric, scores, r, p):
    """[B, N] bool: dropped tokens whose two best kept candidates are within TIE_TOL (float64)."""
    B, N = scores.shape
    keep = topk_keep_mask(scores.float(), N - p - r, p)
    cand = keep.clone()
    cand[:, :p] = False
    m = metric.double()
    m = m / m.norm(dim=-1, keepdim=True).clamp_min(COSINE_EPS)
    sim = (m @ m.transpose(1, 2)).masked_fill(~cand[:, None, :], float("-inf"))
    if int(cand.sum(1).min()) < 2:
        return torch.zeros(B, N, dtype=torch.bool, device=scores.device), sim, keep
    top2 = sim.topk(2, dim=-1).values
    return ((top2[..., 0] - top2[..., 1]) < TIE_TOL) & ~keep, sim, keep


def check_index(got_index, want_index, metric, scores, r, p):
    """Exact index map, except near-ties of the cosine argmax, which must pick a near-best token."""
    ties, sim, keep = near_ties(metric, scores, r, p)
    same = got_index == want_index
    assert bool(same[keep].all()), "kept tokens / prefix tokens map to the wrong slot"
    assert bool((same | ties).all()), f"index maps differ at {(~(same | ties)).nonzero().tolist()}"
    if bool(ties.any()):  # the chosen slot's token must be within TIE_TOL of the best similarity
        slots = torch.cumsum(keep.long(), 1) - 1
        for b, i in ties.nonzero().tolist():
            j = int(((slots[b] == got_index[b, i]) & keep[b]).nonzero()[0])
            assert sim[b, i, j] >= sim[b, i].max() - TIE_TOL


def expected(x, scores, size, r, p, weight, index):
    """Reference weighted merge on the given index map (its selection/matching are detached)."""
    B, N, _ = x.shape
    acc = compute_dtype(x)
    s = scores.to(acc)
    z = torch.ones(B, N, dtype=acc, device=x.device) if size is None else size.to(acc)
    w = merge_weights(s, z, weight)
    return weighted_merge(x, w, z, index, N - r)


# ---------------------------------------------------------------------------------------------
# fused MSTM merge: forward
# ---------------------------------------------------------------------------------------------

@requires_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,N,C,p", SHAPES)
@pytest.mark.parametrize("weight", ["size", "size_attn"])
@pytest.mark.parametrize("extras", [False, True], ids=["plain", "size+metric"])
def test_merge_forward_matches_reference(device, dtype, B, N, C, p, weight, extras):
    gen = torch.Generator().manual_seed(B * 1000 + N * 10 + p)
    x, scores, size, metric = make_inputs(B, N, C, dtype, device, with_size=extras,
                                          metric_dim=24 if extras else None, generator=gen)
    for r in r_values(N, p):
        got = _ext.mstm_merge_cpp(x, scores, r, size=size, metric=metric, num_prefix_tokens=p,
                                  weight=weight)
        want = mstm_merge(x, scores, r, size=size, metric=metric, num_prefix_tokens=p, weight=weight)
        assert got.x.shape == (B, N - r, C) and got.x.dtype == dtype
        assert got.size.shape == (B, N - r) and got.size.dtype == torch.float32
        assert got.index.shape == (B, N) and got.index.dtype == torch.int64
        check_index(got.index, want.index, x if metric is None else metric, scores, r, p)
        want_x, want_size = expected(x, scores, size, r, p, weight, got.index)
        atol, rtol = TOL[dtype]
        torch.testing.assert_close(got.x, want_x, atol=atol, rtol=rtol)
        torch.testing.assert_close(got.size, want_size, atol=1e-6, rtol=1e-6)
        if torch.equal(got.index, want.index):
            torch.testing.assert_close(got.x, want.x, atol=atol, rtol=rtol)
        # prefix tokens pass through, and a kept token that absorbs nothing is copied bit for bit
        assert torch.equal(got.x[:, :p], x[:, :p])
        counts = torch.zeros(B, N - r, dtype=torch.long, device=device).scatter_add_(
            1, got.index, torch.ones_like(got.index))
        keep = topk_keep_mask(scores, N - p - r, p)
        lone = keep & (counts.gather(1, (torch.cumsum(keep.long(), 1) - 1).clamp_min(0)) == 1)
        slots = torch.cumsum(keep.long(), 1) - 1
        for b in range(B):
            assert torch.equal(got.x[b, slots[b][lone[b]]], x[b, lone[b]])


@requires_ext
@pytest.mark.parametrize("device", DEVICES)
def test_merge_exact_ties(device):
    """Equal scores keep the lower index; equal similarities go to the lower index; zero metric
    rows (similarity 0 to everything) go to the first kept token. All sums here are exact."""
    B, N, p = 3, 23, 1
    gen = torch.Generator().manual_seed(1)
    scores = torch.randint(0, 3, (B, N), generator=gen).float()
    patterns = torch.tensor([[1, 1, 1, 1, 0, 0, 0, 0], [1, -1, 0, 0, 1, -1, 0, 0],
                             [0, 0, 1, 1, 0, 0, -1, 1], [0, 0, 0, 0, 0, 0, 0, 0]], dtype=torch.float32)
    metric = patterns[torch.randint(0, 4, (B, N), generator=gen)]  # norms 2 or 0: exact cosines
    x = torch.randn(B, N, 6, generator=gen)
    x, scores, metric = x.to(device), scores.to(device), metric.to(device)
    for r in (1, 7, 15, N - p - 1):
        got = _ext.mstm_merge_cpp(x, scores, r, metric=metric, num_prefix_tokens=p)
        want = mstm_merge(x, scores, r, metric=metric, num_prefix_tokens=p)
        assert torch.equal(got.index, want.index)
        torch.testing.assert_close(got.x, want.x, atol=1e-6, rtol=1e-6)
        assert torch.equal(got.size, want.size)


@requires_ext
def test_merge_nan_scores_rank_first():
    """NaN scores rank above every number, as torch.sort(descending=True) in the reference."""
    x = torch.randn(2, 11, 4)
    scores = torch.rand(2, 11)
    scores[0, 3] = float("nan")
    scores[1, 9] = float("nan")
    got = _ext.mstm_merge_cpp(x, scores, 6)
    want = mstm_merge(x, scores, 6)
    assert torch.equal(got.index, want.index)
    torch.testing.assert_close(got.x, want.x)


@requires_ext
def test_merge_half_precision_does_not_overflow():
    """fp16 tokens near the top of the range and tiny scores: fp32 accumulation, finite output."""
    x = torch.full((2, 9, 16), 60000.0, dtype=torch.float16)
    x[:, :, ::2] = -60000.0
    scores = torch.full((2, 9), 1e-30)
    for weight in ("size", "size_attn"):
        got = _ext.mstm_merge_cpp(x, scores, 7, num_prefix_tokens=1, weight=weight)
        assert torch.isfinite(got.x).all()
        torch.testing.assert_close(got.x.float(), x[:, :2].float())
        assert got.size.sum().item() == 18


@requires_ext
def test_merge_r_zero_and_float64():
    x = torch.randn(2, 10, 3, dtype=torch.float64)
    scores = torch.rand(2, 10, dtype=torch.float64)
    got = _ext.mstm_merge_cpp(x, scores, 0)
    assert torch.equal(got.x, x) and torch.equal(got.index, torch.arange(10).expand(2, 10))
    got = _ext.mstm_merge_cpp(x, scores, 4, weight="size_attn")
    want = mstm_merge(x, scores, 4, weight="size_attn")
    assert got.size.dtype == torch.float64 and torch.equal(got.index, want.index)
    torch.testing.assert_close(got.x, want.x, atol=1e-14, rtol=1e-14)


@requires_ext
def test_merge_input_errors():
    x = torch.randn(2, 9, 4)
    scores = torch.rand(2, 9)
    with pytest.raises(ValueError, match="r must satisfy"):
        _ext.mstm_merge_cpp(x, scores, 8)
    with pytest.raises(ValueError, match="weight"):
        _ext.mstm_merge_cpp(x, scores, 2, weight="attn")
    with pytest.raises(TypeError, match="x must be"):
        _ext.mstm_merge_cpp(x.long(), scores, 2)
    with pytest.raises(ValueError, match="scores must have shape"):
        _ext.mstm_merge_cpp(x, scores[:, :5], 2)
    with pytest.raises(ValueError, match="metric must have shape"):
        _ext.mstm_merge_cpp(x, scores, 2, metric=torch.randn(2, 8, 3))
    with pytest.raises(TypeError, match="num_prefix_tokens must be an int"):
        _ext.mstm_merge_cpp(x, scores, 2, num_prefix_tokens=1.0)
    # the operator itself checks too (C++ TORCH_CHECK_VALUE / TORCH_CHECK_TYPE)
    with pytest.raises(ValueError, match="r must satisfy"):
        torch.ops.fastprune.mstm_merge(x, scores, None, None, 9, 1, "size")
    with pytest.raises(TypeError, match="scores must be Float"):
        torch.ops.fastprune.mstm_merge(x, scores.double(), None, None, 2, 1, "size")
    with pytest.raises(ValueError, match="weight must be"):
        torch.ops.fastprune.mstm_merge(x, scores, None, None, 2, 1, "mean")


# ---------------------------------------------------------------------------------------------
# fused MSTM merge: backward
# ---------------------------------------------------------------------------------------------

def _loss_grads(fn, x, scores, size, gen_out, gen_size):
    x = x.detach().requires_grad_()
    scores = scores.detach().requires_grad_()
    size = size.detach().requires_grad_()
    out, size_out = fn(x, scores, size)
    loss = (out.float() * gen_out).sum() + (size_out * gen_size).sum()
    return torch.autograd.grad(loss, (x, scores, size), allow_unused=True, materialize_grads=True)


@requires_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,N,C,p", SHAPES[:3])
@pytest.mark.parametrize("weight", ["size", "size_attn"])
def test_merge_gradients_match_reference(device, dtype, B, N, C, p, weight):
    gen = torch.Generator().manual_seed(7 * N + p)
    x, scores, size, _ = make_inputs(B, N, C, dtype, device, with_size=True, generator=gen)
    for r in r_values(N, p):
        index = _ext.mstm_merge_cpp(x, scores, r, size=size, num_prefix_tokens=p).index
        g_out = torch.randn(B, N - r, C, generator=gen).to(device)
        g_size = torch.randn(B, N - r, generator=gen).to(device)

        def ours(x_, s_, z_):
            m = _ext.mstm_merge_cpp(x_, s_, r, size=z_, num_prefix_tokens=p, weight=weight)
            assert torch.equal(m.index, index)
            return m.x, m.size

        def ref(x_, s_, z_):  # the reference's differentiable part, in float64
            return expected(x_.double(), s_.double(), z_.double(), r, p, weight, index)

        got = _loss_grads(ours, x, scores, size, g_out, g_size)
        # autograd rounds the output gradient to the output dtype: do the same for the reference
        want = _loss_grads(ref, x, scores, size, g_out.to(dtype).double(), g_size.double())
        atol, rtol = TOL[dtype]
        torch.testing.assert_close(got[0], want[0].to(dtype), atol=atol, rtol=rtol)
        # score and size gradients: float32 sums over C products, against float64
        scale = float(want[1].abs().max() + want[2].abs().max() + 1)
        torch.testing.assert_close(got[1], want[1], atol=2e-6 * scale, rtol=1e-5)
        torch.testing.assert_close(got[2], want[2], atol=2e-6 * scale, rtol=1e-5)
        if weight == "size":
            assert not got[1].any()


@requires_ext
@pytest.mark.parametrize("weight", ["size", "size_attn"])
def test_merge_gradcheck(weight):
    B, N, C, p, r = 2, 9, 4, 1, 3
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(B, N, C, dtype=torch.float64, generator=gen, requires_grad=True)
    scores = (torch.rand(B, N, dtype=torch.float64, generator=gen) + 0.1).requires_grad_()
    size = (torch.rand(B, N, dtype=torch.float64, generator=gen) + 0.5).requires_grad_()
    metric = torch.randn(B, N, 5, generator=gen)  # fixed: perturbing x must not change the matching

    def fn(x_, s_, z_):
        m = _ext.mstm_merge_cpp(x_, s_, r, size=z_, metric=metric, num_prefix_tokens=p, weight=weight)
        return m.x, m.size

    assert torch.autograd.gradcheck(fn, (x, scores, size))


@requires_ext
def test_merge_backward_with_unused_outputs():
    x = torch.randn(2, 9, 4, requires_grad=True)
    scores = torch.rand(2, 9, requires_grad=True)
    m = _ext.mstm_merge_cpp(x, scores, 3, weight="size_attn")
    (m.x.sum() + m.size.sum()).backward()
    assert x.grad is not None and scores.grad is not None and scores.grad.abs().sum() > 0
    # only x's output is used: grad_size arrives as None / zeros
    x2 = x.detach().requires_grad_()
    gx, = torch.autograd.grad(_ext.mstm_merge_cpp(x2, scores.detach(), 3).x.sum(), x2)
    assert torch.isfinite(gx).all()


# ---------------------------------------------------------------------------------------------
# operator registration: schemas, fake kernels, autograd, tracing
# ---------------------------------------------------------------------------------------------

@requires_ext
def test_opcheck_merge():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 13, 12, generator=gen, requires_grad=True)
    scores = torch.rand(2, 13, generator=gen, requires_grad=True)
    size = (torch.rand(2, 13, generator=gen) + 0.5).requires_grad_()
    torch.library.opcheck(torch.ops.fastprune.mstm_merge.default, (x, scores, size, None, 4, 1, "size_attn"))
    xh = torch.randn(2, 13, 12, generator=gen).half().requires_grad_()
    metric = torch.randn(2, 13, 7, generator=gen)
    torch.library.opcheck(torch.ops.fastprune.mstm_merge.default, (xh, scores, None, metric, 6, 0, "size"))
    m = _ext.mstm_merge_cpp(x, scores, 4)
    torch.library.opcheck(torch.ops.fastprune.mstm_merge_backward.default,
                          (torch.randn_like(m.x), torch.randn_like(m.size), x.detach(), scores.detach(),
                           None, m.index, "size"))


@requires_ext
def test_compile_fullgraph_through_merge():
    """torch.compile sees through the operator (fake kernel + registered autograd), no graph break."""
    def block(x, scores, size):
        m = _ext.mstm_merge_cpp(x, scores, 5, size=size, weight="size_attn")
        return (m.x * 2).sum() + m.size.sum()

    x = torch.randn(2, 17, 8, requires_grad=True)
    scores = torch.rand(2, 17, requires_grad=True)
    size = torch.ones(2, 17, requires_grad=True)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(x, scores, size), (x, scores, size))
    want = torch.autograd.grad(block(x, scores, size), (x, scores, size))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
