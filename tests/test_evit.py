"""EViT (Liang et al., ICLR 2022): the reference's semantics, the fused Triton kernels against it (values
and gradients, through the interpreter on CPU), and ``method="evit"`` of the timm patch.
"""
import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

import fastprune
import fastprune.patch as fpatch
from conftest import DEVICE
from fastprune import _ext
from fastprune.evit import evit, evit_reference, evit_tokens, kept_count, parse_layers
from fastprune.kernels import aot

#: The compiled backends: the Triton kernels (interpreted on CPU) and, when built, the C++ weighted merge.
COMPILED = ["triton"] + (["cpp"] if _ext.available() and DEVICE == "cpu" else [])

#: (dtype, atol, rtol) of tokens and of the gradients.
DTYPES = [(torch.float32, 1e-5, 1e-5), (torch.float16, 2e-3, 2e-3), (torch.bfloat16, 1.6e-2, 1.6e-2)]
#: (B, N, C, p, keep rate): odd/prime N, C not a power of two, B = 1, p = 0 / 1 / 2, K = 1 (last).
SHAPES = [(1, 7, 5, 0, 0.5), (2, 13, 24, 1, 0.7), (2, 37, 72, 2, 0.3), (1, 41, 40, 1, 0.01)]


def _inputs(B, N, C, dtype, device=DEVICE):
    x = torch.randn(B, N, C, device=device).to(dtype)
    attn = torch.rand(B, N, device=device).softmax(dim=-1)
    size = torch.rand(B, N, device=device) * 3 + 0.5
    return x, attn, size


# ----------------------------------------------------------------------------------------------------
# Semantics of the reference
# ----------------------------------------------------------------------------------------------------
def test_kept_count_is_ceil_of_the_keep_rate():
    assert kept_count(197, 1, 0.7) == 138  # ceil(137.2)
    assert kept_count(11, 1, 0.7) == 7  # 0.7 * 10 = 7.000000000000001 in floating point
    assert kept_count(197, 1, 0.5) == 98
    assert kept_count(197, 1, 1.0) == 196
    assert kept_count(197, 1, 1e-9) == 1  # a positive keep rate keeps at least one token


def test_reference_matches_a_hand_computed_example():
    x = torch.arange(6 * 2, dtype=torch.float32).view(1, 6, 2)
    scores = torch.tensor([[0.5, 0.1, 0.3, 0.05, 0.2, 0.15]])
    size = torch.tensor([[1.0, 2.0, 1.0, 3.0, 1.0, 4.0]])
    # K = ceil(0.5 * 5) = 3: tokens 2 (0.3), 4 (0.2), 5 (0.15) are attentive; 1 and 3 are fused.
    out = evit_tokens(x, scores, 0.5, size=size, backend="reference")
    fused = 0.1 * x[0, 1] + 0.05 * x[0, 3]
    assert torch.equal(out.index, torch.tensor([[0, 4, 1, 4, 2, 3]]))
    assert torch.equal(out.x[0, :4], x[0, [0, 2, 4, 5]])  # prefix, then attentive tokens in order
    torch.testing.assert_close(out.x[0, 4], fused)
    assert torch.equal(out.size, torch.tensor([[1.0, 1.0, 1.0, 4.0, 5.0]]))
    normalized = evit_tokens(x, scores, 0.5, size=size, normalize=True, backend="reference")
    torch.testing.assert_close(normalized.x[0, 4], fused / 0.15)
    assert torch.equal(normalized.x[0, :4], out.x[0, :4])


def test_ties_keep_the_lower_index():
    x = torch.randn(1, 6, 3)
    out = evit_tokens(x, torch.full((1, 6), 0.25), 0.6, backend="reference")  # K = 3 of 5, all equal
    assert torch.equal(out.index, torch.tensor([[0, 1, 2, 3, 4, 4]]))


@pytest.mark.parametrize("keep_rate", [1.0, 0.9999])
def test_keep_rate_keeping_every_token_is_a_no_op(keep_rate):
    x, attn, size = _inputs(2, 6, 4, torch.float32)
    for backend in ("reference", "triton"):
        out = evit_tokens(x, attn, keep_rate, size=size, backend=backend)
        assert out.x is x and out.size is size
        assert torch.equal(out.index, torch.arange(6).expand(2, 6))


def test_evit_returns_the_tokens_of_evit_tokens():
    x, attn, _ = _inputs(2, 9, 4, torch.float32)
    assert torch.equal(evit(x, attn, 0.5), evit_tokens(x, attn, 0.5).x)


@pytest.mark.parametrize("normalize", [False, True])
def test_reference_gradcheck_float64(normalize):
    x = torch.randn(2, 9, 3, dtype=torch.float64, requires_grad=True)
    scores = torch.rand(2, 9, dtype=torch.float64).softmax(-1).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, s: evit_reference(x, s, 0.5, num_prefix_tokens=1, normalize=normalize).x, (x, scores))


