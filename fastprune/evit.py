"""EViT: keep the attentive tokens, fuse the inattentive ones into one token.

Semantics from "Not All Patches are What You Need: Expediting Vision Transformers via Token
Reorganizations" (Liang et al., ICLR 2022): after the attention residual of a reduction layer (3, 6
and 9, 0-based, by default), the ``K = ceil(rho (N - p))`` non-prefix tokens with the largest class
attention (softmax form) are kept; the other ``N - p - K`` ("inattentive") tokens are fused into ONE
extra token ``sum_i a_i x_i``, weighted by their class attention ``a_i``. Output: prefix tokens,
kept tokens, fused token; then the MLP.

:func:`evit_reference` is the specification; :func:`evit_tokens` validates and
dispatches to it, to the Triton kernels (``kernels/evit.py``) or, on CPU, to the compiled weighted
merge. Choices the paper leaves open:

* kept tokens are written in their **original order** (as MSTM's kept tokens), not by attention;
* fusion weights are the class attention (the paper's form, weights sum to less than 1), clamped
  below at ``WEIGHT_EPS = 1e-12`` as in every merge of this library (BAT, MSTM); ``normalize=True``
  divides them by their sum (a weighted average);
* the fused token's size is the sum of the fused tokens' sizes; sizes do not enter the weights
  (with proportional attention they are already part of ``a``).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _checks, backends
from .reference import WEIGHT_EPS, Merged, compute_dtype, output_slots, topk_keep_mask, true_positions
from .schedules import DEFAULT_KEEP_RATE, DEFAULT_LAYERS, check_keep_rate, kept_count, layer_keep_rate, parse_layers

__all__ = ["evit_tokens", "evit", "evit_reference", "kept_count", "check_keep_rate", "true_positions",
           "parse_layers", "DEFAULT_KEEP_RATE", "DEFAULT_LAYERS", "BACKENDS"]

BACKENDS = backends.CPU_CPP_BACKENDS
#: Old name of :func:`fastprune.schedules.layer_keep_rate` (kept for one release).
patch_keep_rate = layer_keep_rate


def evit_reference(x: torch.Tensor, scores: torch.Tensor, keep_rate: float, *,
                   size: Optional[torch.Tensor] = None, num_prefix_tokens: int = 1,
                   normalize: bool = False) -> Merged:
    """EViT's fusion as the paper describes it: the specification :func:`evit_tokens` is tested against.

    Same arguments and outputs as :func:`evit_tokens`, with ``scores`` ``[B, N]``; no validation.
    Computes in float32 (float64 for float64 inputs); differentiable in ``x`` and ``scores``
    through the fusion weights (the selection is not).
    """
    B, N, C = x.shape
    p = num_prefix_tokens
    K = kept_count(N, p, keep_rate)
    dtype = compute_dtype(x)
    size = torch.ones(B, N, dtype=torch.float32, device=x.device) if size is None else size
    if K == N - p:
        return Merged(x, size, torch.arange(N, device=x.device).expand(B, N))

    keep = topk_keep_mask(scores.detach(), K, p)  # prefix + K attentive tokens
    a = torch.where(keep, 0.0, scores.to(dtype).clamp_min(WEIGHT_EPS))  # inattentive weights, 0 elsewhere
    if normalize:
        a = a / a.sum(dim=1, keepdim=True)
    xf = x.to(dtype)
    fused = (a[..., None] * xf).sum(dim=1, keepdim=True)  # [B, 1, C]
    kept_idx = true_positions(keep, p + K)  # prefix and attentive tokens, in their original order
    kept = xf.gather(1, kept_idx[..., None].expand(B, p + K, C))
    x_out = torch.cat([kept, fused], dim=1).to(x.dtype)

    size_out = torch.cat([size.gather(1, kept_idx), (size * ~keep).sum(dim=1, keepdim=True)], dim=1)
    index = output_slots(keep).masked_fill(~keep, p + K)  # every fused token goes to slot p + K
    return Merged(x_out, size_out, index)


def _evit_cpp(x: torch.Tensor, scores: torch.Tensor, K: int, size: Optional[torch.Tensor], p: int,
              normalize: bool) -> Merged:
    """EViT on CPU tensors: the top-k selection, then the compiled weighted merge
    (:func:`fastprune._ext.weighted_merge_cpp`) with weight 1 on kept tokens (copied bit for bit) and
    ``max(a_i, eps)`` on the fused ones; the paper's unnormalised form scales the fused token by the
    weights' sum. Differentiable in ``x`` and ``scores``."""
    from . import _ext

    B, N, _ = x.shape
    acc = compute_dtype(x)
    keep = topk_keep_mask(scores.detach(), K, p)
    index = output_slots(keep).masked_fill(~keep, p + K)
    a = torch.where(keep, 0.0, scores.to(acc).clamp_min(WEIGHT_EPS))
    size = torch.ones(B, N, dtype=acc, device=x.device) if size is None else size
    out, size_out = _ext.weighted_merge_cpp(x, torch.where(keep, 1.0, a), size, index, p + K + 1)
    if not normalize:  # sum_i a_i x_i = (sum_i a_i) x_fused
        fused = out[:, -1:].to(acc) * a.sum(dim=1)[:, None, None]
        out = torch.cat([out[:, :-1], fused.to(out.dtype)], dim=1)
    return Merged(out, size_out, index)


