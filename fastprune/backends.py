"""Backend choice for every method: one resolver, which refuses a backend the method does not have.

Backends: ``"auto"``; ``"triton"`` (the fused Triton kernels: CUDA tensors, or CPU tensors under
``TRITON_INTERPRET=1``); ``"cpp"`` (the compiled extension: C++ on CPU tensors, CUDA C++ on CUDA
tensors); ``"cuda"`` (the CUDA C++ kernels, CUDA tensors only); ``"reference"`` (the PyTorch
specification). MSTM (:func:`fastprune.merge_tokens`) has all of them (:data:`BACKENDS`); ToMe and
BAT have C++ kernels for CPU tensors only (:data:`CPU_CPP_BACKENDS`); EViT and IdleViT have
:data:`TRITON_BACKENDS`.
"""
from __future__ import annotations

import warnings

import torch

from . import _checks, _ext, reference

#: Every backend name.
BACKENDS = ("auto", "triton", "cpp", "cuda", "reference")
#: The backends of a method with Triton kernels and a PyTorch reference only.
TRITON_BACKENDS = ("auto", "triton", "reference")
#: The backends of a method with Triton kernels, C++ kernels for CPU tensors and a reference.
CPU_CPP_BACKENDS = ("auto", "triton", "cpp", "reference")

_warned_no_ext = False


def resolve_backend(backend: str, x: torch.Tensor, supported: tuple = TRITON_BACKENDS) -> str:
    """The backend that runs: ``"triton"``, ``"cpp"`` or ``"reference"``.

    ``"auto"`` gives the reference under ``torch.onnx.export``, Triton on CUDA tensors; on CPU
    tensors the C++ kernels when ``"cpp"`` is in ``supported`` and the extension is built (else the
    reference, with a one-time warning), and the reference otherwise. ``"cuda"`` runs as ``"cpp"``
    on CUDA tensors. A method whose ``supported`` lacks ``"cuda"`` has no CUDA C++ kernels: there
    ``"cpp"`` needs CPU tensors.

    Raises:
        ValueError: ``backend`` not in ``supported``; ``backend="cuda"`` with tensors off CUDA;
            ``backend="cpp"`` with CUDA tensors for a method without CUDA C++ kernels.
    """
    global _warned_no_ext
    _checks.check_choice(backend, "backend", supported)
    if backend == "cuda" and not x.is_cuda:
        raise ValueError(f"backend='cuda' needs CUDA tensors, but x is on {x.device}")
    if backend == "cpp" and x.device.type != "cpu" and "cuda" not in supported:
        raise ValueError(f"backend='cpp' runs this method's C++ kernels on CPU tensors only, but x is on "
                         f"{x.device}: use backend='triton' or 'auto'")
    if backend == "auto":
        if reference.onnx_exporting():  # ONNX knows the reference's ops, not the kernels
            return "reference"
        if x.is_cuda:
            return "triton"
        if "cpp" not in supported:
            return "reference"
        if x.device.type == "cpu" and _ext.available():
            return "cpp"
        if x.device.type == "cpu" and not _warned_no_ext:
            _warned_no_ext = True
            warnings.warn("fastprune's C++ extension is not available "
                          f"({_ext.load_error()}); using the PyTorch reference on CPU", RuntimeWarning)
        return "reference"
    return "cpp" if backend == "cuda" else backend
