"""Fused MSTM token merging: Triton kernels, their launchers and the autograd Function.

Semantics: "Multi-Scale And Token Mergence: Make Your ViT More Efficient" (Bian et al., 2023),
written out step by step in :func:`fastprune.reference.mstm_merge`, which
this file reproduces exactly (same selection, same matching, same index map, same merge arithmetic):

1. **top-k selection**: keep the prefix tokens and the ``N - p - r`` non-prefix tokens with the largest
   class attention (ties: lower index);
2. **cosine matching**: every other token (a *source*) is matched to the kept non-prefix token it is
   most cosine-similar to on ``metric`` (ties: lower index);
3. **weighted merge**: ``x'_d = sum_{i -> d} (w_i / W_d) x_i`` with ``W_d = sum_{i -> d} w_i``, where
   ``w = size`` or ``w = size * max(cls attention, WEIGHT_EPS)``; sizes add up. Each weight is divided
   by its destination's total *before* summing, so a kept token that absorbs nothing comes out
   bit-identical.

Forward = two kernel launches, no host synchronisation, no sort, no memset:

* :func:`_mstm_select_match_kernel` (grid ``(B, cdiv(N, BLOCK_I))``): top-k threshold by a bitwise
  search over unique integer keys, output slots, and the cosine argmax of the sources; writes the index
  map ``[B, N]``.
* :func:`_mstm_weighted_merge_kernel` (grid ``(B, cdiv(N - r, ROWS))``): the weighted merge as a
  gather (each output row reads the tokens sent to it, x is read once), plus the merged sizes and
  weight totals.

Backward = one launch, :func:`_mstm_merge_backward_kernel` (grid ``(B, cdiv(N, BLOCK_I))``): gradients
w.r.t. ``x``, and w.r.t. the merge weights, mapped in-kernel onto ``scores`` (``weight="size_attn"``)
and ``size``. Selection and matching are not differentiable (no gradient reaches ``metric``).

All arithmetic is float32 whatever the storage dtype (fp32/fp16/bf16): values are converted on load
and converted back on store. Deterministic, no atomics.

The launches are PyTorch operators (``torch.library.triton_op``, launches through ``wrap_triton``), each
with a fake kernel, and autograd registered on the weighted merge:
``torch.ops.fastprune.mstm_select_match_triton``, ``mstm_weighted_merge_triton`` and
``mstm_weighted_merge_triton_backward``. ``torch.compile(fullgraph=True)`` traces through them without a
graph break and Inductor sees the Triton kernels; CUDA graphs capture them (no host synchronisation);
``torch.export`` keeps each operator as one node. Under the Triton interpreter they are plain
``torch.library.custom_op`` operators with the same schema (interpreted kernels cannot be traced).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from fastprune.reference import COSINE_EPS, WEIGHT_EPS, Merged

from . import check_triton_device, interpreting
from .aot import KernelSpec, register

__all__ = ["mstm_merge_triton"]


# ----------------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _selection_keys(scores_row_ptr, stride_sn, offs, N, P, IDX_BITS: tl.constexpr):
    """Unique, order-preserving int64 keys of the scores at token positions ``offs`` ([BLOCK] int32).

    ``key = mono(score) << IDX_BITS | (N - 1 - i)``, where ``mono`` maps the float32 bit pattern to an
    unsigned 32-bit integer with the same order (``-0.0`` is first made ``+0.0`` so both compare
    equal, as floats do). The low bits make keys unique and put the lower index first among equal
    scores. Prefix tokens get a key above every score (``mono = 2**32``); positions ``>= N`` get -1.
    """
    valid = offs < N
    s = tl.load(scores_row_ptr + offs * stride_sn, mask=valid, other=0.0).to(tl.float32)
    s = tl.where(s == 0.0, 0.0, s)  # -0.0 -> +0.0
    bits = s.to(tl.int32, bitcast=True).to(tl.int64)
    mono = tl.where(bits >= 0, bits + 2147483648, 2147483647 - (bits & 2147483647))
    mono = tl.where(offs < P, 4294967296, mono)
    key = (mono << IDX_BITS) + (N - 1 - offs).to(tl.int64)
    return tl.where(valid, key, -1)


@triton.jit
def _merge_weights(scores_row_ptr, stride_sn, size_row_ptr, stride_zn, offs, valid,
                   HAS_SIZE: tl.constexpr, SIZE_ATTN: tl.constexpr, W_EPS: tl.constexpr):
    """Merge weights and sizes (float32, 0 outside ``valid``) of the tokens at positions ``offs``.

    ``w = size`` or, with ``SIZE_ATTN``, ``w = size * max(score, W_EPS)``; size is 1 without ``HAS_SIZE``.
    """
    if HAS_SIZE:
        size = tl.load(size_row_ptr + offs * stride_zn, mask=valid, other=0.0).to(tl.float32)
    else:
        size = tl.where(valid, 1.0, 0.0)
    if SIZE_ATTN:
        s = tl.load(scores_row_ptr + offs * stride_sn, mask=valid, other=0.0).to(tl.float32)
        w = size * tl.maximum(s, W_EPS)
    else:
        w = size
    return w, size


# ----------------------------------------------------------------------------------------------------
# Launch 1: top-k selection + cosine matching -> index map
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _mstm_select_match_kernel(
        scores_ptr, stride_sb, stride_sn,
        metric_ptr, stride_mb, stride_mn, stride_mc,
        index_ptr,
        N, CM, P, K,
        BLOCK_N: tl.constexpr, IDX_BITS: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
        BLOCK_CM: tl.constexpr, COS_EPS: tl.constexpr):
    """Top-k selection and cosine matching for one tile of ``BLOCK_I`` tokens of one image.

    One program (image ``b``, tokens ``i`` in its tile):

    1. loads the image's whole score row (``BLOCK_N`` >= N, a power of two) as unique int64 keys
       (:func:`_selection_keys`) and finds ``T``, the ``K``-th largest key (``K = N - r`` kept tokens,
       prefix included), by a greedy bitwise search: for each bit from high to low, keep it in ``T``
       if at least ``K`` keys are ``>= T | bit``. ``33 + IDX_BITS`` row reductions, no sort. A token
       is kept iff ``key >= T``;
    2. kept tokens (prefix included) get their output slot: kept tokens before the tile plus an
       inclusive cumsum inside the tile, minus one;
    3. if the tile holds a source, loops over tiles of ``BLOCK_J`` candidate tokens ``j``: cosine
       similarity ``<m_i, m_j> / (max(|m_i|, eps) max(|m_j|, eps))`` accumulated over ``BLOCK_CM``
       chunks of the metric with an fp32 ``tl.dot`` (``[BLOCK_I, BLOCK_CM] x [BLOCK_CM, BLOCK_J]``,
       IEEE precision), masked to kept non-prefix ``j``, with a running argmax (strictly greater
       replaces, so ties go to the lower index) that tracks the winner's output slot;
    4. writes ``index[b, i]``: its slot for a kept token, the winner's slot for a source.

    Memory traffic per program: the score row (``4 N`` bytes, read again tile by tile in step 3) plus,
    only for tiles that hold a source, the metric of all N tokens (``N Cm`` elements) and the tile's own
    metric once per candidate tile (``BLOCK_I Cm`` elements, from L1/L2); writes ``8 BLOCK_I`` bytes.
    The metric re-reads across the ``cdiv(N, BLOCK_I)`` programs of an image hit L2. Compute:
    ``(33 + IDX_BITS) BLOCK_N`` key comparisons and ``2 BLOCK_I N Cm`` FLOPs for a tile with a source.
    """
    pid_b = tl.program_id(0).to(tl.int64)
    pid_i = tl.program_id(1)
    score_row = scores_ptr + pid_b * stride_sb
    metric_row = metric_ptr + pid_b * stride_mb

    # 1. threshold key: the K-th largest key of the row.
    offs_n = tl.arange(0, BLOCK_N)
    keys = _selection_keys(score_row, stride_sn, offs_n, N, P, IDX_BITS)
    thresh = pid_b * 0  # int64 scalar 0: every valid key is >= 0
    bit = (thresh + 1) << (32 + IDX_BITS)  # highest bit a key can have
    for _ in range(33 + IDX_BITS):
        cand = thresh | bit
        count = tl.sum((keys >= cand).to(tl.int32), axis=0)
        thresh = tl.where(count >= K, cand, thresh)
        bit = bit >> 1

    # 2. output slots of the tile's kept tokens.
    i_start = pid_i * BLOCK_I
    offs_i = i_start + tl.arange(0, BLOCK_I)
    valid_i = offs_i < N
    kept_i = _selection_keys(score_row, stride_sn, offs_i, N, P, IDX_BITS) >= thresh
    kept_before = tl.sum(((keys >= thresh) & (offs_n < i_start)).to(tl.int32), axis=0)
    slot_i = kept_before + tl.cumsum(kept_i.to(tl.int32), axis=0) - 1

    # 3. cosine argmax of the tile's sources over kept non-prefix tokens.
    best_sim = tl.full([BLOCK_I], float("-inf"), tl.float32)
    best_slot = tl.zeros([BLOCK_I], tl.int32) + P
    n_sources = tl.sum((valid_i & (kept_i == 0)).to(tl.int32), axis=0)
    if n_sources > 0:
        offs_c = tl.arange(0, BLOCK_CM)
        sq_i = tl.zeros([BLOCK_I], tl.float32)
        for c0 in range(0, CM, BLOCK_CM):
            cmask = (c0 + offs_c) < CM
            m_i = tl.load(metric_row + offs_i[:, None] * stride_mn + (c0 + offs_c)[None, :] * stride_mc,
                          mask=valid_i[:, None] & cmask[None, :], other=0.0).to(tl.float32)
            sq_i += tl.sum(m_i * m_i, axis=1)
        norm_i = tl.maximum(tl.sqrt(sq_i), COS_EPS)

        kept_seen = tl.sum(kept_i.to(tl.int32), axis=0) * 0  # int32 scalar 0
        for j0 in range(0, N, BLOCK_J):
            offs_j = j0 + tl.arange(0, BLOCK_J)
            valid_j = offs_j < N
            kept_j = _selection_keys(score_row, stride_sn, offs_j, N, P, IDX_BITS) >= thresh
            candidate_j = kept_j & (offs_j >= P)
            slot_j = kept_seen + tl.cumsum(kept_j.to(tl.int32), axis=0) - 1
            kept_seen += tl.sum(kept_j.to(tl.int32), axis=0)

            dots = tl.zeros([BLOCK_I, BLOCK_J], tl.float32)
            sq_j = tl.zeros([BLOCK_J], tl.float32)
            for c0 in range(0, CM, BLOCK_CM):
                cmask = (c0 + offs_c) < CM
                m_i = tl.load(metric_row + offs_i[:, None] * stride_mn + (c0 + offs_c)[None, :] * stride_mc,
                              mask=valid_i[:, None] & cmask[None, :], other=0.0).to(tl.float32)
                m_jt = tl.load(metric_row + offs_j[None, :] * stride_mn + (c0 + offs_c)[:, None] * stride_mc,
                               mask=cmask[:, None] & valid_j[None, :], other=0.0).to(tl.float32)
                dots += tl.dot(m_i, m_jt, input_precision="ieee")
                sq_j += tl.sum(m_jt * m_jt, axis=0)
            norm_j = tl.maximum(tl.sqrt(sq_j), COS_EPS)
            sim = dots / (norm_i[:, None] * norm_j[None, :])
            sim = tl.where(candidate_j[None, :], sim, float("-inf"))
            tile_best = tl.max(sim, axis=1)
            # slots grow with j among kept tokens: the smallest slot among the maxima is the lowest j.
            tile_slot = tl.min(tl.where(sim == tile_best[:, None], slot_j[None, :], 2147483647), axis=1)
            better = tile_best > best_sim
            best_slot = tl.where(better, tile_slot, best_slot)
            best_sim = tl.where(better, tile_best, best_sim)

    # 4. the index map.
    index = tl.where(kept_i, slot_i, best_slot)
    tl.store(index_ptr + pid_b * N + offs_i, index.to(tl.int64), mask=valid_i)


# ----------------------------------------------------------------------------------------------------
# Launch 2: weighted merge
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _mstm_weighted_merge_kernel(
        x_ptr, stride_xb, stride_xn, stride_xc,
        scores_ptr, stride_sb, stride_sn,
        size_ptr, stride_zb, stride_zn,
        index_ptr, out_ptr, size_out_ptr, wsum_ptr,
        N, C, S,
        HAS_SIZE: tl.constexpr, SIZE_ATTN: tl.constexpr, W_EPS: tl.constexpr,
        BLOCK_N: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    """Weighted merge of ``ROWS`` output tokens of one image, as a gather.

    One program (image ``b``, output tokens ``s0 .. s0 + ROWS``) loads the image's index map and merge
    weights once (``BLOCK_N >= N`` entries), then for each of its output tokens ``s``:

    1. ``W_s = sum_{i -> s} w_i`` and ``size'_s = sum_{i -> s} size_i`` (vector reductions);
    2. walks the tokens sent to ``s`` in increasing position and accumulates ``(w_i / W_s) x_i``
       over all channels (``BLOCK_C`` at a time), reading each contributing row once.

    Every input row belongs to exactly one output, so x is read once and the output written once:
    ``B (N + S) C`` elements, plus ``N`` indices, scores and sizes per program (from L2 after the
    first program of an image). Nothing is multiplied by a zero weight, so a NaN or inf in one token
    reaches only the output it is merged into. ``w_i / W_s`` is an IEEE division (``tl.div_rn``): a
    token that absorbs nothing has share exactly 1 and is copied bit-exactly. The program stores
    ``size'_s`` and ``W_s`` (float32; ``W`` is kept for the backward pass).
    """
    pid_b = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1)
    score_row = scores_ptr + pid_b * stride_sb
    size_row = size_ptr + pid_b * stride_zb
    x_row = x_ptr + pid_b * stride_xb
    out_row = out_ptr + pid_b * S * C
    offs_n = tl.arange(0, BLOCK_N)
    valid_n = offs_n < N
    dest = tl.load(index_ptr + pid_b * N + offs_n, mask=valid_n, other=-1).to(tl.int32)
    w, size = _merge_weights(score_row, stride_sn, size_row, stride_zn, offs_n, valid_n,
                             HAS_SIZE, SIZE_ATTN, W_EPS)
    offs_c = tl.arange(0, BLOCK_C)
    for j in range(ROWS):
        s_out = pid_s * ROWS + j
        if s_out < S:
            hit = dest == s_out
            wsum = tl.sum(tl.where(hit, w, 0.0), axis=0)
            ssum = tl.sum(tl.where(hit, size, 0.0), axis=0)
            n_in = tl.sum(hit.to(tl.int32), axis=0)
            denom = tl.where(wsum > 0.0, wsum, 1.0)
            for c0 in range(0, C, BLOCK_C):
                cmask = (c0 + offs_c) < C
                acc = tl.zeros([BLOCK_C], tl.float32)
                prev = -1
                for _t in range(n_in):
                    i = tl.min(tl.where(hit & (offs_n > prev), offs_n, BLOCK_N), axis=0)
                    w_i = tl.sum(tl.where(offs_n == i, w, 0.0), axis=0)
                    xi = tl.load(x_row + i.to(tl.int64) * stride_xn + (c0 + offs_c) * stride_xc,
                                 mask=cmask, other=0.0).to(tl.float32)
                    acc += tl.div_rn(w_i, denom) * xi
                    prev = i
                tl.store(out_row + s_out.to(tl.int64) * C + c0 + offs_c, acc.to(out_ptr.dtype.element_ty),
                         mask=cmask)
            tl.store(size_out_ptr + pid_b * S + s_out, ssum)
            tl.store(wsum_ptr + pid_b * S + s_out, wsum)


# ----------------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _mstm_merge_backward_kernel(
        grad_out_ptr, stride_gb, stride_gn, stride_gc,
        grad_size_out_ptr, stride_hb, stride_hn,
        x_ptr, stride_xb, stride_xn, stride_xc,
        out_ptr, index_ptr, wsum_ptr,
        scores_ptr, stride_sb, stride_sn,
        size_ptr, stride_zb, stride_zn,
        grad_x_ptr, grad_scores_ptr, grad_size_ptr,
        N, C, S,
        HAS_SIZE: tl.constexpr, SIZE_ATTN: tl.constexpr, W_EPS: tl.constexpr,
        NEED_GX: tl.constexpr, NEED_GW: tl.constexpr, NEED_GSCORES: tl.constexpr,
        NEED_GSIZE: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_C: tl.constexpr):
    """Gradients of the weighted merge for one tile of ``BLOCK_I`` input tokens of one image.

    With ``d = index[b, i]``, ``share_i = w_i / W_d`` and ``g = dL/dx'``, one program computes, in
    ``BLOCK_C`` chunks of channels:

    * ``dL/dx_i = share_i * g[d]`` (stored in x's dtype);
    * ``dL/dw_i = <g[d], x_i - x'_d> / W_d`` (since ``dx'_d/dw_i = (x_i - x'_d) / W_d``), then maps it
      onto the inputs of ``w``: ``dL/dscore_i = dL/dw_i * size_i * [score_i >= eps]`` (``size_attn``)
      and ``dL/dsize_i = dL/dw_i * dw_i/dsize_i + dL/dsize'_d`` (sizes add up).

    Each input token belongs to exactly one destination, so every output element is written by one
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
    dest = tl.load(index_ptr + pid_b * N + offs_i, mask=valid_i, other=0)
    wsum = tl.load(wsum_ptr + pid_b * S + dest, mask=valid_i, other=1.0)
    w, size = _merge_weights(score_row, stride_sn, size_row, stride_zn, offs_i, valid_i,
                             HAS_SIZE, SIZE_ATTN, W_EPS)
    share = tl.div_rn(w, wsum)  # IEEE, as in the forward: a lone token's gradient is g exactly

    offs_c = tl.arange(0, BLOCK_C)
    dw = tl.zeros([BLOCK_I], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cmask = (c0 + offs_c) < C
        mask = valid_i[:, None] & cmask[None, :]
        g = tl.load(grad_out_ptr + pid_b * stride_gb + dest[:, None] * stride_gn + (c0 + offs_c)[None, :] * stride_gc,
                    mask=mask, other=0.0).to(tl.float32)
        if NEED_GX:
            gx = share[:, None] * g
            tl.store(grad_x_ptr + pid_b * N * C + offs_i[:, None] * C + (c0 + offs_c)[None, :],
                     gx.to(grad_x_ptr.dtype.element_ty), mask=mask)
        if NEED_GW:
            xi = tl.load(x_ptr + pid_b * stride_xb + offs_i[:, None] * stride_xn + (c0 + offs_c)[None, :] * stride_xc,
                         mask=mask, other=0.0).to(tl.float32)
            xd = tl.load(out_ptr + pid_b * S * C + dest[:, None] * C + (c0 + offs_c)[None, :],
                         mask=mask, other=0.0).to(tl.float32)
            dw += tl.sum(g * (xi - xd), axis=1)

    if NEED_GW:
        gw = tl.div_rn(dw, wsum)
        if SIZE_ATTN:
            s = tl.load(score_row + offs_i * stride_sn, mask=valid_i, other=0.0).to(tl.float32)
            if NEED_GSCORES:
                tl.store(grad_scores_ptr + pid_b * N + offs_i, tl.where(s >= W_EPS, gw * size, 0.0), mask=valid_i)
            gw_size = gw * tl.maximum(s, W_EPS)
        else:
            gw_size = gw
        if NEED_GSIZE:
            gso = tl.load(grad_size_out_ptr + pid_b * stride_hb + dest * stride_hn, mask=valid_i,
                          other=0.0).to(tl.float32)
            tl.store(grad_size_ptr + pid_b * N + offs_i, gw_size + gso, mask=valid_i)


# ----------------------------------------------------------------------------------------------------
# Launch configuration (shared with the ahead-of-time compile specs below)
# ----------------------------------------------------------------------------------------------------
def _select_match_config(N: int) -> tuple[dict, int]:
    """Compile-time constants and num_warps of the select+match kernel for ``N`` tokens."""
    block_n = max(16, triton.next_power_of_2(N))
    small = block_n <= 1024  # larger rows: more warps for the row reductions, bigger tiles to amortise them
    consts = dict(BLOCK_N=block_n, IDX_BITS=block_n.bit_length() - 1, BLOCK_I=16 if small else 32, BLOCK_J=16,
                  BLOCK_CM=32, COS_EPS=COSINE_EPS)
    return consts, (4 if small else 8)


def _merge_config(N: int, C: int, has_size: bool, size_attn: bool) -> tuple[dict, int]:
    """The gather merge: the whole index row in one tile, 16 output rows a program, up to 1024 channels
    at a time (a [BLOCK_C] fp32 accumulator)."""
    block_n = max(16, triton.next_power_of_2(N))
    block_c = min(1024, max(16, triton.next_power_of_2(C)))
    consts = dict(HAS_SIZE=has_size, SIZE_ATTN=size_attn, W_EPS=WEIGHT_EPS, BLOCK_N=block_n, ROWS=16,
                  BLOCK_C=block_c)
    return consts, (4 if block_c * block_n <= 256 * 1024 else 8)


def _backward_config(has_size: bool, size_attn: bool, need_gx: bool, need_gscores: bool,
                     need_gsize: bool) -> tuple[dict, int]:
    consts = dict(HAS_SIZE=has_size, SIZE_ATTN=size_attn, W_EPS=WEIGHT_EPS, NEED_GX=need_gx,
                  NEED_GW=need_gscores or need_gsize, NEED_GSCORES=need_gscores, NEED_GSIZE=need_gsize,
                  BLOCK_I=16, BLOCK_C=32)
    return consts, 4


# ----------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------


#: Whether ``@triton.jit`` made interpreted kernels: Triton reads ``TRITON_INTERPRET`` once, when this
#: module's kernels are decorated, so later changes of the variable do not change what they are.
_KERNELS_INTERPRETED = interpreting()
#: Compiled kernels and a torch with ``triton_op``/``wrap_triton`` (2.6+): launches can be traced.
_KERNELS_TRACEABLE = (not _KERNELS_INTERPRETED and hasattr(torch.library, "triton_op")
                      and hasattr(torch.library, "wrap_triton"))


def wrap_triton(kernel):
    """``torch.library.wrap_triton(kernel)``: the kernel, launchable so that tracing records it.

    Inside a :func:`torch.library.triton_op` this makes the launch visible to ``torch.compile``
    (Inductor schedules the kernel itself, CUDA graphs capture it) and to ``make_fx``; in a plain
    eager call of the op, torch hands back the kernel unchanged. Under the Triton interpreter
    (``TRITON_INTERPRET=1``), or with a torch older than 2.6, the kernel is returned as it is: an
    interpreted kernel carries none of the compiled metadata torch's wrapper needs (older torch
    releases reject it outright), and the operators are then opaque custom ops anyway (see
    :data:`_define_op`).
    """
    if not _KERNELS_TRACEABLE:
        return kernel
    return torch.library.wrap_triton(kernel)


def _select_match(scores: torch.Tensor, metric: torch.Tensor, r: int, p: int, *,
                  traceable: bool = False) -> torch.Tensor:
    """Launch 1: ``[B, N]`` int64 index map from fp32 scores ``[B, N]`` and metric ``[B, N, Cm]``.

    ``traceable=True`` launches through :func:`wrap_triton` (inside the operators); False launches
    the kernel directly, for plain eager callers outside an operator (``kernels/bat.py``'s autograd
    Function): there torch's wrapper would send every launch through a higher-order op.
    """
    B, N, CM = metric.shape
    index = torch.empty(B, N, dtype=torch.int64, device=metric.device)
    consts, num_warps = _select_match_config(N)
    grid = (B, triton.cdiv(N, consts["BLOCK_I"]))
    kernel = wrap_triton(_mstm_select_match_kernel) if traceable else _mstm_select_match_kernel
    kernel[grid](
        scores, scores.stride(0), scores.stride(1),
        metric, metric.stride(0), metric.stride(1), metric.stride(2),
        index, N, CM, p, N - r, **consts, num_warps=num_warps)
    return index


def _weighted_merge(x: torch.Tensor, scores: torch.Tensor, size: Optional[torch.Tensor], index: torch.Tensor,
                    r: int, size_attn: bool, *,
                    traceable: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch 2: merged tokens ``[B, N - r, C]`` (x's dtype), sizes and weight totals ``[B, N - r]`` fp32.

    ``index`` must be contiguous. ``traceable``: as for :func:`_select_match`.
    """
    B, N, C = x.shape
    S = N - r
    out = torch.empty(B, S, C, dtype=x.dtype, device=x.device)
    size_out = torch.empty(B, S, dtype=torch.float32, device=x.device)
    wsum = torch.empty(B, S, dtype=torch.float32, device=x.device)
    sz = scores if size is None else size  # a valid pointer when HAS_SIZE is off; never read then
    consts, num_warps = _merge_config(N, C, size is not None, size_attn)
    grid = (B, triton.cdiv(S, consts["ROWS"]))
    kernel = wrap_triton(_mstm_weighted_merge_kernel) if traceable else _mstm_weighted_merge_kernel
    kernel[grid](
        x, x.stride(0), x.stride(1), x.stride(2),
        scores, scores.stride(0), scores.stride(1),
        sz, sz.stride(0), sz.stride(1),
        index, out, size_out, wsum, N, C, S, **consts, num_warps=num_warps)
    return out, size_out, wsum


def _merge_backward(grad_out, grad_size_out, x, out, index, wsum, scores, size, size_attn, need_gx,
                    need_gscores, need_gsize, *, traceable: bool = False):
    """Backward launch: ``(grad_x, grad_scores, grad_size)``, None for those not asked for.

    ``out``, ``index`` and ``wsum`` must be contiguous (as :func:`_weighted_merge` makes them).
    ``traceable``: as for :func:`_select_match`.
    """
    B, N, C = x.shape
    S = out.shape[1]
    grad_x = torch.empty_like(x, memory_format=torch.contiguous_format) if need_gx else None
    grad_scores = torch.empty(B, N, dtype=torch.float32, device=x.device) if need_gscores else None
    grad_size = torch.empty(B, N, dtype=torch.float32, device=x.device) if need_gsize else None
    sz = scores if size is None else size
    consts, num_warps = _backward_config(size is not None, size_attn, need_gx, need_gscores, need_gsize)
    grid = (B, triton.cdiv(N, consts["BLOCK_I"]))
    kernel = wrap_triton(_mstm_merge_backward_kernel) if traceable else _mstm_merge_backward_kernel
    kernel[grid](
        grad_out, grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
        grad_size_out, grad_size_out.stride(0), grad_size_out.stride(1),
        x, x.stride(0), x.stride(1), x.stride(2),
        out, index, wsum,
        scores, scores.stride(0), scores.stride(1),
        sz, sz.stride(0), sz.stride(1),
        # pointers of gradients not asked for are never written (NEED_* constexprs): any tensor of the
        # right dtype will do
        x if grad_x is None else grad_x,
        wsum if grad_scores is None else grad_scores,
        wsum if grad_size is None else grad_size,
        N, C, S, **consts, num_warps=num_warps)
    return grad_x, grad_scores, grad_size


# ----------------------------------------------------------------------------------------------------
# Operators: torch.library.triton_op, so that torch.compile / torch.export / CUDA graphs see the kernels
# ----------------------------------------------------------------------------------------------------
#: How the operators are defined. With compiled kernels: :func:`torch.library.triton_op`, whose
#: implementation ``torch.compile`` traces into (Inductor sees the Triton launches, CUDA graphs
#: capture them, no graph break) while ``torch.export`` keeps the operator as one node. Under the
#: Triton interpreter (``TRITON_INTERPRET=1``, CPU tests), or with a torch older than 2.6:
#: :func:`torch.library.custom_op`, an opaque operator with the same schema, fake kernel and autograd,
#: because interpreted kernels cannot be traced (they run on real data only).
_define_op = torch.library.triton_op if _KERNELS_TRACEABLE else torch.library.custom_op


@_define_op("fastprune::mstm_select_match_triton", mutates_args=())
def _select_match_op(scores: torch.Tensor, metric: torch.Tensor, r: int, num_prefix_tokens: int) -> torch.Tensor:
    """``torch.ops.fastprune.mstm_select_match_triton``: top-k selection + cosine matching (launch 1).

    ``scores [B, N]`` float32, ``metric [B, N, Cm]`` -> ``index [B, N]`` int64 (see
    :func:`mstm_merge_triton`). Not differentiable (discrete).
    """
    return _select_match(scores, metric, r, num_prefix_tokens, traceable=True)


@_select_match_op.register_fake
def _(scores, metric, r, num_prefix_tokens):
    B, N, _ = metric.shape
    torch._check(0 <= num_prefix_tokens)
    torch._check(1 <= r)
    torch._check(r <= N - num_prefix_tokens - 1)
    return metric.new_empty(B, N, dtype=torch.int64)


@_define_op("fastprune::mstm_weighted_merge_triton", mutates_args=())
def _weighted_merge_op(x: torch.Tensor, scores: torch.Tensor, size: Optional[torch.Tensor], index: torch.Tensor,
                       r: int, size_attn: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.ops.fastprune.mstm_weighted_merge_triton``: the weighted merge (launch 2).

    ``(x [B, N, C], scores [B, N] fp32, size [B, N] fp32 or None, index [B, N] int64, r, size_attn)``
    -> ``(x' [B, N - r, C] in x's dtype, size' [B, N - r] fp32, W [B, N - r] fp32)``, ``W`` the merge
    weight totals (saved for the backward). ``index[b, i]`` in ``[0, N - r)`` is the output token input
    token ``i`` goes to. Differentiable with respect to ``x``, ``scores`` (``size_attn``) and ``size``.
    """
    return _weighted_merge(x, scores, size, index.contiguous(), r, size_attn, traceable=True)


@_weighted_merge_op.register_fake
def _(x, scores, size, index, r, size_attn):
    B, N, C = x.shape
    torch._check(0 <= r)
    torch._check(r < N)
    return (x.new_empty(B, N - r, C), x.new_empty(B, N - r, dtype=torch.float32),
            x.new_empty(B, N - r, dtype=torch.float32))


@_define_op("fastprune::mstm_weighted_merge_triton_backward", mutates_args=())
def _weighted_merge_backward_op(grad_out: torch.Tensor, grad_size_out: torch.Tensor, x: torch.Tensor,
                                out: torch.Tensor, index: torch.Tensor, wsum: torch.Tensor, scores: torch.Tensor,
                                size: Optional[torch.Tensor], size_attn: bool, need_gx: bool,
                                need_gscores: bool, need_gsize: bool
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.ops.fastprune.mstm_weighted_merge_triton_backward``: the fused backward (one launch).

    Returns ``(grad_x [B, N, C] in x's dtype, grad_scores [B, N] fp32, grad_size [B, N] fp32)``; a
    gradient not asked for (``need_*`` False) comes back as an empty ``[0]`` tensor.
    """
    gx, gs, gz = _merge_backward(grad_out, grad_size_out, x, out.contiguous(), index.contiguous(),
                                 wsum.contiguous(), scores, size, size_attn, need_gx, need_gscores, need_gsize,
                                 traceable=True)
    return (x.new_empty(0) if gx is None else gx, wsum.new_empty(0) if gs is None else gs,
            wsum.new_empty(0) if gz is None else gz)


@_weighted_merge_backward_op.register_fake
def _(grad_out, grad_size_out, x, out, index, wsum, scores, size, size_attn, need_gx, need_gscores, need_gsize):
    B, N, C = x.shape
    return (x.new_empty(B, N, C) if need_gx else x.new_empty(0),
            wsum.new_empty(B, N) if need_gscores else wsum.new_empty(0),
            wsum.new_empty(B, N) if need_gsize else wsum.new_empty(0))


def _weighted_merge_setup_context(ctx, inputs, output):
    x, scores, size, index, r, size_attn = inputs
    out, size_out, wsum = output
    ctx.mark_non_differentiable(wsum)
    if size is None:
        ctx.mark_non_differentiable(size_out)
    ctx.save_for_backward(x, scores, size, index, out, wsum)
    ctx.size_attn = size_attn


def _weighted_merge_backward(ctx, grad_out, grad_size_out, grad_wsum):
    """Gradients reach ``x``, ``scores`` (only with ``size_attn``, through ``w = size * max(score, eps)``)
    and ``size`` (through ``w`` and ``size' = scatter-sum(size)``); ``index`` is discrete."""
    x, scores, size, index, out, wsum = ctx.saved_tensors
    need_gx = ctx.needs_input_grad[0]
    need_gscores = ctx.needs_input_grad[1] and ctx.size_attn
    need_gsize = size is not None and ctx.needs_input_grad[2]
    if not (need_gx or need_gscores or need_gsize):
        return None, None, None, None, None, None
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    if grad_size_out is None:
        grad_size_out = torch.zeros_like(wsum)
    gx, gs, gz = torch.ops.fastprune.mstm_weighted_merge_triton_backward(
        grad_out, grad_size_out, x, out, index, wsum, scores, size, ctx.size_attn, need_gx, need_gscores, need_gsize)
    return (gx if need_gx else None, gs if need_gscores else None, gz if need_gsize else None, None, None, None)


_weighted_merge_op.register_autograd(_weighted_merge_backward, setup_context=_weighted_merge_setup_context)


def mstm_merge_triton(x: torch.Tensor, scores: torch.Tensor, r: int, size: Optional[torch.Tensor] = None,
                      metric: Optional[torch.Tensor] = None, num_prefix_tokens: int = 1,
                      weight: str = "size") -> Merged:
    """MSTM token merging (Bian et al., 2023) with fused Triton kernels: two launches forward, one backward.

    Same signature and semantics as :func:`fastprune.reference.mstm_merge` (the specification):
    keep the prefix and the ``N - p - r`` highest-scoring other tokens (ties: lower index), merge each
    other token into its most cosine-similar kept non-prefix token (ties: lower index) by a weighted
    average (``w = size`` or ``size * max(score, WEIGHT_EPS)``), sizes add up. Arguments are expected
    validated by :func:`fastprune.merge_tokens` (the front door); only device and ``weight`` are
    checked here.

    The two launches are the operators ``torch.ops.fastprune.mstm_select_match_triton`` and
    ``torch.ops.fastprune.mstm_weighted_merge_triton`` (with a registered fake kernel and autograd), so
    the merge runs under ``torch.compile(fullgraph=True)`` without a graph break, is captured by CUDA
    graphs and exports with ``torch.export`` as those two nodes.

    Args:
        x: ``[B, N, C]`` tokens, float32 / float16 / bfloat16, any strides; CUDA (or CPU under
            ``TRITON_INTERPRET=1``).
        scores: ``[B, N]`` class attention (prefix columns ignored); computed in float32.
        r: tokens removed, ``1 <= r <= N - p - 1``.
        size: ``[B, N]`` token sizes (patches per token), or None for ones.
        metric: ``[B, N, Cm]`` features for cosine matching (any float dtype, may differ from x's);
            ``x`` if None. Receives no gradient.
        num_prefix_tokens: ``p``, leading tokens passed through untouched.
        weight: ``"size"`` or ``"size_attn"``.

    Returns:
        :class:`~fastprune.Merged` ``(x [B, N - r, C] in x's dtype, size [B, N - r] float32,
        index [B, N] int64)``. Kept tokens that absorb nothing, and prefix tokens, are bit-identical
        to the input.

    Raises:
        ValueError: unknown ``weight``; tensors not on CUDA while the Triton interpreter is off.
    """
    if weight not in ("size", "size_attn"):
        raise ValueError(f"weight must be 'size' or 'size_attn', got {weight!r}")
    check_triton_device(x)
    metric = x if metric is None else metric
    scores = scores.float()
    size = None if size is None else size.float()
    r, p = int(r), int(num_prefix_tokens)
    index = torch.ops.fastprune.mstm_select_match_triton(scores.detach(), metric.detach(), r, p)
    out, size_out, _ = torch.ops.fastprune.mstm_weighted_merge_triton(x, scores, size, index, r,
                                                                       weight == "size_attn")
    return Merged(out, size_out, index)


# ----------------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (see kernels/aot.py): typical ViT shapes, every storage dtype
# ----------------------------------------------------------------------------------------------------
_PTR = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}


def _aot_specs() -> list[KernelSpec]:
    """Every storage dtype and every launch-config branch, in a dozen instantiations (compiles are slow).

    Select+match: N = 197 (ViT/16 at 224 px) in each dtype, 577 (384 px), and 2049 (the 8-warp
    branch). Merge: with and without sizes, both weightings. Backward: all gradients with
    ``size_attn``, and the ``x``+``size`` gradients of ``weight="size"``. C is a runtime argument.
    """
    def name(kind, dtype, extra):
        return f"{kind}[{str(dtype).replace('torch.', '')},{extra}]"

    specs = []
    for dtype, N in ((torch.float32, 197), (torch.float16, 197), (torch.bfloat16, 197), (torch.float16, 577),
                     (torch.bfloat16, 2049)):
        consts, warps = _select_match_config(N)
        specs.append(KernelSpec(
            name("mstm_select_match", dtype, f"N={N}"), _mstm_select_match_kernel,
            dict(scores_ptr="*fp32", stride_sb="i32", stride_sn="i32",
                 metric_ptr=_PTR[dtype], stride_mb="i32", stride_mn="i32", stride_mc="i32",
                 index_ptr="*i64", N="i32", CM="i32", P="i32", K="i32"),
            consts, warps))
    for dtype, has_size, size_attn in ((torch.float32, True, False), (torch.float16, True, True),
                                       (torch.bfloat16, False, False), (torch.bfloat16, True, True)):
        t = _PTR[dtype]
        consts, warps = _merge_config(197, 768, has_size, size_attn)
        specs.append(KernelSpec(
            name("mstm_weighted_merge", dtype, ("size_attn" if size_attn else "size") + ("" if has_size else ",ones")),
            _mstm_weighted_merge_kernel,
            dict(x_ptr=t, stride_xb="i32", stride_xn="i32", stride_xc="i32",
                 scores_ptr="*fp32", stride_sb="i32", stride_sn="i32",
                 size_ptr="*fp32", stride_zb="i32", stride_zn="i32",
                 index_ptr="*i64", out_ptr=t, size_out_ptr="*fp32", wsum_ptr="*fp32",
                 N="i32", C="i32", S="i32"),
            consts, warps))
    for dtype, size_attn in ((torch.float32, True), (torch.float16, True), (torch.bfloat16, False)):
        t = _PTR[dtype]
        consts, warps = _backward_config(True, size_attn, True, size_attn, True)
        specs.append(KernelSpec(
            name("mstm_merge_backward", dtype, "size_attn" if size_attn else "size"), _mstm_merge_backward_kernel,
            dict(grad_out_ptr=t, stride_gb="i32", stride_gn="i32", stride_gc="i32",
                 grad_size_out_ptr="*fp32", stride_hb="i32", stride_hn="i32",
                 x_ptr=t, stride_xb="i32", stride_xn="i32", stride_xc="i32",
                 out_ptr=t, index_ptr="*i64", wsum_ptr="*fp32",
                 scores_ptr="*fp32", stride_sb="i32", stride_sn="i32",
                 size_ptr="*fp32", stride_zb="i32", stride_zn="i32",
                 grad_x_ptr=t, grad_scores_ptr="*fp32", grad_size_ptr="*fp32",
                 N="i32", C="i32", S="i32"),
            consts, warps))
    return specs


register(_aot_specs)