@pytest.mark.parametrize("backend", ["reference", *COMPILED])
@pytest.mark.parametrize("normalize", [False, True])
def test_half_precision_does_not_overflow(backend, normalize):
    x = torch.full((1, 9, 8), 60000.0, dtype=torch.float16, device=DEVICE)
    attn = torch.full((1, 9), 1 / 9, device=DEVICE)
    out = evit_tokens(x, attn, 0.5, normalize=normalize, backend=backend)
    assert torch.isfinite(out.x).all()
    want = 60000.0 if normalize else 60000.0 * 4 / 9  # 4 fused tokens of weight 1/9
    torch.testing.assert_close(out.x[0, -1].float(), torch.full((8,), want, device=DEVICE), rtol=1e-3, atol=0)


# ----------------------------------------------------------------------------------------------------
# The fused kernels against the reference (interpreter on CPU)
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("B,N,C,p,keep_rate", SHAPES)
def test_kernel_matches_reference(B, N, C, p, keep_rate, dtype, atol, rtol, normalize, backend):
    x, attn, size = _inputs(B, N, C, dtype)
    x.requires_grad_()
    attn.requires_grad_()
    kwargs = dict(size=size, num_prefix_tokens=p, normalize=normalize)
    got = evit_tokens(x, attn, keep_rate, backend=backend, **kwargs)
    want = evit_tokens(x, attn, keep_rate, backend="reference", **kwargs)

    K = kept_count(N, p, keep_rate)
    assert got.x.shape == (B, p + K + 1, C) and got.x.dtype == dtype
    assert got.index.dtype == torch.int64 and got.size.dtype == torch.float32
    assert torch.equal(got.index, want.index)
    torch.testing.assert_close(got.x.float(), want.x.float(), atol=atol, rtol=rtol)
    torch.testing.assert_close(got.size, want.size)
    kept = want.index < p + K  # prefix and attentive tokens: copied bit for bit
    for b in range(B):
        assert torch.equal(got.x[b, want.index[b][kept[b]]], x[b][kept[b]])

    g = torch.randn_like(got.x)
    gx, ga = torch.autograd.grad(got.x, (x, attn), g)
    wx, wa = torch.autograd.grad(want.x, (x, attn), g)
    torch.testing.assert_close(gx.float(), wx.float(), atol=atol, rtol=rtol)
    scale = wa.abs().max().item() + 1e-6  # dL/da sums C products: compare relative to its magnitude
    torch.testing.assert_close(ga / scale, wa / scale, atol=4 * atol, rtol=0)
    assert wa[~kept].abs().sum() > 0 and ga[kept].abs().sum() == 0  # only the fused weights get gradients


@pytest.mark.parametrize("backend", COMPILED)
def test_kernel_takes_strided_tokens_and_attention_forms(backend):
    x = torch.randn(2, 24, 11, device=DEVICE).transpose(1, 2)  # [2, 11, 24], not contiguous
    attn = torch.rand(2, 3, 11, device=DEVICE).softmax(-1)  # [B, H, N]: averaged over heads
    got = evit_tokens(x, attn, 0.6, backend=backend)
    want = evit_tokens(x, attn, 0.6, backend="reference")
    assert torch.equal(got.index, want.index)
    torch.testing.assert_close(got.x, want.x)


# ----------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,error,match", [
    (dict(keep_rate=0.0), ValueError, "keep_rate"),
    (dict(keep_rate=1.5), ValueError, "keep_rate"),
    (dict(keep_rate=float("nan")), ValueError, "keep_rate"),
    (dict(keep_rate="0.5"), TypeError, "keep_rate"),
    (dict(keep_rate=True), TypeError, "keep_rate"),
    (dict(num_prefix_tokens=8), ValueError, "num_prefix_tokens"),
    (dict(num_prefix_tokens=1.0), TypeError, "num_prefix_tokens"),
    (dict(normalize="yes"), TypeError, "normalize"),
    (dict(backend="cuda"), ValueError, "backend"),
    (dict(attn=torch.rand(2, 7)), ValueError, "attn"),
    (dict(size=torch.ones(2, 5)), ValueError, "size"),
    (dict(x=torch.randn(2, 8, 4).long()), TypeError, "x"),
])
def test_bad_arguments_raise(kwargs, error, match):
    args = dict(x=torch.randn(2, 8, 4), attn=torch.rand(2, 8), keep_rate=0.5)
    args.update(kwargs)
    x, attn, keep_rate = args.pop("x"), args.pop("attn"), args.pop("keep_rate")
    with pytest.raises(error, match=match):
        evit_tokens(x, attn, keep_rate, **args)


def test_kernels_are_registered_for_ahead_of_time_compilation():
    names = [s.name for s in aot.registered_specs()]
    assert any(n.startswith("evit_merge[") for n in names) and any(n.startswith("evit_merge_backward[") for n in names)
    for dtype in ("float32", "float16", "bfloat16"):
        assert any(n.startswith("evit_") and dtype in n for n in names)


