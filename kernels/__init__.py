"""Triton kernels of fastprune (installed as ``fastprune.kernels``), one file per operation.

Shared launcher helpers live here: whether Triton runs through its CPU interpreter, the device
check every Triton entry point makes before launching, the launch wrapper that lets ``torch.compile``
trace a kernel, and the pointer types of the ahead-of-time specs.
"""
import os

import torch


def interpreting() -> bool:
    """True when ``TRITON_INTERPRET`` is set: kernels then run on CPU tensors (tests, no GPU)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_triton_device(x: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``x`` is on CUDA or the Triton interpreter is on."""
    if not x.is_cuda and not interpreting():
        raise ValueError(f"x is on {x.device}: the Triton backend needs CUDA tensors "
                         "(or TRITON_INTERPRET=1 to run the kernels on CPU)")


#: Whether ``@triton.jit`` made interpreted kernels: Triton reads ``TRITON_INTERPRET`` once, when the
#: kernels are decorated, so later changes of the variable do not change what they are.
KERNELS_INTERPRETED = interpreting()
#: Compiled kernels and a torch with ``triton_op``/``wrap_triton`` (2.6+): launches can be traced.
KERNELS_TRACEABLE = (not KERNELS_INTERPRETED and hasattr(torch.library, "triton_op")
                     and hasattr(torch.library, "wrap_triton"))

#: Triton pointer type of each storage dtype (ahead-of-time specs).
PTR = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}


def wrap_triton(kernel):
    """``torch.library.wrap_triton(kernel)``: the kernel, launchable so that tracing records it.

    Inside a :func:`torch.library.triton_op` this makes the launch visible to ``torch.compile`` and
    ``make_fx``; in a plain eager call torch hands back the kernel unchanged. Under the Triton
    interpreter, or with a torch older than 2.6, the kernel itself (interpreted kernels carry none
    of the metadata torch's wrapper needs; the operators are then opaque custom ops).
    """
    if not KERNELS_TRACEABLE:
        return kernel
    return torch.library.wrap_triton(kernel)
