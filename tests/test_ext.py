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

    check_compiles(block)


def check_compiles(block):
    """block(x [2, 17, 8], scores [2, 17], size [2, 17]) -> loss: compiled (fullgraph) = eager, grads too."""
    gen = torch.Generator().manual_seed(2)
    inputs = (torch.randn(2, 17, 8, generator=gen).requires_grad_(),
              torch.rand(2, 17, generator=gen).requires_grad_(), torch.ones(2, 17, requires_grad=True))
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(*inputs), inputs)
    want = torch.autograd.grad(block(*inputs), inputs)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


# ---------------------------------------------------------------------------------------------
# the shared weighted merge (torch.ops.fastprune.weighted_merge), used by MSTM, ToMe and BAT
# ---------------------------------------------------------------------------------------------

def random_index(B, N, n_out, gen):
    """An index map onto n_out outputs where every output receives at least one token."""
    index = torch.randint(0, n_out, (B, N), generator=gen)
    index[:, :n_out] = torch.stack([torch.randperm(n_out, generator=gen) for _ in range(B)])
    return index


@requires_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("B,N,C,n_out", [(1, 1, 1, 1), (2, 7, 5, 3), (3, 31, 33, 17), (2, 197, 48, 184)])
def test_weighted_merge_equals_reference(device, dtype, B, N, C, n_out):
    """Bit for bit on CPU (the same sums in the same order as the reference's scatter_add)."""
    gen = torch.Generator().manual_seed(N * 7 + n_out)
    x = torch.randn(B, N, C, generator=gen).to(device=device, dtype=dtype)
    acc = compute_dtype(x)
    w = (torch.rand(B, N, generator=gen) + 0.1).to(device=device, dtype=acc)
    size = (torch.rand(B, N, generator=gen) * 3 + 0.5).to(device=device, dtype=acc)
    index = random_index(B, N, n_out, gen).to(device)
    got = _ext.weighted_merge_cpp(x, w, size, index, n_out)
    want = weighted_merge(x, w, size, index, n_out)
    if device == "cpu":
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    else:
        atol, rtol = TOL[dtype]
        torch.testing.assert_close(got[0], want[0], atol=atol, rtol=rtol)
        torch.testing.assert_close(got[1], want[1])


@requires_ext
def test_weighted_merge_copies_a_lone_token_bit_for_bit_on_cpu():
    """A row that absorbs nothing is its token's bytes (-0.0 stays -0.0), not a sum started at +0.0."""
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(2, 10, 8, generator=gen)
    x[:, :, ::2] = -0.0
    index = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 6, 0, 6], [0, 1, 2, 3, 4, 5, 6, 0, 1, 6]])
    w = torch.rand(2, 10, generator=gen) + 0.1
    out, _ = _ext.weighted_merge_cpp(x, w, torch.ones_like(w), index, 7)
    for b, d, i in ((0, 1, 1), (0, 5, 5), (1, 3, 3), (1, 4, 4)):
        assert torch.equal(out[b, d].view(torch.int32), x[b, i].view(torch.int32))


@requires_ext
@pytest.mark.parametrize("device", DEVICES)
def test_weighted_merge_contains_nan_and_copies_lone_tokens(device):
    gen = torch.Generator().manual_seed(5)
    B, N, C, n_out = 2, 12, 6, 7
    x = torch.randn(B, N, C, generator=gen).to(device)
    x[0, 9, 2] = float("nan")
    x[1, 3] = float("inf")
    w = torch.rand(B, N, generator=gen).to(device) + 0.1
    index = random_index(B, N, n_out, gen).to(device)
    out, _ = _ext.weighted_merge_cpp(x, w, torch.ones_like(w), index, n_out)
    bad = torch.zeros(B, n_out, dtype=torch.bool, device=device)
    bad[0, index[0, 9]] = True
    bad[1, index[1, 3]] = True
    assert bool(torch.isfinite(out[~bad]).all()), "a NaN / inf reached rows it is not merged into"
    assert bool(torch.isnan(out[0, index[0, 9], 2])) and not bool(torch.isfinite(out[1, index[1, 3]]).all())
    counts = torch.zeros(B, n_out, dtype=torch.long, device=device).scatter_add_(1, index, torch.ones_like(index))
    for b in range(B):
        for d in (counts[b] == 1).nonzero().flatten().tolist():
            i = int((index[b] == d).nonzero()[0])
            assert torch.equal(out[b, d], x[b, i]) or not bool(torch.isfinite(x[b, i]).all())


