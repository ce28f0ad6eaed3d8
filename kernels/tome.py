"""Fused ToMe token merging: Triton kernels, their launchers and the autograd Function.

Semantics: "Token Merging: Your ViT but Faster" (Bolya et al., ICLR 2023), written out
step by step in :func:`fastprune.tome.bipartite_soft_matching` and
:func:`fastprune.tome.tome_merge_reference`, which this file reproduces (same A/B split, same best
partners, same merged tokens, same output order and index map, same size-weighted average):

1. **bipartite soft matching**: metric L2-normalised (norms clamped to ``COSINE_EPS``); A = even
   positions, B = odd positions; every non-prefix A token finds its most cosine-similar non-prefix
   B token (ties: lower B index);
2. **selection**: the ``r`` non-prefix A tokens with the largest best-partner similarity merge (ties:
   lower A index);
3. **merge**: every B token becomes ``x'_d = sum_{i -> d} (s_i / S_d) x_i`` with ``S_d = sum_{i -> d}
   s_i`` (itself and the A tokens merged into it); sizes add up. Each weight is divided by its total
   before summing, so a token that absorbs nothing is copied bit-exactly;
4. **output order**: prefix tokens, unmerged A tokens, B tokens, each in its original order.

Forward = two launches, no host synchronisation, no sort, no atomics, and no ``[B, N/2, N/2]``
similarity matrix in global memory:

* :func:`_tome_match_select_kernel` (grid ``(B,)``, one program per image): the cosine matching
  (``kernels/match.py``'s device functions, tensor cores) of the non-prefix A tokens against the
  non-prefix B tokens, then the top-``r`` A tokens (``kernels/select.py``'s top-k device functions,
  once per image, ties to the lower index) and the output order, stored as the merge plan: the index
  map ``[B, N]`` followed by compact lists (each output row's own token, the merged A tokens and
  their destinations). Up to 257 tokens (ViT/16 at 224 px: 98 A x 98 B) the chain stays in
  registers: one source tile against unrolled candidate tiles, the rank top-k of the best scores,
  one scan, the plan's stores (its lists scattered; for float32 gathered by an inverse). Longer inputs
  match 128 (64) sources at a time with a running argmax, through scratch rows and a barrier.
  Near-ties (similarities closer than :func:`fastprune.kernels.match.near_tie_eps`) may resolve
  otherwise than the float64 reference; exact ties go to the lower B index.
* the size-weighted merge from the plan's lists: ``kernels/weighted_merge.py``, the one weighted
  merge of every method (a gather: each output row reads its own token and the A tokens merged
  into it, no scan of the index map).

Backward = one launch, ``kernels/weighted_merge.py``'s backward: gradient w.r.t. ``x`` and, when
needed, ``size``. Matching is not differentiable (nothing reaches ``metric``).

All accumulation is float32 whatever the storage dtype (fp32/fp16/bf16).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from fastprune.reference import Merged

from . import check_triton_device
from .aot import KernelSpec, register
from .match import (argmax_into, compiled_match_config, cosine_argmax, cosine_argmax_tile, inverse_norms,
                    match_config)
from .select import order_keys, radix_bits, rank_chunk, rank_topk, rank_topk_row, topk_mask
from .weighted_merge import PTR, backward_spec, merge_spec, weighted_merge, weighted_merge_backward

__all__ = ["tome_merge_triton", "ToMeMergeFunction"]


# ----------------------------------------------------------------------------------------------------
# Launch 1: matching, top-r selection and output order, one program per image
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _count_keep_last(a, b):
    """Scan combine of ``count << 16 | code`` (count, code < 2**16): counts add, the later code stays."""
    return (((a >> 16) + (b >> 16)) << 16) | (b & 0xFFFF)


@triton.jit
def _tome_match_select_kernel(
        metric_ptr, metric_stride_b, metric_stride_n, score_ptr, partner_ptr, plan_ptr,
        N, NA, NB, P, R, CM,
        BLOCK_NA: tl.constexpr, RADIX_BITS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
        COS_EPS: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_CM: tl.constexpr,
        SINGLE_CHUNK: tl.constexpr, RANK_CHUNK: tl.constexpr, ONE_TILE: tl.constexpr, J_TILES: tl.constexpr,
        PREFETCH: tl.constexpr):
    """Bipartite matching, top-``r`` selection and the output order of one image (grid ``(B,)``).

    The ``NS = NA - A0`` non-prefix A tokens (``A0 = (P + 1) // 2``) are matched against the
    ``M = NB - P // 2`` non-prefix B tokens (position ranges); the best similarity and partner (index
    among the non-prefix B tokens) of each are kept in registers (``ONE_TILE``) or written to the
    scratch rows ``score[b]``, ``partner[b]`` (``[B, NS]``). Output slots: prefix tokens keep their
    position; unmerged A tokens follow in order (``P + cumsum - 1``); the ``j``-th non-prefix B token
    goes to ``P + NS - R + j``;
    a merged A token maps to its partner's slot. Stored as the merge plan ``plan[b]`` (``[B, 2 N + R]``
    int64): the index map, the own token of every output row, the merged A tokens (ascending) and
    their slots (``kernels/weighted_merge.py`` gathers from these lists).

    ``ONE_TILE`` (``NS <= BLOCK_I`` and ``M <= J_TILES * BLOCK_J``: ViT/16 at 224 px, 98 x 98): the
    chain stays in registers. The matching: one source tile against ``J_TILES`` (at most 2) unrolled
    candidate tiles, one max-with-index reduction each, no running loop. In one channel chunk
    (16-bit metrics) the tiles are loaded in this body (with ``PREFETCH``, sm_90, every tile's load
    issued with the sources'; on sm_80 each in its turn) and matched by
    :func:`~fastprune.kernels.match.argmax_into`; in chunks (float32) by
    :func:`~fastprune.kernels.match.cosine_argmax_tile`. Then
    :func:`~fastprune.kernels.select.rank_topk` of the best scores (one ``[BLOCK_I, BLOCK_I]``
    comparison and reduction) and one scan counting the merged flags, which carries each token's flag
    and partner packed in one int32 (the vectors change layout once, into the scan). The plan's lists
    are then scattered from those counts (one channel chunk: their addresses derive from the body's
    loads, where torch's TTIR write analysis stops), or, in chunks, gathered by inverting each A
    token's place ``dest`` in them with a second ``[BLOCK_I, BLOCK_I]`` comparison and reduction, so
    that every store's address is arithmetic (the analysis follows a device function's result to
    all its arguments, the metric pointer among them). Triton 3.8, sm_90, bf16: 13 barriers in the
    SASS (43 before the scan carried the partners and the lists were scattered). The scratch rows
    are not touched.

    Otherwise (longer rows: 577, 2049 tokens): :func:`~fastprune.kernels.match.cosine_argmax` over
    source tiles of ``BLOCK_I`` with a running argmax over candidate tiles of ``BLOCK_J``, the scratch
    rows, a barrier, the top-``R`` of the scores read back (:func:`~fastprune.kernels.select.rank_topk_row`
    for ``BLOCK_NA <= 256`` (``RANK_CHUNK > 0``), else :func:`~fastprune.kernels.select.topk_mask`),
    the partners read back, and the plan scattered from the slots.

    Memory traffic: the metric of the ``N - P`` non-prefix tokens once (general path: the B tokens
    re-read from L2 by later A tiles, and ``8 NS`` bytes of scratch written and read back),
    ``8 (2 N + R)`` bytes written.
    """
    pid_b = tl.program_id(0).to(tl.int64)
    A0 = (P + 1) // 2
    NS = NA - A0
    metric_row = metric_ptr + pid_b * metric_stride_b
    plan = plan_ptr + pid_b * (2 * N + R)
    S = N - R
    b_base = P + NS - R  # slot of the j-th non-prefix B token is b_base + j
    if ONE_TILE:
        offs_i = tl.arange(0, BLOCK_I)
        valid_i = offs_i < NS
        M = NB - P // 2  # candidate j is token 2 (P // 2) + 1 + 2 j
        if SINGLE_CHUNK:
            # the tiles are loaded in the kernel's own body: the plan's store addresses below derive
            # from these loads, where torch's TTIR write analysis stops (through a device function's
            # result it would reach the metric pointer and count the metric as written)
            offs_c = tl.arange(0, BLOCK_CM)
            cmask = (offs_c < CM)[None, :]
            offs_j = tl.arange(0, BLOCK_J)
            cand = metric_row + (2 * (P // 2) + 1) * metric_stride_n + offs_c[None, :]
            m_i = tl.load(metric_row + (2 * A0 + 2 * offs_i.to(tl.int64))[:, None] * metric_stride_n + offs_c[None, :],
                          mask=valid_i[:, None] & cmask, other=0.0)
            if PREFETCH:  # sm_90: every tile's load issued with the sources'
                m_j = tl.load(cand + (2 * offs_j.to(tl.int64))[:, None] * metric_stride_n,
                              mask=(offs_j < M)[:, None] & cmask, other=0.0)
                if J_TILES > 1:
                    m_j1 = tl.load(cand + (2 * (BLOCK_J + offs_j).to(tl.int64))[:, None] * metric_stride_n,
                                   mask=((BLOCK_J + offs_j) < M)[:, None] & cmask, other=0.0)
            inv_i = inverse_norms(m_i, COS_EPS)
            if not PREFETCH:  # sm_80: each tile in its turn (a prefetched mma.sync operand costs registers)
                m_j = tl.load(cand + (2 * offs_j.to(tl.int64))[:, None] * metric_stride_n,
                              mask=(offs_j < M)[:, None] & cmask, other=0.0)
            best, arg = argmax_into(m_i, inv_i, m_j, offs_j < M, tl.full([BLOCK_I], float("-inf"), tl.float32),
                                    tl.zeros([BLOCK_I], tl.int32), 0, PRECISION, UPCAST, COS_EPS, BLOCK_I, BLOCK_J)
            if J_TILES > 1:
                if not PREFETCH:  # its addresses computed here: [BLOCK_J, BLOCK_CM] pointers kept live
                    # across the first tile cost ~30 registers on sm_80 (158 with triton 3.6)
                    m_j1 = tl.load(cand + (2 * (BLOCK_J + offs_j).to(tl.int64))[:, None] * metric_stride_n,
                                   mask=((BLOCK_J + offs_j) < M)[:, None] & cmask, other=0.0)
                best, arg = argmax_into(m_i, inv_i, m_j1, (BLOCK_J + offs_j) < M, best, arg, BLOCK_J, PRECISION,
                                        UPCAST, COS_EPS, BLOCK_I, BLOCK_J)
            best = tl.where(best == float("inf"), float("nan"), best)  # a NaN similarity won
        else:
            best, arg = cosine_argmax_tile(metric_row, metric_stride_n, 2 * A0 + 2 * offs_i.to(tl.int64), valid_i,
                                           metric_ptr, 0, 2 * (P // 2) + 1, 2, M, CM, False, PRECISION, UPCAST,
                                           COS_EPS, BLOCK_I, BLOCK_J, BLOCK_CM, SINGLE_CHUNK, J_TILES)
        merged = rank_topk(order_keys(best, valid_i, False), R, BLOCK_I)
        # the merged flag and the partner ride through the count of merged tokens in one int32 (one
        # layout conversion into the scan; everything after it stays in the scan's layout)
        width = J_TILES * BLOCK_J  # partners are < width
        scanned = tl.associative_scan((merged.to(tl.int32) << 16) | (tl.where(merged, width, 0) + arg), 0,
                                      _count_keep_last)
        nth = (scanned >> 16) - 1  # among the merged ones
        code = scanned & 0xFFFF
        merged = code >= width
        arg = code - tl.where(merged, width, 0)
        slot_i = tl.where(merged, b_base + arg, P + offs_i - nth - 1)
        tl.store(plan + 2 * A0 + 2 * offs_i, slot_i.to(tl.int64), mask=valid_i)
        if SINGLE_CHUNK:  # the lists, scattered: unmerged A tokens to their rows, merged ones in order
            own_i = (2 * A0 + 2 * offs_i).to(tl.int64)
            tl.store(plan + N + slot_i, own_i, mask=valid_i & (code < width))
            tl.store(plan + N + S + nth, own_i, mask=merged)
            tl.store(plan + N + S + R + nth, slot_i.to(tl.int64), mask=merged)
        else:
            # list entry t (row t of a one-hot [t, i] tile) gets the A token whose dest is t (BLOCK_I,
            # no entry, for padding): its index and partner, packed with dest in one int32; every
            # store's address is then arithmetic (the addresses above derive from device functions'
            # results, which torch's write analysis would follow to the metric)
            dest = tl.where(valid_i, tl.where(merged, NS - R + nth, offs_i - nth - 1), BLOCK_I)
            packed_i = (dest << 16) | (offs_i * width + arg)
            packed = tl.sum(tl.where((packed_i >> 16)[None, :] == offs_i[:, None], (packed_i & 0xFFFF)[None, :],
                                     0), axis=1)
            own = (2 * A0 + 2 * (packed // width)).to(tl.int64)
            kept_t = offs_i < NS - R
            merged_t = valid_i & (offs_i >= NS - R)
            tl.store(plan + N + P + offs_i, own, mask=kept_t)
            tl.store(plan + (N + S - (NS - R)) + offs_i, own, mask=merged_t)
            tl.store(plan + (N + S + R - (NS - R)) + offs_i, (b_base + packed % width).to(tl.int64),
                     mask=merged_t)
        pos_a = 2 * tl.arange(0, BLOCK_NA)
        tl.store(plan + pos_a, pos_a.to(tl.int64), mask=pos_a < P)
        tl.store(plan + N + pos_a, pos_a.to(tl.int64), mask=pos_a < P)
    else:
        for i0 in range(0, NS, BLOCK_I):
            offs_i = i0 + tl.arange(0, BLOCK_I)
            valid_i = offs_i < NS
            best, arg = cosine_argmax(metric_row, metric_stride_n, 2 * A0 + 2 * offs_i.to(tl.int64), valid_i,
                                      metric_ptr, 0, 2 * (P // 2) + 1, 2, NB - P // 2, CM, False, PRECISION,
                                      UPCAST, COS_EPS, BLOCK_I, BLOCK_J, BLOCK_CM, SINGLE_CHUNK)
            tl.store(score_ptr + pid_b * NS + offs_i, best, mask=valid_i)
            tl.store(partner_ptr + pid_b * NS + offs_i, arg, mask=valid_i)
        tl.debug_barrier()

        offs = tl.arange(0, BLOCK_NA)
        valid = offs < NA
        pos_a = 2 * offs
        candidate = valid & (offs >= A0)
        if RANK_CHUNK > 0:  # short rows: by ranks, one reduction
            merged = rank_topk_row(score_ptr + (pid_b * NS - A0), 1, A0, NA, R, False, BLOCK_NA, RANK_CHUNK)
        else:
            s = tl.load(score_ptr + pid_b * NS + offs - A0, mask=candidate, other=float("-inf"))
            merged = topk_mask(order_keys(s, candidate, False), R, RADIX_BITS)
        kept_a = valid & (merged == 0)
        partner = tl.load(partner_ptr + pid_b * NS + offs - A0, mask=candidate, other=0)
        slot_unmerged = P + tl.cumsum((candidate & (merged == 0)).to(tl.int32), axis=0) - 1
        slot_a = tl.where(pos_a < P, pos_a, tl.where(merged, b_base + partner, slot_unmerged))
        tl.store(plan + pos_a, slot_a.to(tl.int64), mask=valid)
        tl.store(plan + N + slot_a, pos_a.to(tl.int64), mask=kept_a)
        nth = tl.cumsum(merged.to(tl.int32), axis=0) - 1
        tl.store(plan + N + S + nth, pos_a.to(tl.int64), mask=merged)
        tl.store(plan + N + S + R + nth, slot_a.to(tl.int64), mask=merged)
    offs_b = tl.arange(0, BLOCK_NA)
    pos_b = 2 * offs_b + 1
    slot_b = tl.where(pos_b < P, pos_b, b_base + offs_b - P // 2)
    tl.store(plan + pos_b, slot_b.to(tl.int64), mask=offs_b < NB)
    tl.store(plan + N + slot_b, pos_b.to(tl.int64), mask=offs_b < NB)


# ----------------------------------------------------------------------------------------------------
# Launch configuration (shared with the ahead-of-time compile specs below)
# ----------------------------------------------------------------------------------------------------
def match_select_config(N: int, p: int, CM: int, dtype: torch.dtype, compiled: bool = False,
                        cc: int = 90) -> tuple[dict, int]:
    """Constants and num_warps of :func:`_tome_match_select_kernel` for ``N`` tokens on ``sm_<cc>``.

    ``ONE_TILE`` when the ``NS`` non-prefix A and ``M`` non-prefix B tokens each fit 128 (up to 257
    tokens: ViT/16 at 224 px): ``BLOCK_I`` covers the A tokens, ``J_TILES`` unrolled candidate tiles
    of ``BLOCK_J`` (up to 64) the B tokens (powers of two, at least 16 for ``tl.dot``); 8 warps for
    16-bit metrics, 16 for float32 (TF32x3 triples the products' registers): within 128 registers,
    no spills, 16 warps resident per SM (a single 128-candidate tile needs ~150 at 8 warps); from
    sm_90 on the candidate tiles are loaded with the sources (``PREFETCH``: 110 registers; on sm_80
    each prefetched ``mma.sync`` operand would hold a copy per warp, 228). Otherwise
    ``kernels/match.py``'s tiles with up to 128 sources per tile (64 beyond 2048 tokens; 32 for
    float32) and the top-r of the scratch
    row (ranks for ``BLOCK_NA <= 256``, else the radix search and its width); 8 warps for tiles of 64
    sources or more, or rows of more than 1024 A tokens, else 4."""
    NA, NB = (N + 1) // 2, N // 2
    NS, M = NA - (p + 1) // 2, NB - p // 2
    wide = dtype == torch.float32
    block_na = max(16, triton.next_power_of_2(NA))
    consts, _ = (compiled_match_config if compiled else match_config)(NS, M, CM, dtype)
    one_tile = max(NS, M) <= 128
    if one_tile:
        block_i = max(16, triton.next_power_of_2(NS))
        block_j = max(16, min(64, triton.next_power_of_2(M)))
        consts.update(BLOCK_J=block_j)
        num_warps = 16 if wide and block_i >= 128 else 8 if block_i >= 64 else 4
    else:
        block_i = max(16, min(32 if wide else 64 if block_na > 1024 else 128, triton.next_power_of_2(NS)))
        num_warps = 8 if block_i >= 64 or block_na > 1024 else 4
    consts.update(BLOCK_NA=block_na, RADIX_BITS=radix_bits(block_na, num_warps),
                  RANK_CHUNK=rank_chunk(block_na, num_warps), BLOCK_I=block_i, ONE_TILE=one_tile,
                  J_TILES=triton.cdiv(M, consts["BLOCK_J"]) if one_tile else 1,
                  PREFETCH=one_tile and consts["SINGLE_CHUNK"] and cc >= 90)
    return consts, num_warps


def device_cc(t: torch.Tensor) -> int:
    """``10 major + minor`` of the GPU holding ``t`` (90 for CPU tensors under the interpreter)."""
    if t.device.type != "cuda":
        return 90
    major, minor = torch.cuda.get_device_capability(t.device)
    return 10 * major + minor


# ----------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------
def _match_and_select(metric: torch.Tensor, r: int, p: int) -> torch.Tensor:
    """Launch 1: the merge plan ``[B, 2 N + r]`` int64 (the index map in its first ``N`` columns),
    for ``1 <= r <= (N - p) // 2``."""
    B, N, CM = metric.shape
    metric = metric if metric.stride(-1) == 1 else metric.contiguous()
    NA, NB = (N + 1) // 2, N // 2
    NS = NA - (p + 1) // 2
    dev = metric.device
    score = torch.empty(B, NS, dtype=torch.float32, device=dev)
    partner = torch.empty(B, NS, dtype=torch.int32, device=dev)
    plan = torch.empty(B, 2 * N + r, dtype=torch.int64, device=dev)
    consts, num_warps = match_select_config(N, p, CM, metric.dtype, cc=device_cc(metric))
    _tome_match_select_kernel[(B,)](metric, metric.stride(0), metric.stride(1), score, partner, plan,
                                    N, NA, NB, p, r, CM, **consts, num_warps=num_warps)
    return plan


class ToMeMergeFunction(torch.autograd.Function):
    """Fused ToMe merge with a fused backward: ``(x, size, metric) -> (x', size', index)``.

    Gradients reach ``x`` and ``size`` (through the weights ``s_i / S_d`` and through
    ``size' = scatter-sum(size)``). ``index`` is not differentiable and nothing reaches ``metric``
    (matching is discrete).
    """

    @staticmethod
    def forward(ctx, x, size, metric, r, num_prefix_tokens):
        plan = _match_and_select(metric.detach(), r, num_prefix_tokens)
        out, size_out, wsum = weighted_merge(x, None, size, plan, x.shape[1] - r, False)
        index = plan[:, : x.shape[1]]
        ctx.mark_non_differentiable(index)
        if size is None:
            ctx.mark_non_differentiable(size_out)
        ctx.save_for_backward(x, size, out, wsum, plan)
        return out, size_out, index

    @staticmethod
    def backward(ctx, grad_out, grad_size_out, grad_index):
        x, size, out, wsum, index = ctx.saved_tensors
        need_gx = ctx.needs_input_grad[0]
        need_gsize = size is not None and ctx.needs_input_grad[1]
        if not (need_gx or need_gsize):
            return None, None, None, None, None
        grad_x, _, grad_size = weighted_merge_backward(grad_out, grad_size_out, x, out, index, wsum, None, size,
                                                       False, need_gx, False, need_gsize)
        return grad_x, grad_size, None, None, None


def tome_merge_triton(x: torch.Tensor, r: int, metric: Optional[torch.Tensor] = None,
                      size: Optional[torch.Tensor] = None, num_prefix_tokens: int = 1) -> Merged:
    """ToMe token merging (Bolya et al., ICLR 2023) with fused Triton kernels: 2 launches forward, 1 backward.

    Same semantics as :func:`fastprune.tome.tome_merge_reference` (the specification): bipartite soft
    matching on ``metric`` (A = even, B = odd positions; prefix A tokens never merge, prefix B tokens
    never receive; ties to the lower index), the ``r`` best-matched A tokens merge into their partners
    by a size-weighted average, output = prefix, unmerged A, B tokens. Arguments are expected validated
    by :func:`fastprune.tome.tome_merge_tokens` (the front door); only ``r`` and the device are checked.

    Args:
        x: ``[B, N, C]`` tokens, float32 / float16 / bfloat16, any strides; CUDA (or CPU under
            ``TRITON_INTERPRET=1``).
        r: tokens removed, ``1 <= r <= (N - p) // 2`` (already clipped).
        metric: ``[B, N, Cm]`` matching features (any float dtype, may differ from x's); ``x`` if None.
            Receives no gradient.
        size: ``[B, N]`` token sizes (patches per token), or None for ones.
        num_prefix_tokens: ``p``, leading tokens passed through untouched.

    Returns:
        :class:`~fastprune.Merged` ``(x [B, N - r, C] in x's dtype, size [B, N - r] float32,
        index [B, N] int64)``. Tokens that absorb nothing, and prefix tokens, are bit-identical.

    Raises:
        ValueError: ``r`` outside ``[1, (N - p) // 2]``; tensors not on CUDA while the Triton
            interpreter is off.
    """
    B, N, _ = x.shape
    p = int(num_prefix_tokens)
    if not 1 <= r <= (N - p) // 2:
        raise ValueError(f"r must satisfy 1 <= r <= (N - num_prefix_tokens) // 2 = {(N - p) // 2}, got {r}")
    check_triton_device(x)
    metric = x if metric is None else metric
    size = None if size is None else size.float()
    out, size_out, index = ToMeMergeFunction.apply(x, size, metric, int(r), p)
    return Merged(out, size_out, index)


# ----------------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (see kernels/aot.py): typical ViT shapes, every storage dtype
# ----------------------------------------------------------------------------------------------------
def _aot_specs() -> list[KernelSpec]:
    """ToMe's fused matching + selection kernel (head-mean keys: 64 channels; N = 197, 577, 2049) and
    its instantiations of the weighted merge, every storage dtype."""
    specs = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        tag = str(dtype).replace("torch.", "")
        for has_size in (False, True):
            specs.append(merge_spec(f"tome_merge[{tag},{'size' if has_size else 'ones'}]", dtype, has_size, False))
        specs.append(backward_spec(f"tome_merge_backward[{tag},size]", dtype, True, False, True, False, True))
    for N, dtype in ((197, torch.float32), (197, torch.float16), (197, torch.bfloat16), (577, torch.bfloat16),
                     (2049, torch.float16)):  # ViT/16 at 224 and 384 px with the class token, a large input
        name = f"tome_match_select[{str(dtype).replace('torch.', '')},N={N},Cm=64]"
        by_cc = {cc: match_select_config(N, 1, 64, dtype, compiled=True, cc=cc) for cc in (80, 90)}
        # one spec per architecture where the constants differ (the one-tile prefetch), else one for all
        variants = [(name, by_cc[90], ())] if by_cc[80] == by_cc[90] else \
            [(name, by_cc[90], (90,)), (f"{name[:-1]},sm80]", by_cc[80], (80,))]
        for spec_name, (consts, warps), ccs in variants:
            specs.append(KernelSpec(
                spec_name, _tome_match_select_kernel,
                dict(metric_ptr=PTR[dtype], metric_stride_b="i32", metric_stride_n="i32", score_ptr="*fp32",
                     partner_ptr="*i32", plan_ptr="*i64", N="i32", NA="i32", NB="i32", P="i32", R="i32", CM="i32"),
                consts, warps, divisible=("CM", "metric_stride_b", "metric_stride_n"), ccs=ccs))
    return specs


register(_aot_specs)
