"""One backend resolver (it refuses a backend a method does not have) and one keep-count rule."""
import pytest
import torch

import fastprune
from fastprune import attention, backends, bat, evit, idle, schedules, tome


def _inputs(B=2, N=9, C=4):
    gen = torch.Generator().manual_seed(0)
    return torch.randn(B, N, C, generator=gen), torch.rand(B, N, generator=gen)


@pytest.mark.parametrize("backend", ["cpp", "cuda"])
def test_methods_without_compiled_kernels_refuse_cpp_and_cuda(backend):
    _, a = _inputs()
    with pytest.raises(ValueError, match="backend must be one of"):
        idle.select_tokens(a, 3, backend=backend)


def test_tome_bat_and_evit_have_cpp_on_cpu_only():
    """ToMe, BAT and EViT have C++ kernels for CPU tensors: "cpp" is accepted there, "cuda" never."""
    x, a = _inputs()
    for call in (lambda b: bat.bat_tokens(x, a, 0.5, backend=b), lambda b: tome.tome_merge_tokens(x, 2, backend=b),
                 lambda b: evit.evit_tokens(x, a, 0.5, backend=b)):
        with pytest.raises(ValueError, match="backend must be one of"):
            call("cuda")
        if fastprune._ext.available():
            call("cpp")
    assert tome.BACKENDS == bat.BACKENDS == evit.BACKENDS == backends.CPU_CPP_BACKENDS
    with pytest.raises(ValueError, match="CPU tensors only"):
        backends.resolve_backend("cpp", x.to("meta"), backends.CPU_CPP_BACKENDS)
    assert backends.resolve_backend("cpp", x.to("meta"), backends.BACKENDS) == "cpp"  # MSTM has CUDA C++
    want = "cpp" if fastprune._ext.available() else "reference"
    assert backends.resolve_backend("auto", x, backends.CPU_CPP_BACKENDS) == want


def test_resolver():
    x, _ = _inputs()
    assert backends.resolve_backend("auto", x) == "reference"
    assert backends.resolve_backend("reference", x, backends.BACKENDS) == "reference"
    with pytest.raises(ValueError, match="CUDA tensors"):
        backends.resolve_backend("cuda", x, backends.BACKENDS)
    with pytest.raises(ValueError, match="backend must be one of"):
        backends.resolve_backend("fast", x, backends.BACKENDS)


def test_merge_keeps_every_backend():
    x, a = _inputs()
    want = fastprune.merge_tokens(x, a, 3, backend="reference")
    got = fastprune.merge_tokens(x, a, 3, backend="auto")
    torch.testing.assert_close(got.x, want.x)
    assert torch.equal(got.index, want.index)


@pytest.mark.parametrize("rate,n,kept", [(0.7, 10, 7), (0.7, 196, 138), (1.0, 5, 5), (1e-9, 5, 1), (0.5, 3, 2)])
def test_one_keep_count_rule(rate, n, kept):
    assert schedules.keep_count(n, rate) == kept
    assert evit.kept_count(n + 1, 1, rate) == kept
    assert schedules.generic_r(rate, 0, n + 1, 1) == n - kept


def test_one_attention_forward():
    import fastprune.patch

    assert fastprune.patch.attention_forward is attention.attention_forward
    assert idle.attention_forward is attention.attention_forward
