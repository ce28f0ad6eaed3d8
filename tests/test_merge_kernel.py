"""The fused Triton MSTM merge (kernels/merge.py) against the PyTorch reference (the specification).

Runs the kernels through the Triton interpreter on CPU (conftest sets TRITON_INTERPRET=1 when there is
no GPU) or compiled on CUDA. Shapes are tiny and awkward (odd, prime N; C not a power of two; B = 1, 2;
0, 1 or 5 prefix tokens; r = 1, a middle value and the maximum N - p - 1). Random data has no ties, so
the index map must match exactly; explicit tie cases check the lower-index rules.
"""
import pytest
import torch

from conftest import DEVICE
from fastprune import merge_tokens
from fastprune.kernels import match, select, weighted_merge
from fastprune.kernels import merge as merge_kernels
from fastprune.kernels.merge import mstm_merge_triton
from fastprune.reference import mstm_merge

#: (dtype, atol, rtol) of the merged tokens; sizes are float32 in both.
DTYPES = [(torch.float32, 1e-5, 1e-5), (torch.float16, 2e-3, 2e-3), (torch.bfloat16, 1.6e-2, 1.6e-2)]
#: (B, N, C, p, r): r = 1, a middle value, and the maximum N - p - 1.
SHAPES = [
    (1, 7, 5, 0, 1),
    (2, 7, 5, 0, 6),
    (2, 13, 24, 1, 6),
    (1, 13, 24, 5, 7),
    (2, 31, 40, 1, 29),
    (2, 31, 40, 5, 1),
    (1, 31, 24, 5, 12),
]


def _inputs(B, N, C, dtype, *, with_size, metric_dtype=None, Cm=None, device=DEVICE):
    x = torch.randn(B, N, C, device=device).to(dtype)
    scores = torch.rand(B, N, device=device)
    size = (torch.rand(B, N, device=device) * 3 + 0.5) if with_size else None
    metric = None
    if metric_dtype is not None:
        metric = torch.randn(B, N, Cm or C, device=device).to(metric_dtype)
    return x, scores, size, metric


def _assert_matches(got, want, atol, rtol):
    assert got.x.dtype == want.x.dtype and got.x.shape == want.x.shape
    assert got.index.dtype == torch.int64 and got.size.dtype == torch.float32
    assert torch.equal(got.index, want.index), f"index maps differ:\n{got.index}\n{want.index}"
    torch.testing.assert_close(got.x.float(), want.x.float(), atol=atol, rtol=rtol)
    torch.testing.assert_close(got.size, want.size, atol=1e-5, rtol=1e-6)


def _assert_untouched_tokens_bit_identical(x, got, p):
    """Prefix tokens and kept tokens that absorbed nothing are copied bit for bit."""
    B, N, _ = x.shape
    for b in range(B):
        counts = torch.bincount(got.index[b], minlength=got.x.shape[1])
        for i in range(N):
            d = int(got.index[b, i])
            if i < p:
                assert d == i
            if counts[d] == 1:
                assert torch.equal(got.x[b, d], x[b, i]), f"token {i} (slot {d}) of image {b} changed"


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES, ids=lambda v: str(v).replace("torch.", "") if
                         isinstance(v, torch.dtype) else None)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}N{}C{}p{}r{}".format(*s))
def test_forward_matches_reference(shape, dtype, atol, rtol):
    B, N, C, p, r = shape
    # vary the options across cases, deterministically: weights, given sizes, a separate metric
    # (of another dtype, with a channel count unlike C)
    k = SHAPES.index(shape)
    weight = ("size", "size_attn")[k % 2]
    metric_dtype = (None, torch.float16, torch.float32, torch.bfloat16)[k % 4]
    x, scores, size, metric = _inputs(B, N, C, dtype, with_size=k % 3 != 0, metric_dtype=metric_dtype, Cm=C + 3)
    got = mstm_merge_triton(x, scores, r, size=size, metric=metric, num_prefix_tokens=p, weight=weight)
    want = mstm_merge(x, scores, r, size=size, metric=metric, num_prefix_tokens=p, weight=weight)
    assert got.x.shape == (B, N - r, C)
    _assert_matches(got, want, atol, rtol)
    _assert_untouched_tokens_bit_identical(x, got, p)
    # every output token received at least its own kept token
    for b in range(B):
        assert torch.equal(torch.unique(got.index[b]), torch.arange(N - r, device=x.device))


