"""Fused EViT inattentive token fusion: Triton kernels, their launchers and the autograd Function.

Semantics: "Not All Patches are What You Need: Expediting Vision Transformers via Token
Reorganizations" (Liang et al., ICLR 2022), written out step by step in
:func:`fastprune.evit.evit_reference`, which this file reproduces (same selection, same order, same
arithmetic in float32):

1. **top-k selection**: keep the prefix tokens and the ``K`` non-prefix tokens with the largest class
   attention (ties: lower index);
2. **fusion**: the other tokens are fused into one token ``sum_i w_i x_i`` with ``w_i = a_i`` (the
   paper) or ``w_i = a_i / max(sum_j a_j, eps)`` (``normalize``); its size is the sum of their sizes;
3. output: prefix tokens and kept tokens in their original order, then the fused token.

Forward = two launches: the top-k selection (:func:`~fastprune.kernels.select.select_topk_triton`,
grid ``(B,)``, once per image), which writes the index map (kept tokens: their output slot; the
others: ``p + K``, the fused token), then :func:`_evit_fwd_kernel` (grid ``(B, cdiv(C, BLOCK_C))``):
the copy of the kept tokens, the fused token and the sizes.
Backward = ONE launch, :func:`_evit_bwd_kernel` (same grid): ``dL/dx`` and per-channel-block partial
sums of ``dL/da``, which the host adds up over the (usually one to three) channel blocks.

All arithmetic is float32 whatever the storage dtype; deterministic, no atomics, no sort.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from fastprune.reference import WEIGHT_EPS, Merged

from . import check_triton_device
from .aot import KernelSpec, register, runtime_signature
from .select import select_topk_triton
from .weighted_merge import PTR

__all__ = ["evit_triton", "EViTFunction"]


# ----------------------------------------------------------------------------------------------------
# Forward: copy of the kept tokens + fusion, one launch after the selection
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _evit_fwd_kernel(
        x_ptr, stride_xb, stride_xn, stride_xc,
        scores_ptr, stride_sb, stride_sn,
        size_ptr, stride_zb, stride_zn,
        index_ptr, out_ptr, size_out_ptr, wsum_ptr,
        N, C, P, K,
        NORMALIZE: tl.constexpr, W_EPS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """EViT for one image ``b`` and one block of ``BLOCK_C`` channels, given the index map.

    ``index[b, i]`` (from the selection, :func:`~fastprune.kernels.select.select_topk_triton`) is a kept
    token's output slot, or ``P + K`` (the fused token). One program walks the tokens in chunks of
    ``BLOCK_T``: a kept token is copied to its slot, a fused token adds ``a_i x_i`` to the fused
    accumulator (``[BLOCK_C]`` fp32) and ``a_i`` to the weight sum; then it stores the fused token at
    slot ``P + K`` (divided by ``max(sum a, eps)`` with ``NORMALIZE``). The program with ``pid_c == 0``
    also writes the sizes ``[P + K + 1]`` and the weight sum (kept for the backward pass).

    Memory traffic per program: ``N`` indices and scores, ``N x BLOCK_C`` input elements read once,
    ``(P + K + 1) x BLOCK_C`` written.
    """
    pid_b = tl.program_id(0).to(tl.int64)
    pid_c = tl.program_id(1)
    score_row = scores_ptr + pid_b * stride_sb
    size_row = size_ptr + pid_b * stride_zb
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = offs_c < C
    S = P + K + 1
    out_row = out_ptr + pid_b * S * C

    fused = tl.zeros([BLOCK_C], tl.float32)
    wsum = tl.sum(fused, axis=0) * 0.0
    size_sum = tl.sum(fused, axis=0) * 0.0
    for t0 in range(0, N, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        valid_t = offs_t < N
        dest = tl.load(index_ptr + pid_b * N + offs_t, mask=valid_t, other=0)
        keep = valid_t & (dest < P + K)
        fuse = valid_t & (dest == P + K)

        xt = tl.load(x_ptr + pid_b * stride_xb + offs_t[:, None] * stride_xn + offs_c[None, :] * stride_xc,
                     mask=valid_t[:, None] & cmask[None, :], other=0.0)
        tl.store(out_row + dest[:, None] * C + offs_c[None, :], xt.to(out_ptr.dtype.element_ty),
                 mask=keep[:, None] & cmask[None, :])
        a = tl.load(score_row + offs_t * stride_sn, mask=fuse, other=0.0).to(tl.float32)
        # where, not a zero weight: a NaN/inf in a kept token must not reach the fused token
        fused += tl.sum(tl.where(fuse[:, None], a[:, None] * xt.to(tl.float32), 0.0), axis=0)
        wsum += tl.sum(a, axis=0)
        if pid_c == 0:
            size_t = tl.load(size_row + offs_t * stride_zn, mask=valid_t, other=0.0).to(tl.float32)
            size_sum += tl.sum(tl.where(fuse, size_t, 0.0), axis=0)
            tl.store(size_out_ptr + pid_b * S + dest, size_t, mask=keep)

    if NORMALIZE:
        fused = tl.div_rn(fused, tl.maximum(wsum, W_EPS))
    tl.store(out_row + (P + K) * C + offs_c, fused.to(out_ptr.dtype.element_ty), mask=cmask)
    if pid_c == 0:
        tl.store(size_out_ptr + pid_b * S + P + K, size_sum)
        tl.store(wsum_ptr + pid_b, wsum)


# ----------------------------------------------------------------------------------------------------
# Backward: one launch
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _evit_bwd_kernel(
        grad_out_ptr, stride_gb, stride_gn, stride_gc,
        x_ptr, stride_xb, stride_xn, stride_xc,
        scores_ptr, stride_sb, stride_sn,
        out_ptr, index_ptr, wsum_ptr,
        grad_x_ptr, grad_part_ptr,
        N, C, P, K, NUM_CB,
        NORMALIZE: tl.constexpr, W_EPS: tl.constexpr, NEED_GX: tl.constexpr, NEED_GA: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """Gradients of EViT for one image ``b`` and one block of ``BLOCK_C`` channels.

    With ``g = dL/dout``, ``g_f = g[P + K]`` (the fused token), ``A = sum of the fused a_i``:

    * a kept token: ``dL/dx_i = g[slot_i]``;
    * a fused token: ``dL/dx_i = w_i g_f`` with ``w_i = a_i`` (or ``a_i / max(A, eps)``);
    * ``dL/da_i = <g_f, x_i>`` for a fused token (normalised: ``<g_f, x_i - y_f> / max(A, eps)``, where
      ``y_f`` is the stored fused token and the ``- y_f`` term only applies while ``A >= eps``, as
      with ``clamp_min``); 0 for kept tokens. Each program writes its channel block's partial sum to
      ``grad_part[b, pid_c, :]``; the host sums the ``NUM_CB`` blocks.

    Memory traffic per program: ``N x BLOCK_C`` elements of ``g`` (gathered), ``x`` (only for
    ``dL/da``) and ``dL/dx``.
    """
    pid_b = tl.program_id(0).to(tl.int64)
    pid_c = tl.program_id(1)
    S = P + K + 1
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = offs_c < C
    score_row = scores_ptr + pid_b * stride_sb
    gout_row = grad_out_ptr + pid_b * stride_gb
    wsum = tl.load(wsum_ptr + pid_b)
    denom = tl.maximum(wsum, W_EPS)
    g_f = tl.load(gout_row + (P + K) * stride_gn + offs_c * stride_gc, mask=cmask, other=0.0).to(tl.float32)
    if NORMALIZE:
        y_f = tl.load(out_ptr + pid_b * S * C + (P + K) * C + offs_c, mask=cmask, other=0.0).to(tl.float32)
        y_f = tl.where(wsum >= W_EPS, y_f, 0.0)
    for t0 in range(0, N, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        valid_t = offs_t < N
        dest = tl.load(index_ptr + pid_b * N + offs_t, mask=valid_t, other=0)
        fuse = valid_t & (dest == P + K)
        mask = valid_t[:, None] & cmask[None, :]
        if NEED_GX:
            a = tl.load(score_row + offs_t * stride_sn, mask=fuse, other=0.0).to(tl.float32)
            if NORMALIZE:
                a = tl.div_rn(a, denom)
            g = tl.load(gout_row + dest[:, None] * stride_gn + offs_c[None, :] * stride_gc, mask=mask,
                        other=0.0).to(tl.float32)
            gx = tl.where(fuse[:, None], a[:, None] * g, g)
            tl.store(grad_x_ptr + pid_b * N * C + offs_t[:, None] * C + offs_c[None, :],
                     gx.to(grad_x_ptr.dtype.element_ty), mask=mask)
        if NEED_GA:
            xt = tl.load(x_ptr + pid_b * stride_xb + offs_t[:, None] * stride_xn + offs_c[None, :] * stride_xc,
                         mask=fuse[:, None] & cmask[None, :], other=0.0).to(tl.float32)
            if NORMALIZE:
                ga = tl.sum(tl.where(fuse[:, None], g_f[None, :] * (xt - y_f[None, :]), 0.0), axis=1)
                ga = tl.div_rn(ga, denom)
            else:
                ga = tl.sum(g_f[None, :] * xt, axis=1)
            tl.store(grad_part_ptr + (pid_b * NUM_CB + pid_c) * N + offs_t, ga, mask=valid_t)


# ----------------------------------------------------------------------------------------------------
# Launch configuration (shared with the ahead-of-time compile specs below)
# ----------------------------------------------------------------------------------------------------
def _block_c(C: int) -> int:
    return max(16, min(64, triton.next_power_of_2(C)))


def _fwd_config(C: int, normalize: bool) -> tuple[dict, int]:
    consts = dict(NORMALIZE=normalize, W_EPS=WEIGHT_EPS, BLOCK_T=32, BLOCK_C=_block_c(C))
    return consts, 4


def _bwd_config(C: int, normalize: bool, need_gx: bool, need_ga: bool) -> tuple[dict, int]:
    consts = dict(NORMALIZE=normalize, W_EPS=WEIGHT_EPS, NEED_GX=need_gx, NEED_GA=need_ga, BLOCK_T=32,
                  BLOCK_C=_block_c(C))
    return consts, 4


# ----------------------------------------------------------------------------------------------------
# Launchers and autograd Function
# ----------------------------------------------------------------------------------------------------
def _evit_forward(x, scores, size, K, p, normalize):
    B, N, C = x.shape
    S = p + K + 1
    index = select_topk_triton(scores, K, p, drop_slot=p + K, kept=False).slot  # kept: slot; fused: p + K
    out = torch.empty(B, S, C, dtype=x.dtype, device=x.device)
    size_out = torch.empty(B, S, dtype=torch.float32, device=x.device)
    wsum = torch.empty(B, dtype=torch.float32, device=x.device)
    consts, num_warps = _fwd_config(C, normalize)
    grid = (B, triton.cdiv(C, consts["BLOCK_C"]))
    _evit_fwd_kernel[grid](
        x, x.stride(0), x.stride(1), x.stride(2),
        scores, scores.stride(0), scores.stride(1),
        size, size.stride(0), size.stride(1),
        index, out, size_out, wsum, N, C, p, K, **consts, num_warps=num_warps)
    return out, size_out, index, wsum


def _evit_backward(grad_out, x, scores, out, index, wsum, K, p, normalize, need_gx, need_ga):
    B, N, C = x.shape
    consts, num_warps = _bwd_config(C, normalize, need_gx, need_ga)
    num_cb = triton.cdiv(C, consts["BLOCK_C"])
    grad_x = torch.empty(B, N, C, dtype=x.dtype, device=x.device) if need_gx else None
    grad_part = torch.empty(B, num_cb, N, dtype=torch.float32, device=x.device) if need_ga else None
    _evit_bwd_kernel[(B, num_cb)](
        grad_out, grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
        x, x.stride(0), x.stride(1), x.stride(2),
        scores, scores.stride(0), scores.stride(1),
        out, index, wsum,
        x if grad_x is None else grad_x, wsum if grad_part is None else grad_part,
        N, C, p, K, num_cb, **consts, num_warps=num_warps)
    grad_scores = None if grad_part is None else (grad_part[:, 0] if num_cb == 1 else grad_part.sum(dim=1))
    return grad_x, grad_scores


class EViTFunction(torch.autograd.Function):
    """Fused EViT ``(x, scores, size) -> (tokens, sizes, index)`` with a fused backward.

    Gradients reach ``x`` and ``scores`` (through the fusion weights of the fused tokens). Sizes and
    the index map are not differentiable; nothing flows through the selection.
    """

    @staticmethod
    def forward(ctx, x, scores, size, K, num_prefix_tokens, normalize):
        out, size_out, index, wsum = _evit_forward(x, scores, size, K, num_prefix_tokens, normalize)
        ctx.mark_non_differentiable(size_out, index)
        ctx.save_for_backward(x, scores, out, index, wsum)
        ctx.K, ctx.p, ctx.normalize = K, num_prefix_tokens, normalize
        return out, size_out, index

    @staticmethod
    def backward(ctx, grad_out, grad_size_out, grad_index):
        x, scores, out, index, wsum = ctx.saved_tensors
        need_gx, need_ga = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_gx or need_ga):
            return None, None, None, None, None, None
        grad_x, grad_scores = _evit_backward(grad_out, x, scores, out, index, wsum, ctx.K, ctx.p,
                                             ctx.normalize, need_gx, need_ga)
        return grad_x, grad_scores, None, None, None, None




def evit_triton(x: torch.Tensor, scores: torch.Tensor, K: int, size: Optional[torch.Tensor] = None,
                num_prefix_tokens: int = 1, normalize: bool = False) -> Merged:
    """EViT token fusion (Liang et al., ICLR 2022) with fused Triton kernels: one launch forward, one backward.

    Same semantics as :func:`fastprune.evit.evit_reference` (the specification), with the number of
    kept non-prefix tokens ``K`` given directly. Arguments are expected validated by
    :func:`fastprune.evit.evit_tokens` (the front door).

    Args:
        x: ``[B, N, C]`` tokens, float32 / float16 / bfloat16, any strides; CUDA (or CPU under
            ``TRITON_INTERPRET=1``).
        scores: ``[B, N]`` class attention (softmax form; prefix columns ignored), read in float32.
        K: attentive tokens kept, ``1 <= K <= N - p - 1``.
        size: ``[B, N]`` token sizes, or None for ones.
        num_prefix_tokens: ``p``.
        normalize: fusion weights ``a_i / max(sum a, eps)`` instead of ``a_i``.

    Returns:
        :class:`~fastprune.Merged` ``(x [B, p + K + 1, C] in x's dtype, size [B, p + K + 1] float32,
        index [B, N] int64)``. Kept and prefix tokens are bit-identical to the input.

    Raises:
        ValueError: ``K`` out of range; tensors not on CUDA while the Triton interpreter is off.
    """
    B, N, _ = x.shape
    if not 1 <= K <= N - num_prefix_tokens - 1:
        raise ValueError(f"K must satisfy 1 <= K <= N - p - 1 = {N - num_prefix_tokens - 1}, got {K}")
    check_triton_device(x)
    scores = scores.float()
    size = torch.ones(B, N, dtype=torch.float32, device=x.device) if size is None else size.float()
    out, size_out, index = EViTFunction.apply(x, scores, size, int(K), int(num_prefix_tokens), bool(normalize))
    return Merged(out, size_out, index)


# ----------------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (see kernels/aot.py): ViT shapes, every storage dtype
# ----------------------------------------------------------------------------------------------------
def _aot_specs() -> list[KernelSpec]:
    """Both kernels at the launch configurations ViT shapes use, each storage dtype and form at least once
    (the dtype only changes conversions on load and store; fewer specs keep the compile test short)."""
    def tag(dtype):
        return str(dtype).replace("torch.", "")

    specs = []
    # ViT-Ti/16 at 224 px and ViT-B/16 at 384 px.
    for dtype, N, C, normalize in ((torch.float32, 197, 192, False), (torch.float16, 577, 768, True),
                                   (torch.bfloat16, 197, 192, True)):
        t = PTR[dtype]
        consts, warps = _fwd_config(C, normalize)
        specs.append(KernelSpec(
            f"evit_fwd[{tag(dtype)},N={N},C={C},{'normalized' if normalize else 'paper'}]", _evit_fwd_kernel,
            runtime_signature(_evit_fwd_kernel, consts, x_ptr=t, scores_ptr="*fp32", size_ptr="*fp32",
                              index_ptr="*i64", out_ptr=t, size_out_ptr="*fp32", wsum_ptr="*fp32"),
            consts, warps))
    for dtype, normalize in ((torch.float32, True), (torch.bfloat16, False)):
        t = PTR[dtype]
        consts, warps = _bwd_config(768, normalize, True, True)
        specs.append(KernelSpec(
            f"evit_bwd[{tag(dtype)},{'normalized' if normalize else 'paper'}]", _evit_bwd_kernel,
            runtime_signature(_evit_bwd_kernel, consts, grad_out_ptr=t, x_ptr=t, scores_ptr="*fp32", out_ptr=t,
                              index_ptr="*i64", wsum_ptr="*fp32", grad_x_ptr=t, grad_part_ptr="*fp32"),
            consts, warps))
    return specs


register(_aot_specs)
