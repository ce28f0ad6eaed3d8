"""IdleViT's fused Triton kernels: cls-logit ranking, top-k selection, gather/scatter of the selected
tokens, and the token cut loss, with their launchers and ``torch.autograd.Function`` s.

Semantics: "No Token Left Behind: Efficient Vision Transformer via Dynamic Token Idling" (Xu et al.,
2023), as specified by the PyTorch reference :mod:`fastprune.idle`, which is
the specification these kernels are tested against. In an idle layer the class token's attention
logits rank the tokens, the top ``K`` plus the prefix are selected, gathered into a short sequence
that goes through the block, and the block's outputs are scattered back; idle tokens are copied
bit for bit.

Kernels (one program instance each does):

* :func:`_cls_logit_kernel` -- ``BLOCK_N`` tokens of one image: their LayerNorm statistics and the dot
  product with a per-image vector ``u`` (the class query folded through the key projection, see
  :func:`cls_logits_triton`). Reads ``x`` once (twice from cache); ``O(N * C)``, no keys formed.
* the top-k selection is the shared primitive of ``kernels/select.py`` (:func:`topk_select_triton`:
  one program per image, sort-free, ties to the lower index, NaN as ``-inf``); it writes
  ``index [p + K]`` and ``slot [N]``.
* :func:`_gather_rows_kernel` -- ``BLOCK_R`` output rows: ``dst[r] = src[index[r]]`` (the gather;
  also the scatter's backward).
* :func:`_scatter_rows_kernel` -- ``BLOCK_R`` token rows: ``out[i] = src[slot[i]]`` where token
  ``i`` is selected, ``base[i]`` where it is idle (the write-back; zeros instead of either operand
  give the two backward passes). Pure loads and stores: idle tokens come out bit-identical.
* :func:`_cut_loss_fwd_kernel` -- ``BLOCK_M`` query rows of one image: the head-mean logits
  ``T = scale/H * sum_h q_h k_h^T`` over ``BLOCK_N`` key tiles (``tl.dot`` per head), an online
  softmax over the keys, and the two softmax-weighted sums ``inter_i`` and ``intra_i`` of the token
  cut loss. The ``N x N`` map is never written; ``logsumexp`` is kept for the backward pass.
* :func:`_cut_loss_bwd_kernel` -- one ``BLOCK_M x BLOCK_N`` tile: recomputes ``W = softmax(T)`` from
  ``q``, ``k`` and the saved ``logsumexp`` and writes the logit gradient ``dT`` (float32, ``[B, N, N]``,
  1/H of one attention map); ``dq = dT k`` and ``dk = dT^T q`` are then two batched matmuls.

Everything is computed in float32: half-precision inputs are converted right after loading, so
nothing overflows; the cut loss dots use ``input_precision="ieee"`` (no TF32 rounding of the logits).
The scatter/gather kernels copy values without arithmetic. Offsets are int64 (the image index is
widened first): ``B * N * C`` may pass ``2**31``. Tile sizes are those the ahead-of-time
compilation (``kernels/aot.py``, registered at the end of this file) shows fit sm_80/sm_90 without
register spills.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .aot import KernelSpec, register
from .select import select_spec, select_topk_triton

# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _cls_logit_kernel(x_ptr, u_ptr, c_ptr, out_ptr, N, C, stride_xb, stride_xn, factor, eps,
                      HAS_LN: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """``out[b, n] = factor * (LN(x[b, n]) . u[b] + c[b])`` for ``BLOCK_N`` tokens ``n``.

    ``LN`` is the affine-free LayerNorm ``(x - mean) / sqrt(var + eps)`` when ``HAS_LN`` (the affine
    part is folded into ``u`` and ``c`` by the launcher), the identity otherwise. Two passes over
    ``C`` in ``BLOCK_C`` chunks: the mean, then the centred variance and the dot product. ``x`` rows
    are contiguous (unit stride along C); ``u`` is ``[B, C]`` float32, ``c`` is ``[B]`` float32.
    """
    b = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    rows = x_ptr + b * stride_xb + offs_n[:, None] * stride_xn
    if HAS_LN:
        total = tl.zeros([BLOCK_N], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask = mask_n[:, None] & (offs_c < C)[None, :]
            total += tl.sum(tl.load(rows + offs_c[None, :], mask=mask, other=0.0).to(tl.float32), axis=1)
        mean = total / C
        sq = tl.zeros([BLOCK_N], dtype=tl.float32)
        dot = tl.zeros([BLOCK_N], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask_c = offs_c < C
            mask = mask_n[:, None] & mask_c[None, :]
            xv = tl.load(rows + offs_c[None, :], mask=mask, other=0.0).to(tl.float32)
            u = tl.load(u_ptr + b * C + offs_c, mask=mask_c, other=0.0)
            xc = tl.where(mask, xv - mean[:, None], 0.0)
            sq += tl.sum(xc * xc, axis=1)
            dot += tl.sum(xc * u[None, :], axis=1)
        dot = dot / tl.sqrt(sq / C + eps)
    else:
        dot = tl.zeros([BLOCK_N], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask_c = offs_c < C
            xv = tl.load(rows + offs_c[None, :], mask=mask_n[:, None] & mask_c[None, :], other=0.0).to(tl.float32)
            u = tl.load(u_ptr + b * C + offs_c, mask=mask_c, other=0.0)
            dot += tl.sum(xv * u[None, :], axis=1)
    c = tl.load(c_ptr + b)
    tl.store(out_ptr + b * N + offs_n, (dot + c) * factor, mask=mask_n)


@triton.jit
def _gather_rows_kernel(src_ptr, index_ptr, dst_ptr, R, N_src, C,
                        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """``dst[b, r, :] = src[b, index[b, r], :]`` for ``BLOCK_R`` rows ``r``; src ``[B, N_src, C]`` and
    dst ``[B, R, C]`` contiguous, index ``[B, R]`` int64."""
    b = tl.program_id(0).to(tl.int64)
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    src_row = tl.load(index_ptr + b * R + offs_r, mask=mask_r, other=0)
    src_base = src_ptr + b * N_src * C + src_row[:, None] * C
    dst_base = dst_ptr + b * R * C + offs_r[:, None].to(tl.int64) * C
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask = mask_r[:, None] & (offs_c < C)[None, :]
        tl.store(dst_base + offs_c[None, :], tl.load(src_base + offs_c[None, :], mask=mask), mask=mask)


@triton.jit
def _scatter_rows_kernel(base_ptr, src_ptr, slot_ptr, out_ptr, N, R, C,
                         HAS_BASE: tl.constexpr, HAS_SRC: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Write-back for ``BLOCK_R`` token rows ``i`` of one image:
    ``out[b, i] = src[b, slot[b, i]]`` if ``slot >= 0`` (selected), else ``base[b, i]``.

    A missing operand (``HAS_BASE`` / ``HAS_SRC`` false) reads as zeros: ``HAS_BASE=False`` is the
    gather's backward (``grad_x`` = rows of ``grad_xs``, zeros for idle tokens), ``HAS_SRC=False``
    the scatter's backward for ``x`` (``grad_out`` with selected rows zeroed). base/out ``[B, N, C]``,
    src ``[B, R, C]``, contiguous; slot ``[B, N]`` int64.
    """
    b = tl.program_id(0).to(tl.int64)
    offs_i = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_i = offs_i < N
    slot = tl.load(slot_ptr + b * N + offs_i, mask=mask_i, other=-1)
    selected = slot >= 0
    row = b * N * C + offs_i[:, None].to(tl.int64) * C
    src_row = b * R * C + tl.where(selected, slot, 0)[:, None] * C
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask = mask_i[:, None] & (offs_c < C)[None, :]
        if HAS_SRC:
            from_src = tl.load(src_ptr + src_row + offs_c[None, :], mask=mask & selected[:, None], other=0.0)
        else:
            from_src = tl.zeros([BLOCK_R, BLOCK_C], dtype=out_ptr.dtype.element_ty)
        if HAS_BASE:
            from_base = tl.load(base_ptr + row + offs_c[None, :], mask=mask & (slot < 0)[:, None], other=0.0)
        else:
            from_base = tl.zeros([BLOCK_R, BLOCK_C], dtype=out_ptr.dtype.element_ty)
        tl.store(out_ptr + row + offs_c[None, :], tl.where(selected[:, None], from_src, from_base), mask=mask)


