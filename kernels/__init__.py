"""Triton kernels of fastprune (installed as ``fastprune.kernels``), one file per operation.

Shared launcher helpers live here: whether Triton runs through its CPU interpreter, and the device
check every Triton entry point makes before launching.
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