# ----------------------------------------------------------------------------------------------------
# timm patch
# ----------------------------------------------------------------------------------------------------
def test_method_is_registered_by_importing_fastprune():
    assert fastprune.__name__ and "evit" in fpatch.available_methods()


def test_patched_vit_follows_the_papers_schedule():
    model = VisionTransformer(img_size=224, patch_size=16, embed_dim=24, depth=12, num_heads=2, num_classes=5)
    images = torch.randn(1, 3, 224, 224)
    fpatch.timm(model.eval(), method="evit", r=0.7)
    with torch.no_grad():
        model(images)
    st = fpatch.state(model)
    assert st.num_tokens == [197] * 4 + [140] * 3 + [100] * 3 + [72] * 2
    assert st.r_applied == fpatch.reduction_schedule(model) == [0, 0, 0, 57, 0, 0, 40, 0, 0, 28, 0, 0]
    assert st.size.shape == (1, 72) and st.size.sum().item() == 197  # every patch is accounted for
    assert st.index.shape == (1, 197) and st.index.max().item() == 71
    fpatch.timm(model, method="evit", r=0.5, layers="2,5")
    with torch.no_grad():
        model(images)
    assert fpatch.state(model).num_tokens == [197] * 3 + [100] * 3 + [52] * 6  # 1 + 98 + 1, 1 + 50 + 1
    assert fpatch.reduction_schedule(model) == fpatch.state(model).r_applied == [0, 0, 97, 0, 0, 48] + [0] * 6
    # without patching again: another keep rate, other layers
    assert fpatch.reduction_schedule(model, 0.7, method="evit", layers=(0,)) == [57] + [0] * 11


def test_patch_r0_and_keep_rate_one_leave_the_model_unchanged():
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=16, depth=4, num_heads=2, num_classes=5).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = model(images)
        for r in (0, 1.0):
            fpatch.timm(model, method="evit", r=r, layers=(1, 2))
            assert torch.equal(model(images), want)
    fpatch.revert(model)


def test_patch_default_is_without_proportional_attention():
    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=16, depth=4, num_heads=2, num_classes=5).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        fpatch.timm(model, method="evit", r=0.5, layers=(1,))
        assert fpatch.state(model).options["prop_attn"] is False
        default = model(images)
        fpatch.timm(model, method="evit", r=0.5, layers=(1,), prop_attn=False)
        assert torch.equal(model(images), default)
        fpatch.timm(model, method="evit", r=0.5, layers=(1,), prop_attn=True)
        assert fpatch.state(model).options["prop_attn"] is True
        # blocks 2, 3 see the fused token's size (8 patches): log 8 changes their attention
        assert not torch.allclose(model(images), default, atol=1e-4)
    fpatch.revert(model)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_one_optimiser_step_lowers_the_loss(backend):
    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=5,
                              global_pool="token")
    fpatch.timm(model.train(), method="evit", r=0.5, layers=(1, 2), backend=backend)
    images, labels = torch.randn(8, 3, 32, 32), torch.arange(8) % 5
    optimiser = torch.optim.SGD(model.parameters(), lr=0.05)
    loss = F.cross_entropy(model(images), labels)
    loss.backward()
    qkv_grad = model.blocks[2].attn.qkv.weight.grad
    assert qkv_grad is not None and qkv_grad.abs().sum() > 0
    optimiser.step()
    with torch.no_grad():
        assert F.cross_entropy(model(images), labels).item() < loss.item()
    assert fpatch.state(model).num_tokens == [17, 17, 10, 7]  # 1 + ceil(0.5 * 16) + 1, 1 + ceil(0.5 * 9) + 1


def test_patch_bad_arguments_raise():
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=16, depth=4, num_heads=2, num_classes=5)
    with pytest.raises(TypeError, match="keep rate"):
        fpatch.timm(model, method="evit", r=13)
    with pytest.raises(ValueError, match="layers"):
        fpatch.timm(model, method="evit", r=0.7)  # the default layers 3, 6, 9 do not fit 4 blocks
    with pytest.raises(TypeError, match="normalize"):
        fpatch.timm(model, method="evit", r=0.7, layers=(1,), normalize="yes")
    with pytest.raises(ValueError, match="backend"):
        fpatch.timm(model, method="evit", r=0.7, layers=(1,), backend="gpu")
    with pytest.raises(ValueError, match="layers"):
        parse_layers("3,3")
    no_cls = VisionTransformer(img_size=32, patch_size=8, embed_dim=16, depth=4, num_heads=2, num_classes=5,
                               class_token=False, global_pool="avg")
    fpatch.timm(no_cls, method="evit", r=0.5, layers=(1,))  # no class token: ranks by the attention received
    assert fpatch.is_patched(no_cls)