@triton.jit
def _head_mean_logits(q_ptr, k_ptr, b, offs_m, offs_n, mask_m, mask_n, H, D,
                      sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, factor,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """``factor * sum_h q[b, h, offs_m] k[b, h, offs_n]^T`` as a float32 ``[BLOCK_M, BLOCK_N]`` tile."""
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    t = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for h in range(0, H):
        qh = tl.load(q_ptr + b * sq_b + h * sq_h + offs_m[:, None] * sq_n + offs_d[None, :],
                     mask=mask_m[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        kh = tl.load(k_ptr + b * sk_b + h * sk_h + offs_n[None, :] * sk_n + offs_d[:, None],
                     mask=mask_d[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
        t += tl.dot(qh, kh, input_precision="ieee")
    return t * factor


@triton.jit
def _cut_loss_fwd_kernel(q_ptr, k_ptr, m_ptr, inter_ptr, intra_ptr, lse_ptr, N, H, D,
                         sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, factor,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Token cut loss statistics for ``BLOCK_M`` query rows ``i`` of one image.

    ``W_ij = softmax_j(T_ij)``, ``T = factor * sum_h q_h k_h^T`` (``factor = scale / H``: the head
    mean of the logits); ``inter_i = sum_j |m_i - m_j| W_ij`` (column 0 excluded),
    ``intra_i = m_i sum_j m_j W_ij``; ``lse_i = log sum_j exp(T_ij)``. Online softmax over key tiles.
    """
    b = tl.program_id(0).to(tl.int64)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < N
    m_i = tl.load(m_ptr + b * N + offs_m, mask=mask_m, other=0.0)
    run_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    z = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_inter = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_intra = tl.zeros([BLOCK_M], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        t = _head_mean_logits(q_ptr, k_ptr, b, offs_m, offs_n, mask_m, mask_n, H, D,
                              sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, factor,
                              BLOCK_M, BLOCK_N, BLOCK_D)
        t = tl.where(mask_n[None, :], t, float("-inf"))
        m_j = tl.load(m_ptr + b * N + offs_n, mask=mask_n, other=0.0)
        d = tl.where(offs_n[None, :] == 0, 0.0, tl.abs(m_i[:, None] - m_j[None, :]))
        new_max = tl.maximum(run_max, tl.max(t, axis=1))
        alpha = tl.exp(run_max - new_max)
        p = tl.exp(t - new_max[:, None])
        z = z * alpha + tl.sum(p, axis=1)
        acc_inter = acc_inter * alpha + tl.sum(p * d, axis=1)
        acc_intra = acc_intra * alpha + tl.sum(p * m_j[None, :], axis=1)
        run_max = new_max
    tl.store(inter_ptr + b * N + offs_m, acc_inter / z, mask=mask_m)
    tl.store(intra_ptr + b * N + offs_m, m_i * acc_intra / z, mask=mask_m)
    tl.store(lse_ptr + b * N + offs_m, run_max + tl.log(z), mask=mask_m)


@triton.jit
def _cut_loss_bwd_kernel(q_ptr, k_ptr, m_ptr, lse_ptr, g_inter_ptr, g_intra_ptr, delta_ptr, dt_ptr, N, H, D,
                         sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, factor,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """One ``BLOCK_M x BLOCK_N`` tile of the gradient of the cut loss statistics w.r.t. ``q k^T``.

    ``dT_ij = W_ij (g_inter_i D_ij + g_intra_i A_ij - delta_i)`` with ``D_ij = |m_i - m_j|``
    (0 in column 0), ``A_ij = m_i m_j``, ``delta_i = g_inter_i inter_i + g_intra_i intra_i``; stored
    multiplied by ``factor`` (so that ``dq_h = dt @ k_h`` and ``dk_h = dt^T @ q_h``).
    """
    b = tl.program_id(0).to(tl.int64)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < N
    mask_n = offs_n < N
    t = _head_mean_logits(q_ptr, k_ptr, b, offs_m, offs_n, mask_m, mask_n, H, D,
                          sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, factor,
                          BLOCK_M, BLOCK_N, BLOCK_D)
    lse = tl.load(lse_ptr + b * N + offs_m, mask=mask_m, other=0.0)
    w = tl.where(mask_n[None, :], tl.exp(t - lse[:, None]), 0.0)
    m_i = tl.load(m_ptr + b * N + offs_m, mask=mask_m, other=0.0)
    m_j = tl.load(m_ptr + b * N + offs_n, mask=mask_n, other=0.0)
    g_inter = tl.load(g_inter_ptr + b * N + offs_m, mask=mask_m, other=0.0)
    g_intra = tl.load(g_intra_ptr + b * N + offs_m, mask=mask_m, other=0.0)
    delta = tl.load(delta_ptr + b * N + offs_m, mask=mask_m, other=0.0)
    d = tl.where(offs_n[None, :] == 0, 0.0, tl.abs(m_i[:, None] - m_j[None, :]))
    a = m_i[:, None] * m_j[None, :]
    dt = w * (g_inter[:, None] * d + g_intra[:, None] * a - delta[:, None]) * factor
    out = dt_ptr + b * N * N + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    tl.store(out, dt, mask=mask_m[:, None] & mask_n[None, :])


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------

def _rows_block(C: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_C) of the row copy kernels: up to 8 rows x 512 channels per tile (larger tiles
    of gathered rows spill registers on sm_80/sm_90: every row has its own base address)."""
    block_c = min(triton.next_power_of_2(C), 512)
    return max(1, min(8, 4096 // block_c)), block_c


def cls_logits_triton(x: torch.Tensor, u: torch.Tensor, c: torch.Tensor, factor: float,
                      ln_eps: float | None) -> torch.Tensor:
    """Launch :func:`_cls_logit_kernel`: ``factor * (LN(x) . u + c)``, float32 ``[B, N]``.

    Args:
        x: tokens ``[B, N, C]`` (any float dtype; made contiguous).
        u: ``[B, C]`` float32, the class query folded through the key projection (and the
            LayerNorm weight); c: ``[B]`` float32 (the constant terms).
        factor: ``scale / H``. ln_eps: LayerNorm epsilon, or None when ``x`` is already normalised.
    """
    x = x.contiguous()
    B, N, C = x.shape
    out = torch.empty(B, N, dtype=torch.float32, device=x.device)
    block_c = min(triton.next_power_of_2(C), 256)
    block_n = max(16, min(triton.next_power_of_2(N), 4096 // block_c))  # 16 x 256 tiles for ViT widths
    grid = (B, triton.cdiv(N, block_n))
    _cls_logit_kernel[grid](x, u.float().contiguous(), c.float().contiguous(), out, N, C, x.stride(0), x.stride(1),
                            float(factor), float(ln_eps or 0.0), HAS_LN=ln_eps is not None,
                            BLOCK_N=block_n, BLOCK_C=block_c)
    return out


def topk_select_triton(scores: torch.Tensor, k: int, num_prefix_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """IdleViT's top-k selection (NaN scores count as ``-inf``): one launch of the selection primitive,
    :func:`~fastprune.kernels.select.select_topk_triton`, on ``scores [B, N]``.

    Returns ``index [B, p + k]`` (selected positions, ascending) and ``slot [B, N]`` (position in
    ``index``, -1 for idle tokens), both int64.
    """
    sel = select_topk_triton(scores, k, num_prefix_tokens, nan_last=True)
    return sel.kept, sel.slot


def _gather_rows(src: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    src = src.contiguous()
    B, N, C = src.shape
    R = index.shape[1]
    dst = torch.empty(B, R, C, dtype=src.dtype, device=src.device)
    block_r, block_c = _rows_block(C)
    _gather_rows_kernel[(B, triton.cdiv(R, block_r))](src, index.contiguous(), dst, R, N, C,
                                                       BLOCK_R=block_r, BLOCK_C=block_c)
    return dst


def _scatter_rows(base: torch.Tensor | None, src: torch.Tensor | None, slot: torch.Tensor,
                  shape: tuple[int, int, int], R: int, dtype: torch.dtype) -> torch.Tensor:
    B, N, C = shape
    out = torch.empty(B, N, C, dtype=dtype, device=slot.device)
    base = base.contiguous() if base is not None else None
    src = src.contiguous() if src is not None else None
    block_r, block_c = _rows_block(C)
    _scatter_rows_kernel[(B, triton.cdiv(N, block_r))](
        base if base is not None else out, src if src is not None else out, slot.contiguous(), out, N, R, C,
        HAS_BASE=base is not None, HAS_SRC=src is not None, BLOCK_R=block_r, BLOCK_C=block_c)
    return out


class IdleGather(torch.autograd.Function):
    """``x[b, index[b]]``: the selected tokens ``[B, R, C]``; backward scatters into zeros."""

    @staticmethod
    def forward(ctx, x, index, slot):
        ctx.save_for_backward(slot)
        ctx.shape = tuple(x.shape)
        ctx.R = index.shape[1]
        return _gather_rows(x, index)

    @staticmethod
    def backward(ctx, grad_xs):
        (slot,) = ctx.saved_tensors
        grad_x = _scatter_rows(None, grad_xs, slot, ctx.shape, ctx.R, grad_xs.dtype)
        return grad_x, None, None


class IdleScatter(torch.autograd.Function):
    """Write the block outputs ``y [B, R, C]`` back to the selected positions of ``x [B, N, C]``;
    idle tokens are copied bit for bit. Backward: ``grad_y = grad_out[index]``, ``grad_x`` =
    ``grad_out`` with the selected rows zeroed."""

    @staticmethod
    def forward(ctx, x, y, index, slot):
        ctx.save_for_backward(index, slot)
        ctx.shape = tuple(x.shape)
        return _scatter_rows(x, y.to(x.dtype), slot, ctx.shape, y.shape[1], x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        index, slot = ctx.saved_tensors
        grad_x = grad_y = None
        if ctx.needs_input_grad[0]:
            grad_x = _scatter_rows(grad_out, None, slot, ctx.shape, index.shape[1], grad_out.dtype)
        if ctx.needs_input_grad[1]:
            grad_y = _gather_rows(grad_out, index)
        return grad_x, grad_y, None, None


def idle_gather_triton(x: torch.Tensor, index: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """Differentiable gather of the selected tokens (see :class:`IdleGather`)."""
    return IdleGather.apply(x, index, slot)


def idle_scatter_triton(x: torch.Tensor, y: torch.Tensor, index: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """Differentiable write-back of the selected tokens' block outputs (see :class:`IdleScatter`)."""
    return IdleScatter.apply(x, y, index, slot)


def _cut_blocks(D: int, element_size: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D) of the cut loss kernels: 32 x 32 logit tiles while a head row is at
    most 128 bytes (fp16/bf16 up to d = 64), 16 x 16 beyond (the dots are float32 FMA; larger tiles
    spill registers on sm_80/sm_90, as the ahead-of-time compilation reports)."""
    block_d = max(triton.next_power_of_2(D), 16)
    block = 32 if block_d * element_size <= 128 else 16
    return block, block, block_d


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    """Batch, head and token strides of a ``[B, H, N, d]`` tensor whose last dim is contiguous."""
    return tuple(t.stride()[:3])


class TokenCutStats(torch.autograd.Function):
    """``(inter [B, N], intra [B, N])`` of the token cut loss from ``q, k [B, H, N, d]`` and the
    selection mask ``m [B, N]`` (float, not differentiated). See :func:`_cut_loss_fwd_kernel`."""

    @staticmethod
    def forward(ctx, q, k, m, scale):
        q = q if q.stride(-1) == 1 else q.contiguous()
        k = k if k.stride(-1) == 1 else k.contiguous()
        B, H, N, D = q.shape
        m = m.float().contiguous()
        inter = torch.empty(B, N, dtype=torch.float32, device=q.device)
        intra = torch.empty_like(inter)
        lse = torch.empty_like(inter)
        factor = float(scale) / H
        block_m, block_n, block_d = _cut_blocks(D, q.element_size())
        grid = (B, triton.cdiv(N, block_m))
        _cut_loss_fwd_kernel[grid](q, k, m, inter, intra, lse, N, H, D, *_strides(q), *_strides(k), factor,
                                   BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d)
        ctx.save_for_backward(q, k, m, inter, intra, lse)
        ctx.factor = factor
        return inter, intra

    @staticmethod
    def backward(ctx, g_inter, g_intra):
        q, k, m, inter, intra, lse = ctx.saved_tensors
        B, H, N, D = q.shape
        g_inter = torch.zeros_like(inter) if g_inter is None else g_inter.float().contiguous()
        g_intra = torch.zeros_like(intra) if g_intra is None else g_intra.float().contiguous()
        delta = (g_inter * inter + g_intra * intra).contiguous()
        dt = torch.empty(B, N, N, dtype=torch.float32, device=q.device)
        block_m, block_n, block_d = _cut_blocks(D, q.element_size())
        grid = (B, triton.cdiv(N, block_m), triton.cdiv(N, block_n))
        _cut_loss_bwd_kernel[grid](q, k, m, lse, g_inter, g_intra, delta, dt, N, H, D,
                                   *_strides(q), *_strides(k), ctx.factor,
                                   BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d)
        dt = dt[:, None]  # [B, 1, N, N], broadcast over heads
        dq = (dt @ k.float()).to(q.dtype) if ctx.needs_input_grad[0] else None
        dk = (dt.transpose(-1, -2) @ q.float()).to(k.dtype) if ctx.needs_input_grad[1] else None
        return dq, dk, None, None


def token_cut_stats_triton(q: torch.Tensor, k: torch.Tensor, m: torch.Tensor, scale: float):
    """Differentiable ``(inter, intra)`` of the token cut loss (see :class:`TokenCutStats`)."""
    return TokenCutStats.apply(q, k, m, scale)


# ----------------------------------------------------------------------------------------------
# ahead-of-time compilation (kernels/aot.py): every kernel with the constants its launcher uses
# ----------------------------------------------------------------------------------------------
_PTR = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}
_STRIDES_QK = {n: "i32" for n in ("sq_b", "sq_h", "sq_n", "sk_b", "sk_h", "sk_n")}


def _aot_specs() -> list[KernelSpec]:
    """The launchers' configurations for ViT widths: every kernel, every variant, each token dtype at
    least once (the copy kernels' code does not depend on the dtype beyond the load width)."""
    qk = dict(N="i32", H="i32", D="i32", **_STRIDES_QK, factor="fp32")
    specs = [select_spec("idle_topk_select[N=197]", 197, nan_last=True, write_kept=True, write_rest=False)]
    for dtype, t in _PTR.items():
        tag = str(dtype).replace("torch.", "")
        for has_ln in (True, False):
            specs.append(KernelSpec(
                f"idle_cls_logit[{tag},{'ln' if has_ln else 'no_ln'}]", _cls_logit_kernel,
                dict(x_ptr=t, u_ptr="*fp32", c_ptr="*fp32", out_ptr="*fp32", N="i32", C="i32", stride_xb="i32",
                     stride_xn="i32", factor="fp32", eps="fp32"),
                dict(HAS_LN=has_ln, BLOCK_N=16, BLOCK_C=256)))
        C = {torch.float32: 192, torch.float16: 768, torch.bfloat16: 1024}[dtype]  # ViT-Ti, -B, -L widths
        block_r, block_c = _rows_block(C)
        specs.append(KernelSpec(f"idle_gather_rows[{tag},C={C}]", _gather_rows_kernel,
                                dict(src_ptr=t, index_ptr="*i64", dst_ptr=t, R="i32", N_src="i32", C="i32"),
                                dict(BLOCK_R=block_r, BLOCK_C=block_c)))
        for has_base, has_src in ((True, True), (False, True), (True, False)):
            specs.append(KernelSpec(
                f"idle_scatter_rows[{tag},C={C},base={int(has_base)},src={int(has_src)}]", _scatter_rows_kernel,
                dict(base_ptr=t, src_ptr=t, slot_ptr="*i64", out_ptr=t, N="i32", R="i32", C="i32"),
                dict(HAS_BASE=has_base, HAS_SRC=has_src, BLOCK_R=block_r, BLOCK_C=block_c)))
        for d in ((64, 128) if dtype == torch.float16 else (64,)):
            block_m, block_n, block_d = _cut_blocks(d, dtype.itemsize)
            consts = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d)
            specs.append(KernelSpec(
                f"idle_cut_loss_fwd[{tag},d={d}]", _cut_loss_fwd_kernel,
                dict(q_ptr=t, k_ptr=t, m_ptr="*fp32", inter_ptr="*fp32", intra_ptr="*fp32", lse_ptr="*fp32", **qk),
                consts))
            specs.append(KernelSpec(
                f"idle_cut_loss_bwd[{tag},d={d}]", _cut_loss_bwd_kernel,
                dict(q_ptr=t, k_ptr=t, m_ptr="*fp32", lse_ptr="*fp32", g_inter_ptr="*fp32", g_intra_ptr="*fp32",
                     delta_ptr="*fp32", dt_ptr="*fp32", **qk),
                consts))
    return specs


register(_aot_specs)
