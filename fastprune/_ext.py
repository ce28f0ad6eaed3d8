"""The compiled extension (``csrc/``): loading it, fake kernels, autograd, and Python wrappers.

Importing this module never fails: if the extension was not built (see ``setup.py``),
:func:`available` is False and :func:`load_error` says why. When it is present, importing
``fastprune._C`` registers the operators ``torch.ops.fastprune.*`` with CPU kernels, and
``fastprune._C_cuda`` (optional) adds CUDA kernels for the fused merge. This module then registers

* fake (meta) kernels (:func:`torch.library.register_fake`), so tracing, ``torch.compile`` and
  ``torch.export`` know the output shapes without running a kernel;
* autograd (:func:`torch.library.register_autograd`) for the functional operators, so gradients
  flow through them and ``torch.compile`` sees through them.

Operators (``x`` tokens ``[B, N, C]``; scores/size/weights in x's compute dtype, float32, or
float64 for float64 ``x``; ``index`` ``[B, N]`` int64, the output token of every input token):

* ``mstm_merge(x, scores, size?, metric?, r, num_prefix_tokens, weight) -> (x', size', index)``:
  MSTM merging (Bian et al., 2023), exactly :func:`fastprune.reference.mstm_merge`; CPU and CUDA.
* ``mstm_merge_backward(grad_x', grad_size', x, scores, size?, index, weight)
  -> (grad_x, grad_scores, grad_size)``.
* ``weighted_merge(x, w, size, index, n_out) -> (x', size')``: the weighted merge of every method,
  :func:`fastprune.reference.weighted_merge`; CPU and CUDA. ``weighted_merge_backward(grad_x',
  grad_size', x, w, index) -> (grad_x, grad_w, grad_size)``.
* ``tome_match(metric, r, num_prefix_tokens) -> index``: ToMe's bipartite soft matching,
  :func:`fastprune.tome.bipartite_soft_matching`'s index map; CPU.
* ``bat_index(scores, metric, K, r, c, k, num_prefix_tokens) -> index``: BAT's decoupling,
  matching and clustering, :func:`fastprune.bat.bat_index`; CPU.

ToMe and BAT on the C++ path are the index operator followed by ``weighted_merge``; their
gradients come from ``weighted_merge_backward`` (C++) and, for BAT's weights ``size x max(a, eps)``,
from PyTorch's autograd of that product.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _checks
from .reference import MERGE_WEIGHTS, BATCounts, Merged, compute_dtype, merge_weights

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


def _fake_weighted_merge(x, w, size, index, n_out):
    torch._check(1 <= n_out)
    torch._check(n_out <= x.shape[1])
    return x.new_empty(x.shape[0], n_out, x.shape[2]), w.new_empty(x.shape[0], n_out)


def _fake_weighted_merge_backward(grad_x, grad_size, x, w, index):
    return torch.empty_like(x), torch.empty_like(w), torch.empty_like(w)


def _fake_index(t, *args):
    return t.new_empty(t.shape[:2], dtype=torch.int64)


def _setup_weighted_merge(ctx, inputs, output):
    x, w, size, index, n_out = inputs
    ctx.save_for_backward(x, w, index)
    ctx.n_out = n_out


def _backward_weighted_merge(ctx, grad_x, grad_size):
    x, w, index = ctx.saved_tensors
    if grad_x is None:
        grad_x = x.new_zeros(x.shape[0], ctx.n_out, x.shape[2])
    if grad_size is None:
        grad_size = w.new_zeros(w.shape[0], ctx.n_out)
    gx, gw, gsize = torch.ops.fastprune.weighted_merge_backward(
        grad_x.contiguous(), grad_size.contiguous(), x, w, index)
    needs = ctx.needs_input_grad
    return gx if needs[0] else None, gw if needs[1] else None, gsize if needs[2] else None, None, None


def _register() -> None:
    lib = "fastprune::"
    torch.library.register_fake(lib + "mstm_merge", _fake_mstm_merge)
    torch.library.register_fake(lib + "mstm_merge_backward", _fake_mstm_merge_backward)
    torch.library.register_fake(lib + "weighted_merge", _fake_weighted_merge)
    torch.library.register_fake(lib + "weighted_merge_backward", _fake_weighted_merge_backward)
    torch.library.register_fake(lib + "tome_match", _fake_index)
    torch.library.register_fake(lib + "bat_index", _fake_index)
    torch.library.register_autograd(lib + "mstm_merge", _backward_mstm_merge,
                                    setup_context=_setup_mstm_merge)
    torch.library.register_autograd(lib + "weighted_merge", _backward_weighted_merge,
                                    setup_context=_setup_weighted_merge)


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


def weighted_merge_cpp(x: torch.Tensor, w: torch.Tensor, size: torch.Tensor, index: torch.Tensor,
                       n_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The weighted merge ``x'_d = sum_{i -> d} (w_i / W_d) x_i``, ``W_d = sum_{i -> d} w_i``, sizes
    add: :func:`fastprune.reference.weighted_merge` by the compiled kernels (C++ on CPU, CUDA C++ on
    CUDA), bit-identical to it on CPU. Differentiable w.r.t. ``x``, ``w`` and ``size``.

    Args:
        x: ``[B, N, C]`` float32 / float16 / bfloat16 / float64.
        w, size: ``[B, N]`` weights and sizes (cast to x's compute dtype: float32, float64 for float64).
        index: ``[B, N]`` int64, the output token of every input token, in ``[0, n_out)``.
        n_out: output tokens, ``1 <= n_out <= N``.

    Returns:
        ``(x' [B, n_out, C] in x's dtype, size' [B, n_out] in the compute dtype)``.

    Raises:
        TypeError / ValueError: bad dtypes, shapes, devices or index values (from the operator).
        RuntimeError: the extension (for CUDA tensors: the CUDA extension) is not built.
    """
    _require(cuda=x.is_cuda)
    acc = compute_dtype(x)
    return torch.ops.fastprune.weighted_merge(x, w.to(acc), size.to(acc), index, n_out)