@pytest.mark.parametrize("weight", ["size", "size_attn"])
@pytest.mark.parametrize("with_size", [False, True], ids=["ones", "sizes"])
@pytest.mark.parametrize("with_metric", [False, True], ids=["metric=x", "metric"])
def test_options_match_reference(weight, with_size, with_metric):
    x, scores, size, metric = _inputs(2, 13, 24, torch.float32, with_size=with_size,
                                      metric_dtype=torch.float32 if with_metric else None, Cm=7)
    got = mstm_merge_triton(x, scores, 4, size=size, metric=metric, num_prefix_tokens=1, weight=weight)
    want = mstm_merge(x, scores, 4, size=size, metric=metric, num_prefix_tokens=1, weight=weight)
    _assert_matches(got, want, 1e-5, 1e-5)
    if with_size:
        # sizes add up: the total number of patches is conserved
        torch.testing.assert_close(got.size.sum(1), size.sum(1), atol=1e-4, rtol=1e-5)


def test_several_tiles_in_every_loop():
    """N = 67, C = 40, Cm = 40: several token tiles, candidate tiles, input chunks, output tiles and
    channel tiles in both kernels (the tile sizes are 16 or 32)."""
    x, scores, size, metric = _inputs(1, 67, 40, torch.float16, with_size=True, metric_dtype=torch.float16, Cm=40)
    got = mstm_merge_triton(x, scores, 13, size=size, metric=metric, num_prefix_tokens=1, weight="size_attn")
    want = mstm_merge(x, scores, 13, size=size, metric=metric, num_prefix_tokens=1, weight="size_attn")
    _assert_matches(got, want, 2e-3, 2e-3)
    _assert_untouched_tokens_bit_identical(x, got, 1)


def test_non_contiguous_inputs():
    B, N, C = 2, 13, 24
    x = torch.randn(B, C, N, device=DEVICE).transpose(1, 2)  # [B, N, C] with channel stride N
    metric = torch.randn(B, N, 2 * 9, device=DEVICE)[..., ::2]  # [B, N, 9], channel stride 2
    scores = torch.rand(N, B, device=DEVICE).t()
    size = (torch.rand(B, N, 2, device=DEVICE) + 0.5)[..., 0]
    assert not (x.is_contiguous() or metric.is_contiguous() or scores.is_contiguous() or size.is_contiguous())
    got = mstm_merge_triton(x, scores, 5, size=size, metric=metric, num_prefix_tokens=1, weight="size_attn")
    want = mstm_merge(x, scores, 5, size=size, metric=metric, num_prefix_tokens=1, weight="size_attn")
    _assert_matches(got, want, 1e-5, 1e-5)
    _assert_untouched_tokens_bit_identical(x, got, 1)


def test_score_ties_go_to_lower_index():
    """Equal scores keep the lower index; -0.0 and +0.0 are equal scores."""
    x = torch.randn(1, 8, 5, device=DEVICE)
    scores = torch.tensor([[5.0, 0.5, 0.5, 0.5, 0.5, -0.0, 0.0, -0.0]], device=DEVICE)
    for r, kept in ((4, [0, 1, 2, 3]), (2, [0, 1, 2, 3, 4, 5]), (1, [0, 1, 2, 3, 4, 5, 6])):
        got = mstm_merge_triton(x, scores, r, num_prefix_tokens=1)
        want = mstm_merge(x, scores, r, num_prefix_tokens=1)
        assert torch.equal(got.index, want.index)
        # kept tokens occupy output slots 0, 1, ... in order; the others map to a kept slot
        assert got.index[0, :len(kept)].tolist() == list(range(len(kept)))


