"""The compiled extension (``csrc/``): loading it, fake kernels, autograd, and Python wrappers.

Importing this module never fails: if the extension was not built (see ``setup.py``),
:func:`available` is False and :func:`load_error` says why. When it is present, importing
``fastprune._C`` registers the operators ``torch.ops.fastprune.*`` with CPU kernels, and
``fastprune._C_cuda`` (optional) adds CUDA kernels for the fused merge. This module then registers

* fake (meta) kernels (:func:`torch.library.register_fake`), so tracing, ``torch.compile`` and
  ``torch.export`` know the output shapes without running a kernel;
* autograd (:func:`torch.library.register_autograd`) for the functional operators, so gradients
  flow through them and ``torch.compile`` sees through them.

Operators (``x`` tokens ``[B, N, C]``; scores/size in x's compute dtype, float32, or float64 for
float64 ``x``):

* ``mstm_merge(x, scores, size?, metric?, r, num_prefix_tokens, weight) -> (x', size', index)``:
  MSTM merging (Bian et al., 2023), exactly :func:`fastprune.reference.mstm_merge`.
* ``mstm_merge_backward(grad_x', grad_size', x, scores, size?, index, weight)
  -> (grad_x, grad_scores, grad_size)``.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _checks
from .reference import MERGE_WEIGHTS, Merged, compute_dtype

_LOAD_ERROR: Optional[str] = None
_CUDA_LOAD_ERROR: Optional[str] = None

try:
    from . import _C  # noqa: F401  (registers torch.ops.fastprune.* and the CPU kernels)
except ImportError as exc:  # not built, or built against another torch
    _C = None
    _LOAD_ERROR = f"{type(exc).__name__}: {exc}"

_C_cuda = None
if _C is not None:
    try:
        from . import _C_cuda  # noqa: F401  (registers the CUDA kernels of the fused merge)
    except ImportError as exc:
        _CUDA_LOAD_ERROR = f"{type(exc).__name__}: {exc}"
else:
    _CUDA_LOAD_ERROR = "the CPU extension fastprune._C is not loaded"

#: Weighting schemes of the merge, as in :func:`fastprune.reference.merge_weights`.
WEIGHTS = MERGE_WEIGHTS


def available() -> bool:
    """True when the C++ extension ``fastprune._C`` is built and loaded (``torch.ops.fastprune``)."""
    return _C is not None


def cuda_available() -> bool:
    """True when the CUDA extension ``fastprune._C_cuda`` is built and loaded.

    It imports on machines without a GPU; its kernels then simply have no CUDA tensors to run on.
    """
    return _C_cuda is not None


def load_error() -> Optional[str]:
    """Why ``fastprune._C`` could not be imported, or None when it was."""
    return _LOAD_ERROR


def cuda_load_error() -> Optional[str]:
    """Why ``fastprune._C_cuda`` could not be imported, or None when it was."""
    return _CUDA_LOAD_ERROR


def _require(cuda: bool = False) -> None:
    if not available():
        raise RuntimeError("fastprune's C++ extension is not built or failed to load "
                           f"({_LOAD_ERROR}); install with `pip install --no-build-isolation -e .` "
                           "(see setup.py), or use backend='reference' / 'triton'")
    if cuda and not cuda_available():
        raise RuntimeError("fastprune's CUDA extension is not built or failed to load "
                           f"({_CUDA_LOAD_ERROR}); build it with FASTPRUNE_BUILD_CUDA=1 and a CUDA "
                           "toolchain matching torch.version.cuda (csrc/setup_cuda_toolchain.sh), "
                           "or use backend='triton'")


# ---------------------------------------------------------------------------------------------
# Fake kernels and autograd
# ---------------------------------------------------------------------------------------------

def _fake_mstm_merge(x, scores, size, metric, r, num_prefix_tokens, weight):
    B, N, C = x.shape
    torch._check(0 <= r)
    torch._check(r <= N - num_prefix_tokens - 1)
    return (x.new_empty(B, N - r, C), scores.new_empty(B, N - r),
            x.new_empty(B, N, dtype=torch.int64))


def _fake_mstm_merge_backward(grad_x, grad_size, x, scores, size, index, weight):
    return torch.empty_like(x), torch.empty_like(scores), torch.empty_like(scores)


def _setup_mstm_merge(ctx, inputs, output):
    x, scores, size, metric, r, num_prefix_tokens, weight = inputs
    ctx.save_for_backward(x, scores, size, output[2])
    ctx.weight = weight
    ctx.has_size = size is not None
    ctx.n_out = output[0].shape[1]


def _backward_mstm_merge(ctx, grad_x, grad_size, grad_index):
    x, scores, size, index = ctx.saved_tensors
    if grad_x is None:
        grad_x = x.new_zeros(x.shape[0], ctx.n_out, x.shape[2])
    if grad_size is None:
        grad_size = scores.new_zeros(scores.shape[0], ctx.n_out)
    gx, gscores, gsize = torch.ops.fastprune.mstm_merge_backward(
        grad_x.contiguous(), grad_size.contiguous(), x, scores, size if ctx.has_size else None,
        index, ctx.weight)
    needs = ctx.needs_input_grad
    return (gx if needs[0] else None, gscores if needs[1] else None,
            gsize if ctx.has_size and needs[2] else None, None, None, None, None)


def _register() -> None:
    lib = "fastprune::"
    torch.library.register_fake(lib + "mstm_merge", _fake_mstm_merge)
    torch.library.register_fake(lib + "mstm_merge_backward", _fake_mstm_merge_backward)
    torch.library.register_autograd(lib + "mstm_merge", _backward_mstm_merge,
                                    setup_context=_setup_mstm_merge)


if _C is not None:
    _register()


# ---------------------------------------------------------------------------------------------
# Python wrappers
# ---------------------------------------------------------------------------------------------

def _check_tokens(x, name: str = "x") -> None:
    """As :func:`fastprune._checks.check_tokens`, and float64 is accepted too (gradient checks)."""
    if isinstance(x, torch.Tensor) and x.dtype == torch.float64:
        if x.dim() != 3 or min(x.shape) < 1:
            raise ValueError(f"{name} must have shape [B, N, C] with B, N, C >= 1, got {tuple(x.shape)}")
        return
    _checks.check_tokens(x, name)


def _check_scores(scores, x: torch.Tensor, name: str = "scores") -> torch.Tensor:
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [B, N], got {type(scores).__name__}")
    if not scores.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {scores.dtype}")
    _checks.check_same_device(x, scores, name)
    if scores.dim() != 2 or tuple(scores.shape) != tuple(x.shape[:2]):
        raise ValueError(f"{name} must have shape [B, N] = {list(x.shape[:2])}, got {tuple(scores.shape)}")
    return scores.to(compute_dtype(x))


def mstm_merge_cpp(x: torch.Tensor, scores: torch.Tensor, r: int, size: Optional[torch.Tensor] = None,
                   metric: Optional[torch.Tensor] = None, num_prefix_tokens: int = 1,
                   weight: str = "size") -> Merged:
    """MSTM token merging (Bian et al., 2023) by the compiled kernels: C++ on CPU tensors, the CUDA
    C++ kernels on CUDA tensors. Same signature, semantics and results as
    :func:`fastprune.reference.mstm_merge` (the specification): top-k by ``scores`` (ties to the lower
    index), prefix tokens pass through, every other token is merged into its most cosine-similar
    kept token, weighted merge with ``w = size`` or ``size * max(scores, WEIGHT_EPS)``, sizes add up.
    One fused operator per direction; differentiable w.r.t. ``x``, ``scores`` (``weight="size_attn"``)
    and ``size``.

    Args:
        x: tokens ``[B, N, C]``, float32 / float16 / bfloat16 (float64 for gradient checks).
            Half-precision inputs are accumulated in float32.
        scores: class attention ``[B, N]``, any float dtype (cast to float32; float64 for float64 x).
        r: tokens removed, ``0 <= r <= N - num_prefix_tokens - 1``.
        size: ``[B, N]`` or ``[B, N, 1]`` token sizes (patches per token); ones if None.
        metric: ``[B, N, Cm]`` features for cosine matching; ``x`` if None. Not differentiated.
        num_prefix_tokens: ``p``, leading tokens never merged (class, distillation, registers).
        weight: ``"size"`` or ``"size_attn"``.

    Returns:
        :class:`~fastprune.Merged` ``(x [B, N - r, C] in x's dtype, size [B, N - r] float32,
        index [B, N] int64)``.

    Raises:
        TypeError / ValueError: bad types, dtypes, shapes, ranges or devices (naming the argument).
        RuntimeError: the extension (or, for CUDA tensors, the CUDA extension) is not built.
    """
    _check_tokens(x)
    B, N, _ = x.shape
    p = _checks.check_int(num_prefix_tokens, "num_prefix_tokens", 0, N - 1)
    r = _checks.check_int(r, "r", 0, N - p - 1)
    scores = _check_scores(scores, x)
    if size is not None:
        if isinstance(size, torch.Tensor) and size.dim() == 3 and size.shape[-1] == 1:
            size = size.squeeze(-1)
        _checks.check_size(size, x)
        size = size.to(compute_dtype(x))
    if metric is not None:
        _check_tokens(metric, "metric")
        _checks.check_metric(metric if metric.dtype != torch.float64 else metric.float(), x)
    if weight not in WEIGHTS:
        raise ValueError(f"weight must be 'size' or 'size_attn', got {weight!r}")
    _require(cuda=x.is_cuda)
    out, size_out, index = torch.ops.fastprune.mstm_merge(x, scores, size, metric, r, p, weight)
    return Merged(out, size_out, index)