def tome_merge_cpp(x: torch.Tensor, r: int, size: Optional[torch.Tensor] = None,
                   metric: Optional[torch.Tensor] = None, num_prefix_tokens: int = 1) -> Merged:
    """ToMe's merge on CPU tensors: ``tome_match`` (C++ bipartite soft matching) then ``weighted_merge``
    with ``w = size``; equal to :func:`fastprune.tome.tome_merge_reference` (index map bit for bit,
    tokens and sizes too). Arguments as validated and clipped by :func:`fastprune.tome.tome_merge_tokens`
    (``0 <= r <= (N - p) // 2``); the operators check them again. Returns :class:`~fastprune.Merged`
    with sizes in x's compute dtype.
    """
    _require()
    B, N, _ = x.shape
    acc = compute_dtype(x)
    size = torch.ones(B, N, dtype=acc, device=x.device) if size is None else size.to(acc)
    metric = x if metric is None else metric
    index = torch.ops.fastprune.tome_match(metric.detach(), r, num_prefix_tokens)
    out, size_out = torch.ops.fastprune.weighted_merge(x, size, size, index, N - r)
    return Merged(out, size_out, index)


def bat_merge_cpp(x: torch.Tensor, scores: torch.Tensor, counts: BATCounts,
                  size: Optional[torch.Tensor] = None, metric: Optional[torch.Tensor] = None,
                  num_prefix_tokens: int = 1) -> Merged:
    """BAT's reduction on CPU tensors: ``bat_index`` (C++ decoupling, matching, DPC-kNN) then
    ``weighted_merge`` with ``w = size x max(scores, WEIGHT_EPS)``; equal to
    :func:`fastprune.bat.bat_reference` (index map bit for bit, tokens and sizes too). Arguments as
    validated by :func:`fastprune.bat.bat_tokens`, ``counts`` from :func:`fastprune.bat.bat_plan`
    with ``r + c > 0``. Gradients reach ``x`` and ``scores`` (and ``size``).
    """
    _require()
    B, N, _ = x.shape
    acc = compute_dtype(x)
    size = torch.ones(B, N, dtype=torch.float32, device=x.device) if size is None else size
    metric = x if metric is None else metric
    ranked = scores.detach()
    ranked = ranked if ranked.dtype in (torch.float32, torch.float64) else ranked.float()
    index = torch.ops.fastprune.bat_index(ranked, metric.detach(), *counts, num_prefix_tokens)
    size_acc = size.to(acc)
    w = merge_weights(scores.to(acc), size_acc, "size_attn")
    out, size_out = torch.ops.fastprune.weighted_merge(x, w, size_acc, index,
                                                       counts.output_tokens(num_prefix_tokens))
    return Merged(out, size_out.to(size.dtype), index)