def test_cosine_ties_go_to_lower_index_and_never_to_prefix():
    """Sources equally similar to several kept tokens go to the lowest index; prefix never absorbs."""
    m = torch.tensor([[[1., 1., 1., -1.],   # prefix: identical to sources 4, 5, must not be chosen
                       [1., 1., 1., 1.],    # kept, slot 1
                       [1., 1., 1., -1.],   # kept, slot 2 (ties with 3)
                       [1., 1., 1., -1.],   # kept, slot 3
                       [1., 1., 1., -1.],   # source: sim 1 with tokens 2 and 3 -> 2
                       [1., 1., -1., -1.],  # source: sim 0.5 with tokens 2 and 3, 0 with 1 -> 2
                       [1., 1., 1., 1.]]],  # source: sim 1 with token 1 -> 1
                     device=DEVICE)
    scores = torch.tensor([[0.0, 0.9, 0.8, 0.7, 0.1, 0.2, 0.3]], device=DEVICE)
    x = torch.randn(1, 7, 6, device=DEVICE)
    got = mstm_merge_triton(x, scores, 3, metric=m, num_prefix_tokens=1)
    want = mstm_merge(x, scores, 3, metric=m, num_prefix_tokens=1)
    assert got.index.tolist() == [[0, 1, 2, 3, 2, 2, 1]]
    assert torch.equal(got.index, want.index)
    torch.testing.assert_close(got.x, want.x)


def test_negative_and_tiny_scores_clamped_in_weights():
    """size_attn weights use max(score, WEIGHT_EPS): negative scores still give a finite average."""
    x, scores, size, _ = _inputs(2, 13, 24, torch.float32, with_size=True)
    scores = scores - 0.5  # about half negative
    got = mstm_merge_triton(x, scores, 6, size=size, num_prefix_tokens=1, weight="size_attn")
    want = mstm_merge(x, scores, 6, size=size, num_prefix_tokens=1, weight="size_attn")
    assert torch.isfinite(got.x).all()
    _assert_matches(got, want, 1e-5, 1e-5)


def _assert_grad_close(got, want, atol, rtol):
    """Gradients agree up to ``atol`` relative to the largest reference gradient (the reference's own
    rounding leaves ~1e-7 x scale residues where the exact gradient is 0, e.g. for lone tokens'
    weights, and the kernel computes those exactly)."""
    scale = max(1.0, float(want.abs().max()))
    torch.testing.assert_close(got.float(), want.float(), atol=atol * scale, rtol=rtol)


#: (dtype, atol, rtol) for gradients: x grads are ``share * g`` (one rounding); weight grads use the
#: stored half-precision output for half inputs.
GRAD_DTYPES = [(torch.float32, 1e-5, 1e-4), (torch.float16, 2e-3, 5e-3), (torch.bfloat16, 3e-2, 3e-2)]


