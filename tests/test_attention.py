"""fastprune.attention: class attention from the class query only, and proportional attention on SDPA.

Everything is checked against the explicit formulas computed here in float64 with the full
``[B, H, N, N]`` map: ``softmax(q k^T * scale + log s)``.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from fastprune.attention import PROP_ATTN_IMPLS, cls_attention, default_prop_attn_impl, proportional_attention

# (dtype, atol, rtol) for results compared with the float64 formula.
DTYPES = [(torch.float32, 1e-5, 1e-4), (torch.float16, 2e-3, 1e-2), (torch.bfloat16, 1e-2, 5e-2)]
# (B, H, N, d): awkward shapes -- a single token, a prime count, a DeiT-like 197 with a small head.
SHAPES = [(1, 1, 1, 4), (2, 3, 7, 5), (3, 2, 197, 8)]


def explicit_logits(q, k, scale, size=None):
    """Full ``[B, H, N, N]`` logits in float64: ``q k^T * scale (+ log s_j)``."""
    logits = (q.double() @ k.double().transpose(-2, -1)) * scale
    if size is not None:
        logits = logits + size.double().log()[:, None, None, :]
    return logits


def random_size(B, N):
    return torch.randint(1, 9, (B, N)).float()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("with_size", [False, True])
def test_cls_attention_softmax_is_row0_of_the_attention_map(shape, dtype, atol, rtol, with_size):
    B, H, N, d = shape
    q, k = torch.randn(B, H, N, d).to(dtype), torch.randn(B, H, N, d).to(dtype)
    size = random_size(B, N) if with_size else None
    scale = d ** -0.5
    expected = explicit_logits(q, k, scale, size).softmax(dim=-1)[:, :, 0, :].mean(dim=1)
    got = cls_attention(q, k, size=size)
    assert got.dtype == torch.float32 and got.shape == (B, N)
    torch.testing.assert_close(got.double(), expected, atol=atol, rtol=rtol)
    torch.testing.assert_close(got.sum(dim=1), torch.ones(B), atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("with_size", [False, True])
def test_cls_attention_logit_form(dtype, atol, rtol, with_size):
    B, H, N, d = 2, 3, 11, 6
    q, k = torch.randn(B, H, N, d).to(dtype), torch.randn(B, H, N, d).to(dtype)
    size = random_size(B, N) if with_size else None
    expected = explicit_logits(q, k, 0.3, size)[:, :, 0, :].mean(dim=1)
    got = cls_attention(q, k, scale=0.3, size=size, form="logit")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, atol=atol * 4, rtol=rtol)


def test_cls_attention_reads_only_the_class_query():
    q, k = torch.randn(2, 3, 9, 4), torch.randn(2, 3, 9, 4)
    full = cls_attention(q, k)
    torch.testing.assert_close(cls_attention(q[:, :, :1], k), full)  # class query alone
    q2 = q.clone()
    q2[:, :, 1:] = 1e4  # other queries do not matter
    torch.testing.assert_close(cls_attention(q2, k), full)


def test_cls_attention_half_precision_does_not_overflow():
    # q . k = 64 * 60 * 60 = 230400 > 65504 (fp16 max): must be computed in float32.
    q = torch.full((1, 2, 5, 64), 60.0, dtype=torch.float16)
    k = torch.full((1, 2, 5, 64), 60.0, dtype=torch.float16)
    k[:, :, 2] = -60.0
    for form in ("softmax", "logit"):
        a = cls_attention(q, k, scale=1.0, form=form)
        assert torch.isfinite(a).all()
    a = cls_attention(q, k, scale=1.0)
    torch.testing.assert_close(a[0], torch.tensor([0.25, 0.25, 0.0, 0.25, 0.25]))


def test_cls_attention_gradients_match_the_explicit_formula():
    B, H, N, d = 2, 2, 6, 4
    q = torch.randn(B, H, N, d, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, H, N, d, dtype=torch.float64, requires_grad=True)
    size = random_size(B, N).double()
    w = torch.randn(B, N, dtype=torch.float64)
    (cls_attention(q, k, size=size).double() * w).sum().backward()
    gq, gk = q.grad.clone(), k.grad.clone()
    q.grad = k.grad = None
    (explicit_logits(q, k, d ** -0.5, size).softmax(-1)[:, :, 0].mean(1) * w).sum().backward()
    torch.testing.assert_close(gq, q.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gk, k.grad, atol=1e-6, rtol=1e-5)
    assert gq[:, :, 1:].abs().max() == 0  # only the class query gets a gradient


@pytest.mark.parametrize("shape", SHAPES + [(2, 3, 197, 64)])
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES[:2])
def test_proportional_attention_column_equals_mask_equals_formula(shape, dtype, atol, rtol):
    B, H, N, d = shape
    q, k, v = (torch.randn(B, H, N, d).to(dtype) for _ in range(3))
    size = random_size(B, N)
    expected = explicit_logits(q, k, d ** -0.5, size).softmax(dim=-1) @ v.double()
    outs = {impl: proportional_attention(q, k, v, size, impl=impl) for impl in PROP_ATTN_IMPLS}
    for impl, out in outs.items():
        assert out.dtype == dtype and out.shape == (B, H, N, d), impl
        torch.testing.assert_close(out.double(), expected, atol=atol, rtol=rtol, msg=impl)
    torch.testing.assert_close(outs["column"], outs["mask"], atol=atol, rtol=rtol)


def test_proportional_attention_size_changes_the_result_and_ones_do_not():
    q, k, v = (torch.randn(2, 2, 10, 8) for _ in range(3))
    plain = F.scaled_dot_product_attention(q, k, v)
    for impl in ("column", "mask", "explicit"):
        torch.testing.assert_close(proportional_attention(q, k, v, torch.ones(2, 10), impl=impl), plain,
                                   atol=1e-5, rtol=1e-5)
        weighted = proportional_attention(q, k, v, random_size(2, 10), impl=impl)
        assert (weighted - plain).abs().max() > 1e-2
    assert torch.equal(proportional_attention(q, k, v), plain)  # size=None: the very SDPA call


def test_proportional_attention_explicit_scale_value_dim_and_bool_mask():
    B, H, N, d, dv = 2, 2, 9, 6, 11  # value head dim larger than d + 1
    q, k = torch.randn(B, H, N, d), torch.randn(B, H, N, d)
    v = torch.randn(B, H, N, dv)
    size = random_size(B, N)
    mask = torch.rand(B, 1, N, N) > 0.3
    mask[..., 0] = True  # every query attends to something
    logits = explicit_logits(q, k, 0.2, size).masked_fill(~mask, float("-inf"))
    expected = logits.softmax(-1) @ v.double()
    for impl in ("column", "mask", "explicit"):
        out = proportional_attention(q, k, v, size, scale=0.2, attn_mask=mask, impl=impl)
        assert out.shape == (B, H, N, dv)
        torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-4, msg=impl)


def test_proportional_attention_gradients_agree():
    q, k, v = (torch.randn(2, 3, 12, 8, requires_grad=True) for _ in range(3))
    size = random_size(2, 12)
    grads = {}
    for impl in ("column", "mask", "explicit"):
        out = proportional_attention(q, k, v, size, impl=impl)
        grads[impl] = torch.autograd.grad(out.square().sum(), (q, k, v))
    for impl in ("column", "mask"):
        for g, ref in zip(grads[impl], grads["explicit"]):
            torch.testing.assert_close(g, ref, atol=1e-4, rtol=1e-4)


def test_default_impl_is_a_real_implementation():
    for device in ("cpu", "cuda"):
        assert default_prop_attn_impl(device) in ("column", "mask")


def test_bad_inputs_raise():
    q, k, v = (torch.randn(2, 3, 7, 4) for _ in range(3))
    with pytest.raises(ValueError, match="q"):
        cls_attention(q[0], k)
    with pytest.raises(ValueError, match="agree"):
        cls_attention(q, k[:, :2])
    with pytest.raises(ValueError, match="agree"):
        cls_attention(q, k[..., :3])
    with pytest.raises(TypeError, match="k"):
        cls_attention(q, k.numpy())
    with pytest.raises(TypeError, match="k"):
        cls_attention(q, k.long())
    with pytest.raises(ValueError, match="size"):
        cls_attention(q, k, size=torch.ones(2, 6))
    with pytest.raises(TypeError, match="size"):
        cls_attention(q, k, size=torch.ones(2, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="form"):
        cls_attention(q, k, form="probs")
    with pytest.raises(ValueError, match="scale"):
        cls_attention(q, k, scale=-1.0)
    with pytest.raises(TypeError, match="scale"):
        cls_attention(q, k, scale="0.5")
    with pytest.raises(ValueError, match="impl"):
        proportional_attention(q, k, v, torch.ones(2, 7), impl="flash")
    with pytest.raises(ValueError, match="disagree"):
        proportional_attention(q, k, v[:, :, :5])
    with pytest.raises(ValueError, match="size"):
        proportional_attention(q, k, v, torch.ones(3, 7))
    assert math.isfinite(float(cls_attention(q, k).sum()))
