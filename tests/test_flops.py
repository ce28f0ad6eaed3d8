"""FLOPs are counted the same whichever attention kernel runs, on every supported torch."""
import pytest
import torch
import torch.nn.functional as F

from fastprune import flops


def _explicit_attention(q, k, v):
    return (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(-1) @ v


def _count(fn, *args):
    counter = flops.counter()
    with torch.no_grad(), counter:
        fn(*args)
    return counter.get_total_flops()


@pytest.mark.parametrize("shape", [(2, 3, 17, 8, 8), (1, 4, 197, 64, 32)])
def test_sdpa_counts_like_explicit_products(shape):
    b, h, n, d, dv = shape
    q, k, v = torch.randn(b, h, n, d), torch.randn(b, h, n, d), torch.randn(b, h, n, dv)
    explicit = _count(_explicit_attention, q, k, v)
    assert explicit == 2 * b * h * n * n * (d + dv)
    assert _count(F.scaled_dot_product_attention, q, k, v) == explicit


def test_sdpa_with_float_mask_counts_like_explicit_products():
    """Proportional attention passes a float bias: whichever kernel takes it, the count is the same."""
    q, k, v = (torch.randn(2, 3, 13, 16) for _ in range(3))
    bias = torch.randn(2, 1, 1, 13)
    assert _count(lambda *a: F.scaled_dot_product_attention(*a, attn_mask=bias), q, k, v) \
        == _count(_explicit_attention, q, k, v)


def test_every_forward_sdpa_kernel_of_this_torch_is_mapped():
    present = [name for name in dir(torch.ops.aten)
               if name.startswith("_scaled_dot_product_") and not name.endswith("backward")
               and "math" not in name]
    missing = [name for name in present if name not in flops.SDPA_OPS]
    assert not missing, f"forward SDPA kernels without a formula: {missing}"
    assert flops.sdpa_mapping()


def test_sdpa_flops_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="incompatible"):
        flops.sdpa_flops((1, 2, 5, 8), (1, 2, 5, 4), (1, 2, 5, 4))
    with pytest.raises(ValueError, match="4-d"):
        flops.sdpa_flops((2, 5, 8), (2, 5, 8), (2, 5, 8))


def test_timm_vit_counts_the_same_fused_and_explicit():
    timm = pytest.importorskip("timm")
    from fastprune.evaluate import count_gflops

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, depth=2).eval()
    image = torch.randn(3, 224, 224)
    fused = count_gflops(model, image)
    for block in model.blocks:
        block.attn.fused_attn = False
    explicit = count_gflops(model, image)
    assert fused == pytest.approx(explicit, rel=0, abs=0)
    assert fused > 0
