"""Bad input gets a clear exception naming the argument, the same way in every method.

Sizes must be finite and > 0 (a zero size would divide by zero in the weighted merge and return
NaN tokens silently); ``r`` is any ``numbers.Integral`` except bool (NumPy ints included), never a
tensor (reading it would synchronise with the device).
"""
import numpy as np
import pytest
import torch

import fastprune
from fastprune import _checks, bat, evit, tome

B, N, C = 2, 11, 8


def _inputs():
    return torch.randn(B, N, C), torch.rand(B, N)


def _calls():
    """(name, fn(x, attn, size)) for every public entry point that takes sizes."""
    return [
        ("merge", lambda x, a, s: fastprune.merge_tokens(x, a, 3, size=s, backend="reference")),
        ("merge_cpp", lambda x, a, s: fastprune.merge_tokens(x, a, 3, size=s)),
        ("tome", lambda x, a, s: tome.tome_merge_tokens(x, 3, size=s, backend="reference")),
        ("evit", lambda x, a, s: evit.evit_tokens(x, a, 0.5, size=s, backend="reference")),
        ("bat", lambda x, a, s: bat.bat_tokens(x, a, 0.5, size=s, backend="reference")),
    ]


@pytest.mark.parametrize("name,fn", _calls(), ids=[c[0] for c in _calls()])
@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")], ids=["zero", "negative", "nan", "inf"])
def test_bad_sizes_raise_naming_size(name, fn, bad):
    x, attn = _inputs()
    size = torch.ones(B, N)
    size[1, 4] = bad
    with pytest.raises(ValueError, match="size must be finite and > 0"):
        fn(x, attn, size)


@pytest.mark.parametrize("name,fn", _calls(), ids=[c[0] for c in _calls()])
def test_all_zero_sizes_raise_instead_of_nan_tokens(name, fn):
    x, attn = _inputs()
    with pytest.raises(ValueError, match="size"):
        fn(x, attn, torch.zeros(B, N))


@pytest.mark.parametrize("name,fn", _calls(), ids=[c[0] for c in _calls()])
def test_valid_fractional_sizes_pass(name, fn):
    x, attn = _inputs()
    out = fn(x, attn, torch.rand(B, N) + 0.5)
    assert torch.isfinite(out.x).all()


@pytest.mark.parametrize("r", [np.int64(3), np.int32(3), np.uint8(3), 3])
def test_any_integral_r_is_accepted(r):
    x, attn = _inputs()
    expected = fastprune.merge(x, attn, 3, backend="reference")
    torch.testing.assert_close(fastprune.merge(x, attn, r, backend="reference"), expected, rtol=0, atol=0)
    assert tome.tome_merge(x, r, backend="reference").shape == (B, N - 3, C)


@pytest.mark.parametrize("r", [True, torch.tensor(3), 3.0, np.float64(3.0), "3"])
def test_non_integral_r_is_refused_with_type_error(r):
    x, attn = _inputs()
    with pytest.raises(TypeError, match="r must be an int"):
        fastprune.merge(x, attn, r, backend="reference")
    with pytest.raises(TypeError, match="r must be an int"):
        tome.tome_merge(x, r, backend="reference")


def test_check_int_names_argument_and_range():
    assert _checks.check_int(np.int64(4), "k", 0, 9) == 4 and type(_checks.check_int(np.int64(4), "k", 0, 9)) is int
    with pytest.raises(ValueError, match="0 <= k <= 3"):
        _checks.check_int(4, "k", 0, 3)


def test_patch_accepts_numpy_r():
    timm = pytest.importorskip("timm")
    import fastprune.patch

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, depth=2).eval()
    images = torch.randn(1, 3, 224, 224)
    fastprune.patch.timm(model, method="tome", r=np.int64(8))
    with torch.no_grad():
        model(images)
    assert fastprune.patch.state(model).num_tokens == [197, 189]
    fastprune.patch.revert(model)
    with pytest.raises(TypeError):
        fastprune.patch.timm(model, method="tome", r=torch.tensor(8))


def test_patched_forward_does_not_revalidate_its_own_sizes(monkeypatch):
    """The value check runs once per user call, not in every block of a patched model (hot path)."""
    timm = pytest.importorskip("timm")
    import fastprune.patch

    calls = []
    original = _checks.check_positive_finite

    def counting(values, name):
        calls.append(_checks.LIBRARY_SIZES.depth)
        return original(values, name)

    monkeypatch.setattr(_checks, "check_positive_finite", counting)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, depth=3).eval()
    fastprune.patch.timm(model, method="merge", r=8)
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    assert fastprune.patch.state(model).num_tokens == [197, 189, 181]
    assert calls and all(depth > 0 for depth in calls)  # every check inside the patch was skipped
    assert _checks.LIBRARY_SIZES.depth == 0
    x, attn = _inputs()
    with pytest.raises(ValueError, match="size"):
        fastprune.merge_tokens(x, attn, 3, size=torch.zeros(B, N), backend="reference")
