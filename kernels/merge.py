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
* the weighted merge by that index map, ``kernels/weighted_merge.py`` (the one merge of every method):
  a gather, each output row reads the tokens sent to it; plus the merged sizes and weight totals.

Backward = one launch, ``kernels/weighted_merge.py``'s backward: gradients w.r.t. ``x``, and w.r.t.
the merge weights, mapped in-kernel onto ``scores`` (``weight="size_attn"``) and ``size``. Selection
and matching are not differentiable (no gradient reaches ``metric``).

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

from fastprune.reference import COSINE_EPS, Merged

from . import check_triton_device
from .aot import KernelSpec, register
from .weighted_merge import (KERNELS_TRACEABLE, PTR, backward_spec, merge_spec, weighted_merge,
                             weighted_merge_backward, wrap_triton)

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
# Launch configuration (shared with the ahead-of-time compile specs below)
# ----------------------------------------------------------------------------------------------------
def _select_match_config(N: int) -> tuple[dict, int]:
    """Compile-time constants and num_warps of the select+match kernel for ``N`` tokens."""
    block_n = max(16, triton.next_power_of_2(N))
    small = block_n <= 1024  # larger rows: more warps for the row reductions, bigger tiles to amortise them
    consts = dict(BLOCK_N=block_n, IDX_BITS=block_n.bit_length() - 1, BLOCK_I=16 if small else 32, BLOCK_J=16,
                  BLOCK_CM=32, COS_EPS=COSINE_EPS)
    return consts, (4 if small else 8)


# ----------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------
def _select_match(scores: torch.Tensor, metric: torch.Tensor, r: int, p: int, *,
                  traceable: bool = False) -> torch.Tensor:
    """Launch 1: ``[B, N]`` int64 index map from fp32 scores ``[B, N]`` and metric ``[B, N, Cm]``.

    ``traceable=True`` launches through :func:`wrap_triton` (inside the operators); False launches
    the kernel directly, for plain eager callers outside an operator: there torch's wrapper would send
    every launch through a higher-order op.
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


# ----------------------------------------------------------------------------------------------------
# Operators: torch.library.triton_op, so that torch.compile / torch.export / CUDA graphs see the kernels
# ----------------------------------------------------------------------------------------------------
#: How the operators are defined. With compiled kernels: :func:`torch.library.triton_op`, whose
#: implementation ``torch.compile`` traces into (Inductor sees the Triton launches, CUDA graphs
#: capture them, no graph break) while ``torch.export`` keeps the operator as one node. Under the
#: Triton interpreter (``TRITON_INTERPRET=1``, CPU tests), or with a torch older than 2.6:
#: :func:`torch.library.custom_op`, an opaque operator with the same schema, fake kernel and autograd,
#: because interpreted kernels cannot be traced (they run on real data only).
_define_op = torch.library.triton_op if KERNELS_TRACEABLE else torch.library.custom_op


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
    return weighted_merge(x, scores, size, index.contiguous(), x.shape[1] - r, size_attn, traceable=True)


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
    gx, gs, gz = weighted_merge_backward(grad_out, grad_size_out, x, out.contiguous(), index.contiguous(),
                                         wsum.contiguous(), scores, size, size_attn, need_gx, need_gscores,
                                         need_gsize, traceable=True)
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
                 metric_ptr=PTR[dtype], stride_mb="i32", stride_mn="i32", stride_mc="i32",
                 index_ptr="*i64", N="i32", CM="i32", P="i32", K="i32"),
            consts, warps))
    for dtype, has_size, size_attn in ((torch.float32, True, False), (torch.float16, True, True),
                                       (torch.bfloat16, False, False), (torch.bfloat16, True, True)):
        variant = ("size_attn" if size_attn else "size") + ("" if has_size else ",ones")
        specs.append(merge_spec(name("mstm_weighted_merge", dtype, variant), dtype, has_size, size_attn))
    for dtype, size_attn in ((torch.float32, True), (torch.float16, True), (torch.bfloat16, False)):
        specs.append(backward_spec(name("mstm_merge_backward", dtype, "size_attn" if size_attn else "size"), dtype,
                                   True, size_attn, True, size_attn, True))
    return specs


register(_aot_specs)
