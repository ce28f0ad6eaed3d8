"""pytest-benchmark entry point: every fused operation and provider at a small shape.

``pytest benchmarks/ --benchmark-only`` times the same providers as ``python -m benchmarks.kernels``
(DeiT-S geometry, batch 4, float32 on CPU / bfloat16 on CUDA, forward and forward+backward). Each
test first checks the provider's output against the reference (eager chains only in float32), so a
broken provider fails instead of being timed. Providers that cannot run here (Triton without CUDA, a missing extension) are skipped
with the reason.
"""
import pytest
import torch

from benchmarks import kernels
from benchmarks.ops import SHAPES, Case, kernel_ops

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
BATCH = 4
OPS = kernel_ops()
PARAMS = [(op.name, p.name) for op in OPS.values() for p in op.providers]


def _case(op, mode):
    return Case(op.name, SHAPES["deit_s"], BATCH, DTYPE, mode, 13 if op.param == "r" else None, DEVICE,
                0.7 if op.param == "keep_rate" else None)


@pytest.mark.parametrize("mode", kernels.MODES)
@pytest.mark.parametrize("op_name,provider_name", PARAMS)
def test_kernel(benchmark, op_name, provider_name, mode):
    op = OPS[op_name]
    provider = next(p for p in op.providers if p.name == provider_name)
    reason = provider.why_not(DEVICE)
    if reason:
        pytest.skip(reason)
    case = _case(op, mode)
    inputs = op.make_inputs(case)
    reference = next((p for p in op.providers if p.role == "reference" and p.why_not(DEVICE) is None), None) \
        or next((p for p in op.providers if p.role == "eager"), None)
    with torch.no_grad():
        out = provider.fn(case, **inputs.kwargs)
        # Eager chains compute in the input dtype: in half precision their argmax/sort decisions may
        # legitimately differ from the float32 reference, so they are held to it in float32 only.
        strict = provider.role != "eager" or DTYPE == torch.float32
        if reference is not None and reference is not provider and strict:
            expected = reference.fn(case, **{k: kernels._float32_copy(v) for k, v in inputs.kwargs.items()})
            _, match = kernels._check(out, expected, DTYPE)
            assert match >= kernels.CHECK_MIN_MATCH, \
                f"{provider_name} disagrees with {reference.name} on {1 - match:.1%} of rows"

    grad_out = torch.randn_like(out) if case.backward else None
    timed = kernels._timed_call(provider, case, inputs, grad_out)

    def run():
        for leaf in inputs.leaves:
            leaf.grad = None
        timed()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark.extra_info.update(op=op_name, provider=provider_name, mode=mode, dtype=str(DTYPE), batch=BATCH,
                                bytes=sum(op.bytes_moved(case)[: 2 if case.backward else 1]))
    benchmark(run)
    if case.backward:
        assert all(leaf.grad is not None for leaf in inputs.leaves)