@pytest.mark.parametrize("dtype,atol,rtol", GRAD_DTYPES, ids=["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("weight", ["size", "size_attn"])
@pytest.mark.parametrize("shape", [(2, 13, 24, 1, 6), (1, 31, 40, 5, 25), (2, 7, 5, 0, 6)],
                         ids=lambda s: "B{}N{}C{}p{}r{}".format(*s))
def test_gradients_match_reference(shape, weight, dtype, atol, rtol):
    B, N, C, p, r = shape
    x0, scores0, size0, metric = _inputs(B, N, C, dtype, with_size=True, metric_dtype=torch.float32, Cm=6)
    metric.requires_grad_()
    grads = []
    for fn in (mstm_merge_triton, mstm_merge):
        x = x0.clone().requires_grad_()
        scores = scores0.clone().requires_grad_()
        size = size0.clone().requires_grad_()
        out = fn(x, scores, r, size=size, metric=metric, num_prefix_tokens=p, weight=weight)
        gen = torch.Generator(device=DEVICE).manual_seed(1)
        gx = torch.randn(out.x.shape, device=DEVICE, generator=gen)
        gs = torch.randn(out.size.shape, device=DEVICE, generator=gen)
        ((out.x.float() * gx).sum() + (out.size * gs).sum()).backward()
        assert not out.index.requires_grad
        grads.append((x.grad, scores.grad, size.grad))
    assert metric.grad is None, "matching is not differentiable: metric must get no gradient"
    (gx_t, gsc_t, gsz_t), (gx_r, gsc_r, gsz_r) = grads
    assert gx_t.dtype == dtype
    _assert_grad_close(gx_t, gx_r, atol, rtol)
    _assert_grad_close(gsz_t, gsz_r, atol, rtol)
    if weight == "size":
        assert gsc_t is None and gsc_r is None
    else:
        assert gsc_t is not None and gsc_t.abs().sum() > 0
        _assert_grad_close(gsc_t, gsc_r, atol, rtol)


def test_gradients_without_sizes_and_negative_scores():
    """Sizes of one (no size tensor): gradients reach x and scores; clamped scores get none."""
    x0, scores0, _, _ = _inputs(2, 13, 24, torch.float32, with_size=False)
    scores0 = scores0 - 0.3
    grads = []
    for fn in (mstm_merge_triton, mstm_merge):
        x = x0.clone().requires_grad_()
        scores = scores0.clone().requires_grad_()
        out = fn(x, scores, 6, num_prefix_tokens=1, weight="size_attn")
        gen = torch.Generator(device=DEVICE).manual_seed(2)
        (out.x * torch.randn(out.x.shape, device=DEVICE, generator=gen)).sum().backward()
        grads.append((x.grad, scores.grad))
    _assert_grad_close(grads[0][0], grads[1][0], 1e-5, 1e-4)
    _assert_grad_close(grads[0][1], grads[1][1], 1e-5, 1e-4)
    assert (grads[0][1][scores0 < 0] == 0).all()


def test_only_scores_require_grad():
    """Gradient to scores alone (x frozen), as when only the attention path is trained."""
    x, scores0, size, _ = _inputs(1, 13, 24, torch.float32, with_size=True)
    results = []
    for fn in (mstm_merge_triton, mstm_merge):
        scores = scores0.clone().requires_grad_()
        out = fn(x, scores, 5, size=size, num_prefix_tokens=1, weight="size_attn")
        out.x.square().sum().backward()
        results.append(scores.grad)
    _assert_grad_close(results[0], results[1], 1e-5, 1e-4)


def _count_launches(monkeypatch):
    """Count launches of the kernels MSTM may launch (interpreted or compiled)."""
    calls = []
    for module, name in ((select, "_select_topk_kernel"), (match, "_cosine_match_kernel"),
                         (merge_kernels, "_mstm_select_match_kernel"),
                         (weighted_merge, "_weighted_merge_kernel"), (weighted_merge, "_weighted_merge_backward_kernel")):
        kernel = getattr(module, name)
        original = kernel.run

        def run(*args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(kernel, "run", run)
    return calls


def test_two_launches_forward_one_backward(monkeypatch):
    """Forward: selection + matching in one launch (one program per image), then the gather merge."""
    calls = _count_launches(monkeypatch)
    x, scores, size, _ = _inputs(2, 13, 24, torch.float16, with_size=True)
    x.requires_grad_()
    scores.requires_grad_()
    out = mstm_merge_triton(x, scores, 5, size=size, weight="size_attn")
    assert calls == ["_mstm_select_match_kernel", "_weighted_merge_kernel"]
    out.x.float().sum().backward()
    assert calls[2:] == ["_weighted_merge_backward_kernel"]


def test_front_door_triton_backend():
    """fastprune.merge_tokens(backend="triton") reaches the kernels; head-wise attention is averaged."""
    x = torch.randn(2, 13, 24, device=DEVICE, dtype=torch.float16)
    attn = torch.rand(2, 3, 13, device=DEVICE)
    got = merge_tokens(x, attn, 4, backend="triton")
    want = merge_tokens(x, attn, 4, backend="reference")
    _assert_matches(got, want, 2e-3, 2e-3)


def test_bad_arguments():
    x = torch.randn(1, 7, 5)
    scores = torch.rand(1, 7)
    with pytest.raises(ValueError, match="weight"):
        mstm_merge_triton(x, scores, 2, weight="attn")


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="CUDA"):
        mstm_merge_triton(torch.randn(1, 7, 5), torch.rand(1, 7), 2)
