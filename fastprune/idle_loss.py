"""IdleViT's token cut loss (Xu et al., 2023), per idle layer.

From the attention logits ``S`` before softmax and before the idle-key mask: ``W = softmax_j(mean_h
S)``, ``D_ij = |m_i - m_j|`` with column 0 (the class token) zeroed, ``A_ij = m_i m_j``,
``inter_i = sum_j D_ij W_ij``, ``intra_i = sum_j A_ij W_ij``,
``L = mean_{b,i}(inter_i^2) + mean_{b,i}((intra_i - m_i)^2)``; averaged over the idle layers and added
to the task loss with weight :data:`CUT_LOSS_WEIGHT`.
"""
from __future__ import annotations

import numbers
from typing import Optional

import torch

from . import backends

__all__ = ["token_cut_loss", "token_cut_loss_reference", "CUT_LOSS_WEIGHT"]

#: Weight of the token cut loss in the training loss (the paper's recipe).
CUT_LOSS_WEIGHT = 20.0


def _mask_float(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return keep.to(dtype) if keep.dtype == torch.bool else keep.detach().to(dtype)


def token_cut_loss_reference(logits: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The token cut loss of one idle layer, written like the paper (IdleViT, Xu et al., 2023).

    ``W = softmax_j(mean_h S)``; ``D_ij = |m_i - m_j|`` with column 0 zeroed; ``A_ij = m_i m_j``;
    ``inter_i = sum_j D_ij W_ij``; ``intra_i = sum_j A_ij W_ij``;
    ``L = mean_{b,i} inter_i^2 + mean_{b,i} (intra_i - m_i)^2``.

    Args:
        logits: ``S``, the attention logits before softmax and mask, ``[B, H, N, N]`` or
            ``[B, N, N]`` (already head-averaged).
        keep: ``m``, ``[B, N]`` selection mask (bool, or float in [0, 1]; not differentiated).

    Returns:
        0-d tensor, float32 (float64 for float64 logits).
    """
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    S = logits.to(dtype)
    T = S.mean(dim=1) if S.dim() == 4 else S  # [B, N, N]
    W = T.softmax(dim=-1)
    m = _mask_float(keep, dtype)
    D = (m[:, :, None] - m[:, None, :]).abs()
    D[:, :, 0] = 0.0
    A = m[:, :, None] * m[:, None, :]
    inter = (D * W).sum(dim=-1)
    intra = (A * W).sum(dim=-1)
    return (inter ** 2).mean() + ((intra - m) ** 2).mean()


def token_cut_loss(q: torch.Tensor, k: torch.Tensor, keep: torch.Tensor, *, scale: Optional[float] = None,
                   backend: str = "auto") -> torch.Tensor:
    """The token cut loss of one idle layer from its queries and keys (IdleViT, Xu et al., 2023).

    ``S = q k^T * scale`` per head (before softmax and before the idle-key mask), then
    :func:`token_cut_loss_reference`. The Triton kernel computes the head mean as one dot product per
    head, runs an online softmax over key tiles and never writes the ``[B, N, N]`` map in the forward
    pass; the backward pass writes the head-mean logit gradient once (``[B, N, N]`` float32, 1/H of
    an attention map) and forms ``dq``, ``dk`` with two batched matmuls. Computed in float32.

    Args:
        q, k: ``[B, H, N, d]`` queries and keys after q/k norm (what the attention multiplies),
            float32/float16/bfloat16 (float64 on the reference backend); differentiable.
        keep: ``[B, N]`` selection mask ``m``, bool or float in [0, 1] (no gradient).
        scale: logit scale, ``d ** -0.5`` if None.
        backend: ``"auto"`` (Triton on CUDA, PyTorch on CPU), ``"triton"`` or ``"reference"``.

    Returns:
        0-d float32 tensor (float64 for float64 inputs on the reference backend).

    Raises:
        TypeError: ``q``/``k``/``keep`` not tensors of a floating (``keep``: bool or floating) dtype,
            ``scale`` not a number.
        ValueError: ``q``, ``k`` not ``[B, H, N, d]`` of the same shape, ``keep`` not ``[B, N]``,
            different devices, ``scale <= 0``, unknown backend.
    """
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point torch.Tensor [B, H, N, d], got "
                            f"{type(t).__name__ if not isinstance(t, torch.Tensor) else t.dtype}")
        if t.dim() != 4 or min(t.shape) < 1:
            raise ValueError(f"{name} must have shape [B, H, N, d] with all sizes >= 1, got {tuple(t.shape)}")
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape [B, H, N, d], got {tuple(q.shape)} and {tuple(k.shape)}")
    if not isinstance(keep, torch.Tensor) or not (keep.dtype == torch.bool or keep.is_floating_point()):
        raise TypeError(f"keep must be a bool or floating torch.Tensor [B, N], got {type(keep).__name__}")
    B, H, N, d = q.shape
    if keep.shape != (B, N):
        raise ValueError(f"keep must have shape [B, N] = {(B, N)}, got {tuple(keep.shape)}")
    for name, t in (("k", k), ("keep", keep)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}: they must be on the same device")
    if scale is None:
        scale = d ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a float, got {type(scale).__name__}")
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    backend = backends.resolve_backend(backend, q, backends.TRITON_BACKENDS)
    if backend == "triton" and q.dtype != torch.float64:
        from .kernels.idle import token_cut_stats_triton

        m = _mask_float(keep, torch.float32)
        inter, intra = token_cut_stats_triton(q, k.to(q.dtype), m, float(scale))
        return (inter ** 2).mean() + ((intra - m) ** 2).mean()
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    logits = (q.to(dtype) * scale) @ k.to(dtype).transpose(-2, -1)
    return token_cut_loss_reference(logits, keep)