@requires_ext
def test_weighted_merge_is_deterministic_across_threads():
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(4, 197, 64, generator=gen)
    w = torch.rand(4, 197, generator=gen)
    index = random_index(4, 197, 60, gen)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _ext.weighted_merge_cpp(x, w, w, index, 60)
        torch.set_num_threads(max(2, threads))
        many = _ext.weighted_merge_cpp(x, w, w, index, 60)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])


@requires_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_weighted_merge_gradients(dtype):
    gen = torch.Generator().manual_seed(11)
    B, N, C, n_out = 2, 13, 12, 6
    x = torch.randn(B, N, C, generator=gen).to(dtype)
    w = torch.rand(B, N, generator=gen) + 0.1
    size = torch.rand(B, N, generator=gen) + 0.5
    index = random_index(B, N, n_out, gen)
    g_out, g_size = torch.randn(B, n_out, C, generator=gen), torch.randn(B, n_out, generator=gen)

    def grads(fn, cast):
        xs, ws, zs = (t.detach().to(cast(t)).requires_grad_() for t in (x, w, size))
        out, size_out = fn(xs, ws, zs)
        loss = (out.double() * g_out.to(dtype).double()).sum() + (size_out.double() * g_size.double()).sum()
        return torch.autograd.grad(loss, (xs, ws, zs))

    got = grads(lambda a, b, c: _ext.weighted_merge_cpp(a, b, c, index, n_out), lambda t: t.dtype)
    want = grads(lambda a, b, c: weighted_merge(a, b, c, index, n_out), lambda t: torch.float64)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got[0], want[0].to(dtype), atol=atol, rtol=rtol)
    torch.testing.assert_close(got[1].double(), want[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[2].double(), want[2], atol=1e-6, rtol=1e-6)
    x64 = torch.randn(B, N, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    w64 = (torch.rand(B, N, dtype=torch.float64, generator=gen) + 0.1).requires_grad_()
    z64 = (torch.rand(B, N, dtype=torch.float64, generator=gen) + 0.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b, c: _ext.weighted_merge_cpp(a, b, c, index, n_out), (x64, w64, z64))


@requires_ext
def test_weighted_merge_input_errors():
    x, w = torch.randn(2, 5, 3), torch.rand(2, 5)
    index = torch.tensor([[0, 1, 2, 0, 1]] * 2)
    with pytest.raises(ValueError, match="index values must lie in"):
        _ext.weighted_merge_cpp(x, w, w, index, 2)
    with pytest.raises(ValueError, match="n_out must satisfy"):
        _ext.weighted_merge_cpp(x, w, w, index, 6)
    with pytest.raises(TypeError, match="index must be int64"):
        _ext.weighted_merge_cpp(x, w, w, index.int(), 3)
    with pytest.raises(ValueError, match="w must have shape"):
        _ext.weighted_merge_cpp(x, w[:, :4], w, index, 3)
    with pytest.raises(ValueError, match="index values must lie in"):
        torch.ops.fastprune.weighted_merge_backward(torch.randn(2, 3, 3), torch.randn(2, 3), x, w, index - 1)


# ---------------------------------------------------------------------------------------------
# ToMe and BAT on the C++ CPU path: equal to their references (index maps, tokens, sizes)
# ---------------------------------------------------------------------------------------------

from fastprune import backends as _backends  # noqa: E402
from fastprune.bat import bat_plan, bat_reference, bat_tokens  # noqa: E402
from fastprune.tome import bipartite_soft_matching, tome_merge_reference, tome_merge_tokens  # noqa: E402

TOME_SHAPES = [(1, 2, 3, 0), (2, 7, 5, 0), (2, 13, 12, 1), (3, 31, 33, 2), (2, 30, 16, 3), (2, 197, 48, 1)]


def assert_same_merge(got, want):
    assert got.x.dtype == want.x.dtype and got.x.shape == want.x.shape
    assert torch.equal(got.index, want.index), "index maps differ"
    torch.testing.assert_close(got.x, want.x, atol=0, rtol=0, equal_nan=True)  # bit for bit
    assert got.size.dtype == want.size.dtype and torch.equal(got.size, want.size)


@requires_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,N,C,p", TOME_SHAPES)
@pytest.mark.parametrize("extras", [False, True], ids=["plain", "size+metric"])
def test_tome_cpp_equals_reference(dtype, B, N, C, p, extras):
    gen = torch.Generator().manual_seed(N * 31 + p)
    x, _, size, metric = make_inputs(B, N, C, dtype, "cpu", with_size=extras, metric_dim=24 if extras else None,
                                     generator=gen)
    for r in sorted({0, 1, (N - p) // 2, N}):  # N: clipped to (N - p) // 2
        got = tome_merge_tokens(x, r, metric=metric, size=size, num_prefix_tokens=p, backend="cpp")
        want = tome_merge_tokens(x, r, metric=metric, size=size, num_prefix_tokens=p, backend="reference")
        assert_same_merge(got, want)
        assert torch.equal(got.x[:, :p], x[:, :p])


@requires_ext
def test_tome_cpp_is_the_auto_backend_on_cpu_and_matches_the_op():
    x = torch.randn(2, 10, 4)
    assert _backends.resolve_backend("auto", x, _backends.CPU_CPP_BACKENDS) == "cpp"
    m = tome_merge_tokens(x, 3)
    assert torch.equal(m.index, torch.ops.fastprune.tome_match(x, 3, 1))
    assert_same_merge(m, tome_merge_tokens(x, 3, backend="reference"))


@requires_ext
def test_tome_cpp_exact_ties_and_zero_rows():
    """Equal similarities everywhere (repeated and zero metric rows): ties go to the lower index."""
    gen = torch.Generator().manual_seed(2)
    patterns = torch.tensor([[1.0, 1, 0, 0], [0, 0, 2, 2], [0, 0, 0, 0], [1, -1, 0, 0]])
    metric = patterns[torch.randint(0, 4, (3, 25), generator=gen)]
    x = torch.randn(3, 25, 6, generator=gen)
    for p in (0, 1, 2):
        for r in (1, 5, (25 - p) // 2):
            assert_same_merge(tome_merge_tokens(x, r, metric=metric, num_prefix_tokens=p, backend="cpp"),
                              tome_merge_reference(x, r, metric=metric, num_prefix_tokens=p)._replace(
                                  size=tome_merge_reference(x, r, metric=metric, num_prefix_tokens=p).size.float()))


@requires_ext
@pytest.mark.parametrize("N", [3, 18, 33, 34, 35, 66, 67, 197])
def test_tome_cpp_index_equals_reference_across_lane_blocks(N):
    """The C++ best-partner search (a vectorised maximum in blocks of 16 candidates, then the first
    element equal to it) keeps the reference's argmax for rows of every length around the blocks:
    many exact ties (a three-valued metric), rows of zeros (similarity 0), a row of +inf similarities
    and one with a NaN metric (both take the sequential scan)."""
    gen = torch.Generator().manual_seed(N)
    metric = torch.randint(-1, 2, (4, N, 3), generator=gen).float()
    metric[1, ::3] = 0.0
    metric[2, 1] = float("inf")
    metric[3, N // 2] = float("nan")
    for p in (0, 1):
        r = max(1, (N - p) // 3)
        assert torch.equal(torch.ops.fastprune.tome_match(metric, r, p),
                           bipartite_soft_matching(metric, r, num_prefix_tokens=p).index), (N, p)


@requires_ext
def test_tome_cpp_nan_stays_in_its_rows():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 17, 8, generator=gen)
    metric = torch.randn(2, 17, 5, generator=gen)
    x[0, 4, 1] = float("nan")
    got = tome_merge_tokens(x, 6, metric=metric, backend="cpp")
    want = tome_merge_tokens(x, 6, metric=metric, backend="reference")
    assert torch.equal(got.index, want.index)
    torch.testing.assert_close(got.x, want.x, equal_nan=True, atol=0, rtol=0)
    nan_rows = torch.isnan(got.x).any(-1)
    assert nan_rows.sum() == 1 and bool(nan_rows[0, got.index[0, 4]])
    # a NaN in the metric changes the matching only: NaN similarities rank first, as argmax / sort
    metric[1, 6] = float("nan")
    assert_same_merge(tome_merge_tokens(x, 6, metric=metric, backend="cpp"),
                      tome_merge_tokens(x, 6, metric=metric, backend="reference"))


@requires_ext
def test_tome_cpp_is_deterministic_across_threads():
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(4, 197, 64, generator=gen)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = tome_merge_tokens(x, 13, backend="cpp")
        torch.set_num_threads(max(2, threads))
        many = tome_merge_tokens(x, 13, backend="cpp")
    finally:
        torch.set_num_threads(threads)
    assert_same_merge(one, many)


@requires_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_size", [False, True])
def test_tome_cpp_gradients_match_reference(dtype, with_size):
    """C++ backward of the weighted merge (w = size) against autograd of the reference."""
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(2, 21, 10, generator=gen).to(dtype)
    metric = torch.randn(2, 21, 6, generator=gen)
    size = torch.rand(2, 21, generator=gen) + 0.5
    g = torch.randn(2, 21 - 7, 10, generator=gen).to(dtype)
    g_size = torch.randn(2, 21 - 7, generator=gen)
    grads = {}
    for backend in ("cpp", "reference"):
        xb = x.clone().requires_grad_()
        sb = size.clone().requires_grad_() if with_size else None
        out = tome_merge_tokens(xb, 7, metric=metric, size=sb, backend=backend)
        loss = (out.x.float() * g.float()).sum() + (out.size * g_size).sum()
        grads[backend] = torch.autograd.grad(loss, [xb] + ([sb] if with_size else []))
    atol, rtol = TOL[dtype]
    for got, want in zip(grads["cpp"], grads["reference"]):
        torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
    x64 = torch.randn(1, 9, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    z64 = (torch.rand(1, 9, dtype=torch.float64, generator=gen) + 0.5).requires_grad_()
    m64 = torch.randn(1, 9, 4, generator=gen)
    assert torch.autograd.gradcheck(lambda a, z: _ext.tome_merge_cpp(a, 3, size=z, metric=m64)[:2], (x64, z64))


@requires_ext
def test_tome_cpp_refuses_bad_arguments():
    x = torch.randn(2, 10, 4)
    with pytest.raises(ValueError, match="r must satisfy"):
        torch.ops.fastprune.tome_match(x, 5, 1)
    with pytest.raises(ValueError, match="num_prefix_tokens must satisfy"):
        torch.ops.fastprune.tome_match(x, 1, 10)
    with pytest.raises(TypeError, match="metric must be"):
        torch.ops.fastprune.tome_match(x.long(), 1, 1)
    with pytest.raises(ValueError, match="backend must be one of"):
        tome_merge_tokens(x, 2, backend="cuda")
    with pytest.raises(ValueError, match="CPU tensors only"):
        _backends.resolve_backend("cpp", x.to("meta"), _backends.CPU_CPP_BACKENDS)


BAT_CASES = [  # (B, N, C, p, keep_rate, num_clusters, num_pairs, k)
    (1, 5, 3, 0, 0.5, 2, None, 1), (2, 13, 12, 1, 0.5, 3, None, 2), (2, 13, 12, 1, 0.25, 10, 2, 5),
    (3, 31, 33, 2, 0.7, 4, 6, 3), (2, 30, 16, 3, 0.01, 5, None, 5), (2, 10, 4, 1, 1.0, 10, 2, 5),
    (2, 197, 48, 1, 0.7, 10, None, 5),
]


@requires_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,N,C,p,rate,c,pairs,k", BAT_CASES)
@pytest.mark.parametrize("extras", [False, True], ids=["plain", "size+metric"])
def test_bat_cpp_equals_reference(dtype, B, N, C, p, rate, c, pairs, k, extras):
    gen = torch.Generator().manual_seed(N * 13 + p)
    x, scores, size, metric = make_inputs(B, N, C, dtype, "cpu", with_size=extras,
                                          metric_dim=24 if extras else None, generator=gen)
    attn = scores.softmax(-1)
    kw = dict(size=size, metric=metric, num_prefix_tokens=p, num_clusters=c, num_pairs=pairs, k=k)
    got = bat_tokens(x, attn, rate, backend="cpp", **kw)
    want = bat_tokens(x, attn, rate, backend="reference", **kw)
    assert got.x.shape[1] == bat_plan(N, p, rate, c, pairs, k).output_tokens(p)
    assert_same_merge(got, want)


@requires_ext
def test_bat_cpp_is_the_auto_backend_on_cpu():
    gen = torch.Generator().manual_seed(3)
    x, attn = torch.randn(2, 17, 8, generator=gen), torch.rand(2, 17, generator=gen)
    counts = bat_plan(17, 1, 0.5, 4, None, 2)
    got = bat_tokens(x, attn, 0.5, num_clusters=4, k=2)
    assert torch.equal(got.index, torch.ops.fastprune.bat_index(attn, x, *counts, 1))
    assert_same_merge(got, bat_reference(x, attn, 0.5, num_clusters=4, k=2))


@requires_ext
def test_bat_cpp_exact_ties():
    """Duplicated tokens on an exact grid: equal similarities, distances and densities everywhere."""
    gen = torch.Generator().manual_seed(12)
    grid = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [0.0, 0.0]])
    metric = grid[torch.randint(0, 4, (3, 29), generator=gen)]
    scores = torch.randint(0, 3, (3, 29), generator=gen).float()
    x = torch.randn(3, 29, 5, generator=gen)
    for rate, c, k in ((0.5, 4, 3), (0.3, 6, 1), (0.8, 2, 5)):
        assert_same_merge(bat_tokens(x, scores, rate, metric=metric, num_clusters=c, k=k, backend="cpp"),
                          bat_reference(x, scores, rate, metric=metric, num_clusters=c, k=k))
    same = torch.ones(3, 29, 3)
    assert_same_merge(bat_tokens(x, scores, 0.5, metric=same, backend="cpp"),
                      bat_reference(x, scores, 0.5, metric=same))


@requires_ext
def test_bat_cpp_nan_stays_in_its_rows_and_nan_metric_ranks_like_the_reference():
    gen = torch.Generator().manual_seed(13)
    x, attn = torch.randn(2, 21, 6, generator=gen), torch.rand(2, 21, generator=gen)
    metric = torch.randn(2, 21, 4, generator=gen)
    x[1, 7, 0] = float("nan")
    got = bat_tokens(x, attn, 0.5, metric=metric, num_clusters=3, backend="cpp")
    want = bat_reference(x, attn, 0.5, metric=metric, num_clusters=3)
    assert torch.equal(got.index, want.index)
    torch.testing.assert_close(got.x, want.x, equal_nan=True, atol=0, rtol=0)
    nan_rows = torch.isnan(got.x).any(-1)
    assert nan_rows.sum() == 1 and bool(nan_rows[1, got.index[1, 7]])
    metric[0, 3] = float("nan")
    metric[1, 12] = float("inf")
    attn[0, 5] = float("nan")
    got = bat_tokens(x, attn, 0.5, metric=metric, num_clusters=3, backend="cpp")
    want = bat_reference(x, attn, 0.5, metric=metric, num_clusters=3)
    assert torch.equal(got.index, want.index)
    torch.testing.assert_close(got.x, want.x, equal_nan=True, atol=0, rtol=0)


@requires_ext
def test_bat_cpp_is_deterministic_across_threads():
    gen = torch.Generator().manual_seed(14)
    x, attn = torch.randn(4, 197, 64, generator=gen), torch.rand(4, 197, generator=gen)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = bat_tokens(x, attn, 0.7, backend="cpp")
        torch.set_num_threads(max(2, threads))
        many = bat_tokens(x, attn, 0.7, backend="cpp")
    finally:
        torch.set_num_threads(threads)
    assert_same_merge(one, many)


@requires_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bat_cpp_gradients_match_reference(dtype):
    """C++ backward of the weighted merge, autograd of w = size x max(a, eps), against the reference."""
    gen = torch.Generator().manual_seed(15)
    x = torch.randn(2, 23, 10, generator=gen).to(dtype)
    attn = torch.rand(2, 23, generator=gen).softmax(-1)
    size = torch.rand(2, 23, generator=gen) + 0.5
    metric = torch.randn(2, 23, 6, generator=gen)
    grads = {}
    for backend in ("cpp", "reference"):
        xb, ab, sb = (t.clone().requires_grad_() for t in (x, attn, size))
        out = bat_tokens(xb, ab, 0.5, size=sb, metric=metric, num_clusters=4, k=3, backend=backend)
        g = torch.randn(out.x.shape, generator=torch.Generator().manual_seed(0)).to(dtype)
        loss = (out.x.float() * g.float()).sum() + (out.size * torch.arange(out.size.shape[1])).sum()
        grads[backend] = torch.autograd.grad(loss, (xb, ab, sb))
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(grads["cpp"][0], grads["reference"][0], atol=atol, rtol=rtol)
    scale = float(grads["reference"][1].abs().max()) + 1
    torch.testing.assert_close(grads["cpp"][1], grads["reference"][1], atol=1e-5 * scale, rtol=1e-4)
    torch.testing.assert_close(grads["cpp"][2], grads["reference"][2], atol=1e-5, rtol=1e-4)
    x64 = torch.randn(1, 10, 2, dtype=torch.float64, generator=gen, requires_grad=True)
    s64 = torch.rand(1, 10, dtype=torch.float64, generator=gen).softmax(-1).requires_grad_()
    m64 = torch.randn(1, 10, 4, dtype=torch.float64, generator=gen)
    counts = bat_plan(10, 1, 0.5, 3, None, 2)
    assert torch.autograd.gradcheck(lambda a, s: _ext.bat_merge_cpp(a, s, counts, metric=m64).x, (x64, s64))


@requires_ext
def test_bat_cpp_refuses_bad_arguments():
    s, m = torch.rand(2, 10), torch.randn(2, 10, 3)
    with pytest.raises(ValueError, match="K must satisfy"):
        torch.ops.fastprune.bat_index(s, m, 10, 0, 0, 0, 1)
    with pytest.raises(ValueError, match="r must satisfy"):
        torch.ops.fastprune.bat_index(s, m, 4, 3, 2, 1, 1)
    with pytest.raises(ValueError, match="c must satisfy"):
        torch.ops.fastprune.bat_index(s, m, 4, 1, 0, 1, 1)
    with pytest.raises(TypeError, match="scores must be float32 or float64"):
        torch.ops.fastprune.bat_index(s.half(), m, 4, 1, 2, 1, 1)
    with pytest.raises(ValueError, match="metric must have shape"):
        torch.ops.fastprune.bat_index(s, m[:, :9], 4, 1, 2, 1, 1)


@requires_ext
def test_opcheck_shared_and_method_ops():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 13, 12, generator=gen, requires_grad=True)
    w = (torch.rand(2, 13, generator=gen) + 0.1).requires_grad_()
    size = (torch.rand(2, 13, generator=gen) + 0.5).requires_grad_()
    index = random_index(2, 13, 5, gen)
    torch.library.opcheck(torch.ops.fastprune.weighted_merge.default, (x, w, size, index, 5))
    torch.library.opcheck(torch.ops.fastprune.weighted_merge_backward.default,
                          (torch.randn(2, 5, 12), torch.randn(2, 5), x.detach(), w.detach(), index))
    torch.library.opcheck(torch.ops.fastprune.tome_match.default, (x.detach(), 4, 1))
    torch.library.opcheck(torch.ops.fastprune.bat_index.default, (w.detach(), x.detach(), 6, 2, 3, 2, 1))


@requires_ext
def test_compile_fullgraph_through_tome_and_bat_cpp():
    def block(x, attn, size):
        t = tome_merge_tokens(x, 4, size=size, backend="cpp")
        b = bat_tokens(x, attn, 0.5, size=size, num_clusters=3, k=2, backend="cpp")
        return (t.x * 2).sum() + t.size.sum() + b.x.sum() + b.size.sum()

    check_compiles(block)