def evit_tokens(x: torch.Tensor, attn: torch.Tensor, keep_rate: float, *, size: Optional[torch.Tensor] = None,
                num_prefix_tokens: int = 1, normalize: bool = False, backend: str = "auto") -> Merged:
    """Keep the ``K = ceil(keep_rate (N - p))`` most attended tokens, fuse the others into one (EViT).

    Args:
        x: tokens ``[B, N, C]``, float32 / float16 / bfloat16, CPU or CUDA.
        attn: the class token's attention, softmax form: ``[B, N]``, ``[B, H, N]`` (averaged over
            heads) or ``[B, H, N, N]`` (row 0, averaged over heads); on x's device. Prefix columns
            are ignored. Gradients flow into it through the fusion weights.
        keep_rate: ``rho``, a float with ``0 < keep_rate <= 1``. ``1.0`` (or any rate that keeps
            every token) is a no-op; a small rate keeps at least one token (``K >= 1``).
        size: ``[B, N]`` or ``[B, N, 1]`` token sizes (patches per token); ones if None.
        num_prefix_tokens: ``p``, leading tokens never fused (class, distillation, registers),
            ``0 <= p <= N - 1``.
        normalize: fuse with weights ``a_i / sum_j a_j`` instead of ``a_i``.
        backend: ``"auto"`` (the Triton kernels on CUDA, the C++ weighted merge on CPU when the
            extension is built, else the reference), ``"triton"`` (also on CPU tensors under
            ``TRITON_INTERPRET=1``), ``"cpp"`` (CPU tensors) or ``"reference"``.

    Returns:
        :class:`~fastprune.Merged` ``(x, size, index)``: tokens ``[B, p + K + 1, C]`` in x's dtype
        (computed in float32), sizes ``[B, p + K + 1]`` float32, and ``index`` ``[B, N]`` int64, the
        output position each input token went into (``p + K`` for every fused token). When no token
        is fused the input is returned unchanged (the same tensor object) with an identity index.

    Raises:
        TypeError: ``x``/``attn``/``size`` not tensors or of an unsupported dtype, ``keep_rate`` not
            a real number, ``num_prefix_tokens`` not an int, ``normalize`` not a bool.
        ValueError: wrong ranks or shapes, tensors on different devices, ``keep_rate`` outside
            ``(0, 1]``, ``num_prefix_tokens`` out of range, unknown ``backend``, ``backend="cpp"``
            with CUDA tensors.
        RuntimeError: ``backend="cpp"`` when the C++ extension is not built.
    """
    p, scores, size = _checks.check_attention_inputs(x, attn, size, num_prefix_tokens)
    B, N, _ = x.shape
    keep_rate = check_keep_rate(keep_rate)
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool, got {type(normalize).__name__}")
    backend = backends.resolve_backend(backend, x, BACKENDS)

    K = kept_count(N, p, keep_rate)
    if K == N - p:
        size = torch.ones(B, N, dtype=torch.float32, device=x.device) if size is None else size
        return Merged(x, size, torch.arange(N, device=x.device).expand(B, N))
    if backend == "triton":
        from .kernels.evit import evit_triton

        return evit_triton(x, scores, K, size=size, num_prefix_tokens=p, normalize=normalize)
    if backend == "cpp":
        return _evit_cpp(x, scores, K, size, p, normalize)
    return evit_reference(x, scores, keep_rate, size=size, num_prefix_tokens=p, normalize=normalize)


def evit(x: torch.Tensor, attn: torch.Tensor, keep_rate: float, **kwargs) -> torch.Tensor:
    """EViT token fusion returning only the tokens ``[B, p + K + 1, C]``.

    Same arguments, semantics and errors as :func:`evit_tokens`, which also returns the sizes and
    the position map.
    """
    return evit_tokens(x, attn, keep_rate, **kwargs).x
