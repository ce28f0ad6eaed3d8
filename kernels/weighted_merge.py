"""The weighted merge every merging method ends with (MSTM, ToMe, BAT, EViT): Triton kernels, launchers.

Given an index map ``index [B, N]`` that sends input token ``i`` to output token ``d_i`` in
``[0, S)`` (every output receives at least one token), weights ``w_i`` and sizes ``s_i``:

    ``x'_d = sum_{i -> d} (w_i / W_d) x_i``,  ``W_d = sum_{i -> d} w_i``,  ``s'_d = sum_{i -> d} s_i``,

with ``w = size`` or ``w = size * max(score, WEIGHT_EPS)`` (``size_attn``), size 1 when none is given
(EViT: sizes out of the weights; its paper form ``x'_d = sum w_i x_i``, no division).
Each weight is divided by its total (IEEE ``tl.div_rn``) *before* the sum, so an output that
receives one token is that token, bit for bit. The tokens of an output are summed in increasing
input position, tile sums for tail rows (deterministic, no atomics). Nothing is multiplied into a
row it is not merged into, so a NaN or inf in one token reaches only its own output row.

The methods differ only in the index map they build (MSTM: kept tokens in order, sources to their
most similar kept token; ToMe: prefix, unmerged A tokens, B tokens, merged A tokens to their B
partner; BAT: survivors, pairs and clusters; EViT: kept tokens, then the fused token), so one forward
kernel and one backward kernel serve them all:

* :func:`_weighted_merge_kernel` (grid ``(B, cdiv(S - TAIL, ROWS) + tail programs, cdiv(C, C_SPLIT))``):
  a gather. A program owns ``ROWS`` output rows and ``C_SPLIT`` channels; it reads the image's index
  row once, finds the tokens sent to each of its rows, and reads each of those token rows once. The
  last ``TAIL`` rows of an index map (rows that receive a large share of the tokens: EViT's fused
  token) are summed over ``[32, 64]`` token tiles instead, one program per 64 channels.
* :func:`_weighted_merge_backward_kernel` (grid ``(B, cdiv(N, BLOCK_I))``): a program owns
  ``BLOCK_I`` input tokens and gathers the output gradient of each token's destination.

All arithmetic is float32 whatever the storage dtype (fp32/fp16/bf16); offsets are int64.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from fastprune.reference import WEIGHT_EPS

from . import KERNELS_TRACEABLE, PTR, wrap_triton  # noqa: F401  (re-exported: the launch helpers' old home)
from .aot import KernelSpec, runtime_signature

__all__ = ["weighted_merge", "weighted_merge_backward", "merge_spec", "backward_spec", "merge_grid", "wrap_triton",
           "KERNELS_TRACEABLE", "PTR"]

# ----------------------------------------------------------------------------------------------------
# Device helper
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _merge_weights(scores_row_ptr, stride_sn, size_row_ptr, stride_zn, offs, valid,
                   HAS_SIZE: tl.constexpr, SIZE_ATTN: tl.constexpr, SIZE_WEIGHT: tl.constexpr, W_EPS: tl.constexpr):
    """Merge weights and sizes (float32, 0 outside ``valid``) of the tokens at positions ``offs``.

    ``w = size`` or, with ``SIZE_ATTN``, ``w = size * max(score, W_EPS)``; size is 1 without ``HAS_SIZE``.
    Without ``SIZE_WEIGHT`` sizes stay out of the weight (``w = max(score, W_EPS)`` or 1: EViT's
    fusion weights) and are only summed.
    """
    if HAS_SIZE:
        size = tl.load(size_row_ptr + offs * stride_zn, mask=valid, other=0.0).to(tl.float32)
    else:
        size = tl.where(valid, 1.0, 0.0)
    base = size if SIZE_WEIGHT else tl.where(valid, 1.0, 0.0)
    if SIZE_ATTN:
        s = tl.load(scores_row_ptr + offs * stride_sn, mask=valid, other=0.0).to(tl.float32)
        w = base * tl.maximum(s, W_EPS)
    else:
        w = base
    return w, size


# ----------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------
#: Sentinel position of "no token" in the gather's candidate tiles (above every token position).
END = tl.constexpr(2 ** 30)


@triton.jit
def _next_token(cand, own, prev):
    """Per row of ``cand [ROWS, W]`` (token positions, ``END`` where none) and ``own [ROWS]`` (the row's
    own token, ``END`` if none): the smallest of those positions above ``prev [ROWS]`` (``END`` if none)."""
    nxt = tl.min(tl.where(cand > prev[:, None], cand, END), axis=1)
    return tl.minimum(nxt, tl.where(own > prev, own, END))


@triton.jit
def _merge_rows(x_img, stride_xn, stride_xc, score_row, stride_sn, size_row, stride_zn, index_row,
                out_img, size_out_row, wsum_row, N, C, S, R, pid_s, pid_c,
                HAS_SIZE: tl.constexpr, SIZE_ATTN: tl.constexpr, SIZE_WEIGHT: tl.constexpr,
                NORMALIZE: tl.constexpr, W_EPS: tl.constexpr, LISTS: tl.constexpr, TAIL: tl.constexpr,
                BLOCK_N: tl.constexpr, ROWS: tl.constexpr, C_SPLIT: tl.constexpr, BLOCK_C: tl.constexpr):
    """The gather of one image's output rows ``s0 .. s0 + ROWS`` (of the first ``S - TAIL``) x channels
    ``c0 .. c0 + C_SPLIT`` (``index_row``: an index map ``[N]`` or, with ``LISTS``, a plan). One program:

    1. finds the tokens of its rows: with ``LISTS`` its rows' own tokens (``ROWS`` loads) and the
       ``R`` merged tokens sent to them (a ``[ROWS, BLOCK_N >= R]`` comparison); else the index row
       (``BLOCK_N >= N`` entries) compared with its rows, ``[ROWS, BLOCK_N]``;
    2. walks the tokens of its rows in increasing position, all rows at once: round ``m`` takes the
       ``m``-th token of each row (the smallest position above the previous one) and reads its
       weight and size, giving ``W_s`` and ``size'_s``. Rounds: the most tokens any row of the tile
       receives; the first two are found together (a row keeping its own token and absorbing one
       source, the common case, costs no sequential round);
    3. for each ``BLOCK_C`` chunk of its channels, loads the first two tokens' rows at once and walks
       any later tokens again, adding ``(w_i / W_s) x_i`` in the same order: ``[ROWS, BLOCK_C]``
       gathers of the token rows (contiguous along C); a row with fewer tokens loads nothing.

    Memory traffic: every input and output row once, plus the lists (``ROWS + 2 R``) or the ``N``
    indices per program (L2). ``size'`` and ``W`` (for the backward) are stored by ``pid_c == 0``.
    """
    rows = pid_s * ROWS + tl.arange(0, ROWS)
    valid_r = rows < S - TAIL
    offs_n = tl.arange(0, BLOCK_N)
    # the positions of the tokens sent to each row (rows >= S receive nothing), END elsewhere
    if LISTS:
        own = tl.load(index_row + N + rows, mask=valid_r, other=END).to(tl.int32)
        pos = tl.load(index_row + N + S + offs_n, mask=offs_n < R, other=END).to(tl.int32)
        dest = tl.load(index_row + N + S + R + offs_n, mask=offs_n < R, other=-1).to(tl.int32)
    else:
        own = tl.full([ROWS], END, tl.int32)
        pos = offs_n
        dest = tl.load(index_row + offs_n, mask=offs_n < N, other=-1).to(tl.int32)
    cand = tl.where((dest[None, :] == rows[:, None]) & valid_r[:, None], pos[None, :], END)
    rounds = tl.max(tl.sum((cand < END).to(tl.int32), axis=1) + (own < END).to(tl.int32), axis=0)

    # 2. weight totals and sizes, summed in increasing position; the first two tokens of every row
    # are found (and their rows loaded, step 3) together, later ones one round at a time.
    first = _next_token(cand, own, tl.full([ROWS], -1, tl.int32))
    second = _next_token(cand, own, first)
    has_second = second < N
    w_first, ssum = _merge_weights(score_row, stride_sn, size_row, stride_zn, first, first < N,
                                   HAS_SIZE, SIZE_ATTN, SIZE_WEIGHT, W_EPS)
    w_second, s_second = _merge_weights(score_row, stride_sn, size_row, stride_zn, second, has_second,
                                        HAS_SIZE, SIZE_ATTN, SIZE_WEIGHT, W_EPS)
    wsum = w_first + w_second
    ssum += s_second
    prev = second
    for _m in range(2, rounds):
        cur = _next_token(cand, own, prev)
        w_cur, s_cur = _merge_weights(score_row, stride_sn, size_row, stride_zn, cur, cur < N,
                                      HAS_SIZE, SIZE_ATTN, SIZE_WEIGHT, W_EPS)
        wsum += w_cur
        ssum += s_cur
        prev = cur
    denom = tl.where(wsum > 0.0, wsum, 1.0) if NORMALIZE else tl.full([ROWS], 1.0, tl.float32)
    share_first = tl.div_rn(w_first, denom)
    share_second = tl.div_rn(w_second, denom)
    first_rows = x_img + first.to(tl.int64) * stride_xn
    second_rows = x_img + second.to(tl.int64) * stride_xn

    # 3. the weighted sum, chunk by chunk (a row's lone token: share 1, added to nothing: bit-exact).
    out_rows = out_img + rows.to(tl.int64) * C
    offs_c = tl.arange(0, BLOCK_C)
    for c0 in range(pid_c * C_SPLIT, tl.minimum(C, (pid_c + 1) * C_SPLIT), BLOCK_C):
        cmask = (c0 + offs_c) < C
        x_first = tl.load(first_rows[:, None] + (c0 + offs_c)[None, :] * stride_xc,
                          mask=(first < N)[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        x_second = tl.load(second_rows[:, None] + (c0 + offs_c)[None, :] * stride_xc,
                           mask=has_second[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        acc = share_first[:, None] * x_first
        acc = tl.where(has_second[:, None], acc + share_second[:, None] * x_second, acc)
        prev = second
        for _m in range(2, rounds):
            cur = _next_token(cand, own, prev)
            has = cur < N
            w_cur, _s = _merge_weights(score_row, stride_sn, size_row, stride_zn, cur, has,
                                       HAS_SIZE, SIZE_ATTN, SIZE_WEIGHT, W_EPS)
            x_cur = tl.load(x_img + cur.to(tl.int64)[:, None] * stride_xn + (c0 + offs_c)[None, :] * stride_xc,
                            mask=has[:, None] & cmask[None, :], other=0.0).to(tl.float32)
            acc += tl.div_rn(w_cur, denom)[:, None] * x_cur
            prev = cur
        tl.store(out_rows[:, None] + (c0 + offs_c)[None, :], acc.to(out_img.dtype.element_ty),
                 mask=valid_r[:, None] & cmask[None, :])
    if pid_c == 0:
        tl.store(size_out_row + rows, ssum, mask=valid_r)
        tl.store(wsum_row + rows, wsum, mask=valid_r)


@triton.jit
def _merge_tail(x_img, stride_xn, stride_xc, score_row, stride_sn, size_row, stride_zn, index_row,
                out_img, size_out_row, wsum_row, N, C, S, pid_t, pid_c,
                HAS_SIZE: tl.constexpr, SIZE_ATTN: tl.constexpr, SIZE_WEIGHT: tl.constexpr,
                NORMALIZE: tl.constexpr, W_EPS: tl.constexpr, BLOCK_N: tl.constexpr, C_SPLIT: tl.constexpr,
                TAIL: tl.constexpr, TAIL_PAD: tl.constexpr, TAIL_T: tl.constexpr, TAIL_C: tl.constexpr):
    """The last ``TAIL`` output rows (rows that receive many tokens: EViT's fused token) x channels
    ``c0 .. c0 + TAIL_C`` (``c0 = pid_c C_SPLIT + pid_t TAIL_C``) of one image, from an index map.

    A gather walks a row's tokens one round each; these rows take a large share of the image (EViT:
    every inattentive token), so instead the program walks all ``N`` tokens in ``[TAIL_T, TAIL_C]``
    tiles, each token read once and only if it goes to a tail row: ``W`` and ``size'`` of the tail rows
    from the whole index row at once (``[TAIL_PAD, BLOCK_N]``), then the shares ``w_i / W_d`` and
    ``sum_i share_i x_i`` tile by tile (``[TAIL_PAD, TAIL_T, TAIL_C]``, one tile sum each, tiles in
    increasing position: deterministic). Tokens of other rows add ``-0.0`` (so a lone token is copied
    bit for bit and nothing of theirs, NaN or inf, reaches a tail row).
    """
    first = S - TAIL
    slots = tl.arange(0, TAIL_PAD)
    # weight totals and sizes of the tail rows
    offs_n = tl.arange(0, BLOCK_N)
    d_all = tl.load(index_row + offs_n, mask=offs_n < N, other=-1).to(tl.int32) - first
    member = d_all[None, :] == slots[:, None]  # [TAIL_PAD, BLOCK_N]
    w_all, s_all = _merge_weights(score_row, stride_sn, size_row, stride_zn, offs_n, (offs_n < N) & (d_all >= 0),
                                  HAS_SIZE, SIZE_ATTN, SIZE_WEIGHT, W_EPS)
    wsum = tl.sum(tl.where(member, w_all[None, :], 0.0), axis=1)
    ssum = tl.sum(tl.where(member, s_all[None, :], 0.0), axis=1)
    denom = tl.where(wsum > 0.0, wsum, 1.0) if NORMALIZE else tl.full([TAIL_PAD], 1.0, tl.float32)

    c0 = pid_c * C_SPLIT + pid_t * TAIL_C
    offs_c = c0 + tl.arange(0, TAIL_C)
    cmask = (offs_c < C) & (offs_c < (pid_c + 1) * C_SPLIT)
    acc = tl.full([TAIL_PAD, TAIL_C], -0.0, tl.float32)
    for t0 in range(0, N, TAIL_T):
        offs_t = t0 + tl.arange(0, TAIL_T)
        d = tl.load(index_row + offs_t, mask=offs_t < N, other=-1).to(tl.int32) - first
        in_tail = (offs_t < N) & (d >= 0)
        w, _s = _merge_weights(score_row, stride_sn, size_row, stride_zn, offs_t, in_tail,
                               HAS_SIZE, SIZE_ATTN, SIZE_WEIGHT, W_EPS)
        m = d[None, :] == slots[:, None]  # [TAIL_PAD, TAIL_T]
        share = tl.div_rn(tl.where(m, w[None, :], 0.0), tl.where(m, denom[:, None], 1.0))
        xt = tl.load(x_img + offs_t.to(tl.int64)[:, None] * stride_xn + offs_c[None, :] * stride_xc,
                     mask=in_tail[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(tl.where(m[:, :, None], share[:, :, None] * xt[None, :, :], -0.0), axis=1)
    rows = (first + slots).to(tl.int64)
    valid_rows = slots < TAIL
    tl.store(out_img + rows[:, None] * C + offs_c[None, :], acc.to(out_img.dtype.element_ty),
             mask=valid_rows[:, None] & cmask[None, :])
    if (pid_t == 0) & (pid_c == 0):
        tl.store(size_out_row + rows, ssum, mask=valid_rows)
        tl.store(wsum_row + rows, wsum, mask=valid_rows)


@triton.jit
def _weighted_merge_kernel(
        x_ptr, stride_xb, stride_xn, stride_xc,
        scores_ptr, stride_sb, stride_sn,
        size_ptr, stride_zb, stride_zn,
        index_ptr, index_stride, out_ptr, size_out_ptr, wsum_ptr,
        N, C, S, R,
        HAS_SIZE: tl.constexpr, SIZE_ATTN: tl.constexpr, W_EPS: tl.constexpr, LISTS: tl.constexpr,
        BLOCK_N: tl.constexpr, ROWS: tl.constexpr, C_SPLIT: tl.constexpr, BLOCK_C: tl.constexpr,
        SIZE_WEIGHT: tl.constexpr, NORMALIZE: tl.constexpr, TAIL: tl.constexpr, TAIL_PAD: tl.constexpr,
        TAIL_T: tl.constexpr, TAIL_C: tl.constexpr):
    """One image (``pid_b``), tile of output rows (``pid_s``) and split of channels (``pid_c``): programs
    ``pid_s < cdiv(S - TAIL, ROWS)`` gather ``ROWS`` rows (:func:`_merge_rows`), the others sum
    ``TAIL_C`` channels of the tail rows (:func:`_merge_tail`). ``index_ptr``: index maps ``[B, N]``
    or, with ``LISTS``, plans ``[B, N + S + 2 R]`` (:func:`weighted_merge`)."""
    pid_b = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1)
    pid_c = tl.program_id(2)
    x_img, score_row, size_row = x_ptr + pid_b * stride_xb, scores_ptr + pid_b * stride_sb, size_ptr + pid_b * stride_zb
    index_row, out_img = index_ptr + pid_b * index_stride, out_ptr + pid_b * S * C
    size_out_row, wsum_row = size_out_ptr + pid_b * S, wsum_ptr + pid_b * S
    tail_program = False  # stays a constant without tail rows: only the gather is compiled
    if TAIL > 0:
        tail_program = pid_s >= tl.cdiv(S - TAIL, ROWS)
    if tail_program:
        _merge_tail(x_img, stride_xn, stride_xc, score_row, stride_sn, size_row, stride_zn, index_row, out_img,
                    size_out_row, wsum_row, N, C, S, pid_s - tl.cdiv(S - TAIL, ROWS), pid_c, HAS_SIZE, SIZE_ATTN,
                    SIZE_WEIGHT, NORMALIZE, W_EPS, BLOCK_N, C_SPLIT, TAIL, TAIL_PAD, TAIL_T, TAIL_C)
    else:
        _merge_rows(x_img, stride_xn, stride_xc, score_row, stride_sn, size_row, stride_zn, index_row, out_img,
                    size_out_row, wsum_row, N, C, S, R, pid_s, pid_c, HAS_SIZE, SIZE_ATTN, SIZE_WEIGHT, NORMALIZE,
                    W_EPS, LISTS, TAIL, BLOCK_N, ROWS, C_SPLIT, BLOCK_C)


# ----------------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _weighted_merge_backward_kernel(
        grad_out_ptr, stride_gb, stride_gn, stride_gc,
        grad_size_out_ptr, stride_hb, stride_hn,
        x_ptr, stride_xb, stride_xn, stride_xc,
        out_ptr, index_ptr, index_stride, wsum_ptr,
        scores_ptr, stride_sb, stride_sn,
        size_ptr, stride_zb, stride_zn,
        grad_x_ptr, grad_scores_ptr, grad_size_ptr,
        N, C, S,
        HAS_SIZE: tl.constexpr, SIZE_ATTN: tl.constexpr, W_EPS: tl.constexpr,
        NEED_GX: tl.constexpr, NEED_GW: tl.constexpr, NEED_GSCORES: tl.constexpr,
        NEED_GSIZE: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_C: tl.constexpr,
        SIZE_WEIGHT: tl.constexpr, NORMALIZE: tl.constexpr):
    """Gradients of the weighted merge for one tile of ``BLOCK_I`` input tokens of one image.

    With ``d = index[b, i]``, ``share_i = w_i / W_d`` and ``g = dL/dx'``, one program computes, in
    ``BLOCK_C`` chunks of channels:

    * ``dL/dx_i = share_i * g[d]`` (stored in x's dtype);
    * ``dL/dw_i = <g[d], x_i - x'_d> / W_d`` (since ``dx'_d/dw_i = (x_i - x'_d) / W_d``), then maps it
      onto the inputs of ``w``: ``dL/dscore_i = dL/dw_i * size_i * [score_i >= eps]`` (``size_attn``)
      and ``dL/dsize_i = dL/dw_i * dw_i/dsize_i + dL/dsize'_d`` (sizes add up).

    Each input token belongs to exactly one destination, so every gradient element is written by one
    program: no atomics. Memory traffic per program: ``BLOCK_I`` rows of ``g`` (gathered), ``x`` and
    ``x'`` (gathered, only when a weight gradient is needed), ``BLOCK_I`` rows of ``dL/dx`` written.
    ``x'`` is the stored output, so for half-precision tokens ``dL/dw`` carries that rounding.
    """
    pid_b = tl.program_id(0).to(tl.int64)
    pid_i = tl.program_id(1)
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    valid_i = offs_i < N
    score_row = scores_ptr + pid_b * stride_sb
    size_row = size_ptr + pid_b * stride_zb
    dest = tl.load(index_ptr + pid_b * index_stride + offs_i, mask=valid_i, other=0).to(tl.int64)
    wsum = tl.load(wsum_ptr + pid_b * S + dest, mask=valid_i, other=1.0)
    w, size = _merge_weights(score_row, stride_sn, size_row, stride_zn, offs_i, valid_i,
                             HAS_SIZE, SIZE_ATTN, SIZE_WEIGHT, W_EPS)
    share = tl.div_rn(w, wsum) if NORMALIZE else w  # IEEE, as in the forward: a lone token's gradient is g

    offs_c = tl.arange(0, BLOCK_C)
    rows_i = offs_i.to(tl.int64)
    dw = tl.zeros([BLOCK_I], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cmask = (c0 + offs_c) < C
        mask = valid_i[:, None] & cmask[None, :]
        g = tl.load(grad_out_ptr + pid_b * stride_gb + dest[:, None] * stride_gn + (c0 + offs_c)[None, :] * stride_gc,
                    mask=mask, other=0.0).to(tl.float32)
        if NEED_GX:
            tl.store(grad_x_ptr + (pid_b * N + rows_i)[:, None] * C + (c0 + offs_c)[None, :],
                     (share[:, None] * g).to(grad_x_ptr.dtype.element_ty), mask=mask)
        if NEED_GW:
            xi = tl.load(x_ptr + pid_b * stride_xb + rows_i[:, None] * stride_xn + (c0 + offs_c)[None, :] * stride_xc,
                         mask=mask, other=0.0).to(tl.float32)
            if NORMALIZE:
                xd = tl.load(out_ptr + (pid_b * S + dest)[:, None] * C + (c0 + offs_c)[None, :],
                             mask=mask, other=0.0).to(tl.float32)
                dw += tl.sum(g * (xi - xd), axis=1)
            else:
                dw += tl.sum(g * xi, axis=1)

    if NEED_GW:
        gw = tl.div_rn(dw, wsum) if NORMALIZE else dw
        # dw/dsize: 0 when sizes stay out of the weights
        if SIZE_ATTN:
            s = tl.load(score_row + offs_i * stride_sn, mask=valid_i, other=0.0).to(tl.float32)
            if NEED_GSCORES:
                dw_ds = size if SIZE_WEIGHT else 1.0
                tl.store(grad_scores_ptr + pid_b * N + offs_i, tl.where(s >= W_EPS, gw * dw_ds, 0.0), mask=valid_i)
            gw_size = gw * tl.maximum(s, W_EPS) if SIZE_WEIGHT else tl.zeros_like(gw)
        else:
            gw_size = gw if SIZE_WEIGHT else tl.zeros_like(gw)
        if NEED_GSIZE:
            gso = tl.load(grad_size_out_ptr + pid_b * stride_hb + dest * stride_hn, mask=valid_i,
                          other=0.0).to(tl.float32)
            tl.store(grad_size_ptr + pid_b * N + offs_i, gw_size + gso, mask=valid_i)


# ----------------------------------------------------------------------------------------------------
# Launch configuration (shared with the ahead-of-time compile specs below)
# ----------------------------------------------------------------------------------------------------
def merge_config(N: int, C: int, has_size: bool, size_attn: bool, R: Optional[int] = None, *,
                 size_weight: bool = True, normalize: bool = True, tail: int = 0) -> tuple[dict, int]:
    """Constants and num_warps of the gather for ``N`` tokens of ``C`` channels; ``R``: merged tokens of
    a merge plan (compact lists), None for an index map; ``tail``: last output rows summed densely.

    Index map: 4 rows x up to 768 channels a program in ``[4, 256]`` chunks (the index scan and the
    weight totals once per row tile; 64 registers on sm_90 at N = 197, 4 warps: 8 programs per SM).
    Lists: no scan, so 8 rows x up to 768 channels in ``[8, 128]`` chunks (twice the rows for the same
    latency chain). Tail rows: 64 channels a program (32 for 9 to 16 rows), tokens in tiles of up to 32,
    at most 4096 products a step (EViT's one row: ``[1, 32, 64]``). Two or more tail rows cost registers
    (112-156 on sm_90 for 2-16 rows, against 64-80 for one): BAT's clusters are gathered.
    """
    if R is None:
        block_n, rows, block_c = max(16, triton.next_power_of_2(N)), 4, min(256, max(16, triton.next_power_of_2(C)))
    else:
        block_n, rows, block_c = max(16, triton.next_power_of_2(R)), 8, min(128, max(16, triton.next_power_of_2(C)))
    tail_pad = triton.next_power_of_2(max(1, tail))
    consts = dict(HAS_SIZE=has_size, SIZE_ATTN=size_attn, W_EPS=WEIGHT_EPS, LISTS=R is not None, BLOCK_N=block_n,
                  ROWS=rows, C_SPLIT=(3 if R is None else 6) * block_c, BLOCK_C=block_c,
                  SIZE_WEIGHT=size_weight, NORMALIZE=normalize, TAIL=tail, TAIL_PAD=tail_pad,
                  TAIL_C=64 if tail_pad <= 8 else 32)
    consts["TAIL_T"] = min(32, 4096 // (tail_pad * consts["TAIL_C"]))  # [TAIL_PAD, TAIL_T, TAIL_C]: 4096
    return consts, (4 if block_n <= 256 else 8)


def merge_grid(B: int, C: int, S: int, consts: dict) -> tuple[int, int, int]:
    """The launch grid of :func:`_weighted_merge_kernel`: row tiles of the first ``S - TAIL`` rows, then
    the tail's programs (``TAIL_C`` channels each of every split), by channel splits."""
    tail, split = consts["TAIL"], consts["C_SPLIT"]
    tail_programs = triton.cdiv(min(split, C), consts["TAIL_C"]) if tail else 0
    return B, triton.cdiv(S - tail, consts["ROWS"]) + tail_programs, triton.cdiv(C, split)


def backward_config(has_size: bool, size_attn: bool, need_gx: bool, need_gscores: bool,
                    need_gsize: bool, *, size_weight: bool = True, normalize: bool = True) -> tuple[dict, int]:
    """``[16, 64]`` tiles, 8 warps: 40 registers on sm_90 as the JIT specialises it (104 generic)."""
    consts = dict(HAS_SIZE=has_size, SIZE_ATTN=size_attn, W_EPS=WEIGHT_EPS, NEED_GX=need_gx,
                  NEED_GW=need_gscores or need_gsize, NEED_GSCORES=need_gscores, NEED_GSIZE=need_gsize,
                  BLOCK_I=16, BLOCK_C=64, SIZE_WEIGHT=size_weight, NORMALIZE=normalize)
    return consts, 8


# ----------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------
def weighted_merge(x: torch.Tensor, scores: Optional[torch.Tensor], size: Optional[torch.Tensor],
                   index: torch.Tensor, n_out: int, size_attn: bool, *, traceable: bool = False,
                   size_weight: bool = True, normalize: bool = True,
                   tail: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward launch: ``(x' [B, S, C] in x's dtype, size' [B, S] fp32, W [B, S] fp32)``, ``S = n_out``.

    ``x [B, N, C]`` any strides; ``scores [B, N]`` fp32 (read only with ``size_attn``; may be None
    without it); ``size [B, N]`` fp32 or None for ones; ``index`` int64 with unit inner stride: an
    index map ``[B, N]`` (values in ``[0, S)``), or a *merge plan* ``[B, N + S + 2 R]`` from a
    selection: the index map, then compact lists (the own token of every output row, the ``R``
    tokens merged into other rows in increasing position, their output rows). MSTM and ToMe pass
    plans, BAT and EViT index maps. ``traceable=True`` launches through :func:`wrap_triton` (inside a
    ``triton_op``), False directly (eager callers: autograd Functions). ``size_weight=False``: sizes
    are summed but stay out of the weights (``w = max(score, eps)`` with ``size_attn``, else 1);
    ``normalize=False``: ``x'_d = sum_i w_i x_i``; ``tail``: with an index map, the last ``tail`` rows
    receive many tokens (EViT's fused token) and are summed densely.
    """
    B, N, C = x.shape
    R = None if index.shape[1] == N else (index.shape[1] - N - n_out) // 2
    if tail and R is not None:
        raise ValueError("tail rows need an index map, not a merge plan")
    out = torch.empty(B, n_out, C, dtype=x.dtype, device=x.device)
    size_out = torch.empty(B, n_out, dtype=torch.float32, device=x.device)
    wsum = torch.empty(B, n_out, dtype=torch.float32, device=x.device)
    sc = size_out if scores is None else scores  # valid pointers when unused (never read then)
    sz = sc if size is None else size
    consts, num_warps = merge_config(N, C, size is not None, size_attn, R, size_weight=size_weight,
                                     normalize=normalize, tail=tail)
    grid = merge_grid(B, C, n_out, consts)
    kernel = wrap_triton(_weighted_merge_kernel) if traceable else _weighted_merge_kernel
    kernel[grid](
        x, x.stride(0), x.stride(1), x.stride(2),
        sc, sc.stride(0), sc.stride(1),
        sz, sz.stride(0), sz.stride(1),
        index, index.stride(0), out, size_out, wsum, N, C, n_out, R or 0, **consts, num_warps=num_warps)
    return out, size_out, wsum


def weighted_merge_backward(grad_out, grad_size_out, x, out, index, wsum, scores, size, size_attn: bool,
                            need_gx: bool, need_gscores: bool, need_gsize: bool, *, traceable: bool = False,
                            size_weight: bool = True, normalize: bool = True):
    """The backward launch: ``(grad_x [B, N, C] in x's dtype, grad_scores [B, N], grad_size [B, N])``
    (float32), None for those not asked for.

    ``out`` and ``wsum`` are :func:`weighted_merge`'s (contiguous), ``index`` its index map or plan;
    ``grad_size_out`` may be None (zeros), ``scores`` None without ``size_attn``. ``traceable``,
    ``size_weight``, ``normalize``: as for :func:`weighted_merge`.
    """
    B, N, C = x.shape
    S = out.shape[1]
    if grad_size_out is None:
        grad_size_out = torch.zeros_like(wsum)
    grad_x = torch.empty_like(x, memory_format=torch.contiguous_format) if need_gx else None
    grad_scores = torch.empty(B, N, dtype=torch.float32, device=x.device) if need_gscores else None
    grad_size = torch.empty(B, N, dtype=torch.float32, device=x.device) if need_gsize else None
    sc = wsum if scores is None else scores
    sz = sc if size is None else size
    consts, num_warps = backward_config(size is not None, size_attn, need_gx, need_gscores, need_gsize,
                                        size_weight=size_weight, normalize=normalize)
    grid = (B, triton.cdiv(N, consts["BLOCK_I"]))
    kernel = wrap_triton(_weighted_merge_backward_kernel) if traceable else _weighted_merge_backward_kernel
    kernel[grid](
        grad_out, grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
        grad_size_out, grad_size_out.stride(0), grad_size_out.stride(1),
        x, x.stride(0), x.stride(1), x.stride(2),
        out, index, index.stride(0), wsum,
        sc, sc.stride(0), sc.stride(1),
        sz, sz.stride(0), sz.stride(1),
        # pointers of gradients not asked for are never written (NEED_* constexprs)
        x if grad_x is None else grad_x,
        wsum if grad_scores is None else grad_scores,
        wsum if grad_size is None else grad_size,
        N, C, S, **consts, num_warps=num_warps)
    return grad_x, grad_scores, grad_size


# ----------------------------------------------------------------------------------------------------
# Ahead-of-time compile specs: each method file registers the instantiations its launcher uses
# ----------------------------------------------------------------------------------------------------
def merge_spec(name: str, dtype: torch.dtype, has_size: bool, size_attn: bool, N: int = 197,
               C: int = 768, R: Optional[int] = 13, **options) -> KernelSpec:
    """The forward kernel as :func:`weighted_merge` launches it for ``N`` tokens of ``C`` channels and a
    plan of ``R`` merged tokens (None: an index map); ``options``: :func:`merge_config`'s keywords."""
    t = PTR[dtype]
    consts, warps = merge_config(N, C, has_size, size_attn, R, **options)
    return KernelSpec(name, _weighted_merge_kernel, runtime_signature(
        _weighted_merge_kernel, consts, x_ptr=t, scores_ptr="*fp32", size_ptr="*fp32", index_ptr="*i64",
        out_ptr=t, size_out_ptr="*fp32", wsum_ptr="*fp32"), consts, warps)


def backward_spec(name: str, dtype: torch.dtype, has_size: bool, size_attn: bool, need_gx: bool = True,
                  need_gscores: bool = True, need_gsize: bool = True, **options) -> KernelSpec:
    """The backward kernel as :func:`weighted_merge_backward` launches it; ``options``:
    :func:`backward_config`'s keywords."""
    t = PTR[dtype]
    consts, warps = backward_config(has_size, size_attn, need_gx, need_gscores, need_gsize, **options)
    return KernelSpec(name, _weighted_merge_backward_kernel, runtime_signature(
        _weighted_merge_backward_kernel, consts, grad_out_ptr=t, grad_size_out_ptr="*fp32", x_ptr=t, out_ptr=t,
        index_ptr="*i64", wsum_ptr="*fp32", scores_ptr="*fp32", size_ptr="*fp32", grad_x_ptr=t,
        grad_scores_ptr="*fp32", grad_size_ptr="*fp32"), consts, warps)
