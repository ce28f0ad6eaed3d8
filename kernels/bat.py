"""Fused BAT token reduction: matching and clustering kernels, launchers and the autograd Function.

Semantics: "Beyond Attentive Tokens: Incorporating Token Importance and Diversity for Efficient Vision
Transformers" (Long et al., CVPR 2023), written out step by step in
:mod:`fastprune.bat` (:func:`~fastprune.bat.bat_reference`), which this file reproduces: same
decoupling, same bipartite soft matching, same DPC-kNN clustering, same tie-breaks, same index map,
same merge arithmetic (float32).

Forward = up to five launches (no matching launch without pairs, no clustering launch without
clusters), no host synchronisation, composed of the shared primitives where BAT has them:

* decoupling: the top-k selection, ``kernels/select.py`` (grid ``(B,)``): the attentive positions
  (with the prefix, in token order) and the inattentive ones;
* attentive token matching: the cosine matching of set A (even attentive ranks) against set B (odd),
  ``kernels/match.py`` (tensor cores; near-ties closer than
  :func:`fastprune.kernels.match.near_tie_eps` may resolve otherwise than the float64 reference),
  then :func:`_bat_match_kernel` (grid ``(B,)``): the pairs and the index map of the prefix and
  attentive tokens;
* :func:`_bat_cluster_kernel` (grid ``(B,)``, one program per image holding its inattentive set):
  DPC-kNN clustering; writes the index map of the inattentive tokens;
* the weighted merge by that index map with weights ``size x max(cls attention, eps)``:
  ``kernels/weighted_merge.py``, the one weighted merge of every method (a gather).

Backward = one launch, ``kernels/weighted_merge.py``'s backward: gradients w.r.t. ``x``, the class
attention (through the weights) and ``size``. Matching and clustering are discrete: no gradient
reaches ``metric``.

Inside BAT's own kernels every per-token quantity is a register vector over the attentive or the
inattentive set; pairwise distances are computed in row tiles of at most 4096 elements (fp32, one
rank-1 update per metric channel: :func:`_gram`) and recomputed in each pass rather than stored, so
nothing of size ``N x N`` lives in memory. Moving a per-row result into a vector (and reading one
back) is a one-hot reduction over the tile (:func:`_put`, :func:`_take`). Top-k selections are
``kernels/select.py``'s device function (:func:`~fastprune.kernels.select.topk_mask`): no sort.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from fastprune.reference import BATCounts, Merged

from . import check_triton_device
from .aot import KernelSpec, register
from .match import cosine_match_triton
from .select import order_keys, radix_bits, select_topk_triton, topk_mask
from .weighted_merge import merge_spec, weighted_merge, weighted_merge_backward

__all__ = ["bat_triton", "bat_index_triton", "BATMergeFunction"]


# ----------------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _take(full, idx, cols):
    """``full[idx]``: read a register vector (positions ``cols``) at the ``[BLOCK_R]`` positions ``idx``."""
    return tl.sum(tl.where(idx[:, None] == cols[None, :], full[None, :], 0), axis=1)


@triton.jit
def _put(vals, rows, cols):
    """A vector over ``cols`` holding ``vals`` at positions ``rows`` (distinct) and 0 elsewhere."""
    return tl.sum(tl.where(rows[:, None] == cols[None, :], vals[:, None], 0), axis=0)


@triton.jit
def _gram(metric_row, stride_mn, stride_mc, row_ids, row_mask, col_ids, col_mask, CM,
          BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr):
    """``<m_i, m_j>`` for tokens ``row_ids`` (``[BLOCK_R]``) against tokens ``col_ids`` (``[BLOCK_J]``), and
    ``|m_i|^2`` of the rows; masked-out rows and columns read as zero vectors.

    Accumulated in fp32 as ``Cm`` rank-1 updates (one metric channel at a time, loads L1/L2-resident):
    exact fp32 like an IEEE ``tl.dot``, but a rolled loop that keeps compile time and registers low.
    """
    gram = tl.zeros([BLOCK_R, BLOCK_J], tl.float32)
    sq_rows = tl.zeros([BLOCK_R], tl.float32)
    row_ptrs = metric_row + row_ids * stride_mn
    col_ptrs = metric_row + col_ids * stride_mn
    for _ in range(0, CM):
        m_r = tl.load(row_ptrs, mask=row_mask, other=0.0).to(tl.float32)
        m_c = tl.load(col_ptrs, mask=col_mask, other=0.0).to(tl.float32)
        gram += m_r[:, None] * m_c[None, :]
        sq_rows += m_r * m_r
        row_ptrs += stride_mc
        col_ptrs += stride_mc
    return gram, sq_rows


@triton.jit
def _sq_norms(metric_row, stride_mn, stride_mc, ids, mask, CM, BLOCK_J: tl.constexpr):
    """``|m_j|^2`` (fp32) of the tokens ``ids`` (``[BLOCK_J]``); 0 where ``mask`` is off."""
    sq = tl.zeros([BLOCK_J], tl.float32)
    ptrs = metric_row + ids * stride_mn
    for _ in range(0, CM):
        m_c = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        sq += m_c * m_c
        ptrs += stride_mc
    return sq


@triton.jit
def _sq_dist(gram, sq_rows, sq_cols, rows, cols, CM):
    """``D^2 = |m_i - m_j|^2 / Cm`` from a Gram tile, clamped at 0 and exactly 0 where ``rows == cols``."""
    d2 = tl.maximum((sq_rows[:, None] + sq_cols[None, :] - 2.0 * gram) / CM, 0.0)
    return tl.where(rows[:, None] == cols[None, :], 0.0, d2)


# ----------------------------------------------------------------------------------------------------
# Attentive token matching: the r best-matched A tokens merge -> index map of the prefix and attentive tokens
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _bat_match_kernel(
        kept_ptr, best_ptr, partner_ptr, index_ptr,
        N, P, K, R,
        BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, RADIX_BITS: tl.constexpr):
    """Attentive token matching, after the selection and the cosine matching, for one image (grid ``(B,)``).

    ``kept [B, P + K]``: the prefix and attentive token positions in token order; the attentive
    token of rank ``q`` is in set A for even ``q`` and B for odd ``q``. ``best``/``partner``
    ``[B, ceil(K / 2)]``: each A token's best cosine similarity and partner (index among the B tokens).
    Per-token quantities are ``[BLOCK_K]`` register vectors over ``q`` (``BLOCK_K >= K``):

    1. merged = the ``R`` A tokens with the best similarity (top-k, ties to the lower index);
    2. survivors (prefix + unmerged attentive tokens) get slots ``0 .. P + K - R - 1`` in token order
       (a cumsum); a merged A token gets its partner's slot (a one-hot read in ``BLOCK_R`` row tiles).

    Memory traffic: ``8 (P + K) + 12 K / 2`` bytes read, ``8 (P + K)`` written (inattentive positions
    are left to :func:`_bat_cluster_kernel`).
    """
    pid_b = tl.program_id(0).to(tl.int64)
    index_row = index_ptr + pid_b * N
    q = tl.arange(0, BLOCK_K)
    valid = q < K
    pos = tl.load(kept_ptr + pid_b * (P + K) + P + q, mask=valid, other=0)
    NA = (K + 1) // 2
    is_a = valid & ((q % 2) == 0)
    merged = q < 0
    partner = tl.zeros([BLOCK_K], tl.int32)
    if R > 0:
        best = tl.load(best_ptr + pid_b * NA + q // 2, mask=is_a, other=float("-inf"))
        partner = tl.load(partner_ptr + pid_b * NA + q // 2, mask=is_a, other=0).to(tl.int32)
        merged = topk_mask(order_keys(best, is_a, False), R, RADIX_BITS)

    offs_p = tl.arange(0, BLOCK_K)
    tl.store(index_row + offs_p, offs_p.to(tl.int64), mask=offs_p < P)  # prefix tokens stay in place
    survivor = valid & (merged == 0)
    slot = P + tl.cumsum(survivor.to(tl.int32), axis=0) - 1
    tl.store(index_row + pos, slot.to(tl.int64), mask=survivor)
    if R > 0:
        for r0 in range(0, K, BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R)
            dest = _take(slot, 2 * _take(partner, rows, q) + 1, q)  # B token j has rank 2 j + 1
            tl.store(index_row + _take(pos, rows, q), dest.to(tl.int64),
                     mask=_take(merged.to(tl.int32), rows, q) != 0)


# ----------------------------------------------------------------------------------------------------
# Launch 2: DPC-kNN clustering of the inattentive tokens -> index map of the inattentive tokens
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _bat_cluster_kernel(
        rest_ptr,
        metric_ptr, stride_mb, stride_mn, stride_mc,
        index_ptr,
        N, CM, n, NC, KNN, BASE,
        BLOCK_I: tl.constexpr, BLOCK_R: tl.constexpr, RADIX_BITS: tl.constexpr):
    """DPC-kNN clustering of one image's inattentive tokens; writes their ``index`` (``BASE`` + cluster).

    One program per image ``b`` holds the inattentive set: its ``n`` token ids (``rest [B, n]``, from
    the selection, ascending) as a ``[BLOCK_I]`` vector (``BLOCK_I >= n``, a power of two), and every
    per-token quantity of the clustering as a ``[BLOCK_I]`` register vector. Pairwise distances
    ``D^2 = |m_i - m_j|^2 / Cm`` are computed per ``[BLOCK_R, BLOCK_I]`` row tile from an fp32 Gram
    tile and recomputed in each pass rather than stored:

    a. log density: minus the mean of the ``KNN`` smallest ``D^2`` to the other tokens (``KNN`` rounds
       of min + mask per row tile);
    b. ``delta``: distance to the nearest denser token (density, then lower index), the row maximum
       for the densest; score ``log rho + log delta``;
    c. centres: the ``NC`` best scores (top-k, ties to the lower index), numbered in token order (cumsum);
    d. every token joins its nearest centre (first minimum; a centre joins itself):
       ``index = BASE + centre number``.

    Memory traffic: the ``n`` ids, and the metric of the ``n`` inattentive tokens once per row tile
    and pass (L2-resident); ``n`` indices written. Compute ``O(n^2 Cm)`` per pass.
    """
    pid_b = tl.program_id(0).to(tl.int64)
    metric_row = metric_ptr + pid_b * stride_mb
    jj = tl.arange(0, BLOCK_I)
    member = jj < n
    ids = tl.load(rest_ptr + pid_b * n + jj, mask=member, other=0).to(tl.int32)
    sq = _sq_norms(metric_row, stride_mn, stride_mc, ids, member, CM, BLOCK_I)

    # a. log density.
    log_density = tl.zeros([BLOCK_I], tl.float32)
    for r0 in range(0, n, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        gram, sq_rows = _gram(metric_row, stride_mn, stride_mc, _take(ids, rows, jj), rows < n, ids, member, CM,
                              BLOCK_R, BLOCK_I)
        d2 = _sq_dist(gram, sq_rows, sq, rows, jj, CM)
        d2 = tl.where(member[None, :] & (jj[None, :] != rows[:, None]), d2, float("inf"))
        knn_sum = tl.zeros([BLOCK_R], tl.float32)
        for _ in range(KNN):
            knn_sum += tl.min(d2, axis=1)
            nearest = tl.argmin(d2, axis=1, tie_break_left=True)
            d2 = tl.where(jj[None, :] == nearest[:, None], float("inf"), d2)
        log_density += _put(-(knn_sum / tl.maximum(KNN, 1)), rows, jj)

    # b. delta and the score log(rho * delta).
    score = tl.zeros([BLOCK_I], tl.float32)
    for r0 in range(0, n, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        gram, sq_rows = _gram(metric_row, stride_mn, stride_mc, _take(ids, rows, jj), rows < n, ids, member, CM,
                              BLOCK_R, BLOCK_I)
        dist = tl.sqrt(_sq_dist(gram, sq_rows, sq, rows, jj, CM))
        ld_rows = _take(log_density, rows, jj)
        denser = member[None, :] & ((log_density[None, :] > ld_rows[:, None])
                                    | ((log_density[None, :] == ld_rows[:, None]) & (jj[None, :] < rows[:, None])))
        delta = tl.min(tl.where(denser, dist, float("inf")), axis=1)
        farthest = tl.max(tl.where(member[None, :] & (jj[None, :] != rows[:, None]), dist, 0.0), axis=1)
        delta = tl.where(delta < float("inf"), delta, farthest)
        score += _put(ld_rows + tl.log(delta), rows, jj)

    # c. centres: the NC best scores, numbered in token order.
    centre = topk_mask(order_keys(score, member, False), NC, RADIX_BITS)
    centre_slot = tl.cumsum(centre.to(tl.int32), axis=0) - 1

    # d. assignment to the nearest centre.
    for r0 in range(0, n, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        row_ids = _take(ids, rows, jj)
        gram, sq_rows = _gram(metric_row, stride_mn, stride_mc, row_ids, rows < n, ids, member, CM,
                              BLOCK_R, BLOCK_I)
        d2 = tl.where(centre[None, :], _sq_dist(gram, sq_rows, sq, rows, jj, CM), float("inf"))
        nearest = tl.argmin(d2, axis=1, tie_break_left=True).to(tl.int32)
        nearest = tl.where(_take(centre.to(tl.int32), rows, jj) != 0, rows, nearest)
        tl.store(index_ptr + pid_b * N + row_ids, (BASE + _take(centre_slot, nearest, jj)).to(tl.int64),
                 mask=rows < n)


# ----------------------------------------------------------------------------------------------------
# Launch configuration (shared with the ahead-of-time compile specs below)
# ----------------------------------------------------------------------------------------------------
def _match_config(K: int) -> tuple[dict, int]:
    """Constants and num_warps of the matching kernel: ``[BLOCK_R, BLOCK_K]`` tiles of <= 4096 elements."""
    block_k = max(16, triton.next_power_of_2(K))
    warps = 4 if block_k <= 256 else 8
    consts = dict(BLOCK_K=block_k, BLOCK_R=max(16, min(32, 4096 // block_k)), RADIX_BITS=radix_bits(block_k, warps))
    return consts, warps


def _cluster_config(n_inattentive: int) -> tuple[dict, int]:
    """Constants and num_warps of the clustering kernel: ``[BLOCK_R, BLOCK_I]`` tiles of <= 4096 elements."""
    block_i = max(16, triton.next_power_of_2(n_inattentive))
    return dict(BLOCK_I=block_i, BLOCK_R=max(16, min(block_i, 4096 // block_i)), RADIX_BITS=radix_bits(block_i, 8)), 8


# ----------------------------------------------------------------------------------------------------
# Launchers and autograd Function
# ----------------------------------------------------------------------------------------------------
def bat_index_triton(scores: torch.Tensor, metric: torch.Tensor, counts: BATCounts,
                     num_prefix_tokens: int) -> torch.Tensor:
    """The ``[B, N]`` int64 index map from float32 scores ``[B, N]`` and metric ``[B, N, Cm]``.

    Decoupling is ``kernels/select.py``'s top-k (the attentive and inattentive positions), attentive
    token matching ``kernels/match.py``'s cosine matching of set A against set B (tensor cores;
    near-ties closer than :func:`fastprune.kernels.match.near_tie_eps` may resolve otherwise than the
    float64 reference) then :func:`_bat_match_kernel`; clustering :func:`_bat_cluster_kernel`.
    """
    B, N, CM = metric.shape
    p = num_prefix_tokens
    K, r, c, k = counts
    metric = metric if metric.stride(-1) == 1 else metric.contiguous()
    top = select_topk_triton(scores, K, p, kept=True, rest=c > 0)
    index = torch.empty(B, N, dtype=torch.int64, device=metric.device)
    if r > 0:
        attentive = top.kept[:, p:]
        match = cosine_match_triton(metric, attentive[:, 0::2], attentive[:, 1::2])
        best, partner = match.best, match.partner
    else:
        best = partner = index  # never read
    consts, num_warps = _match_config(K)
    _bat_match_kernel[(B,)](top.kept, best, partner, index, N, p, K, r, **consts, num_warps=num_warps)
    if c > 0:
        n = N - p - K
        consts, num_warps = _cluster_config(n)
        _bat_cluster_kernel[(B,)](
            top.rest, metric, metric.stride(0), metric.stride(1), metric.stride(2),
            index, N, CM, n, c, k, counts.output_tokens(p) - c, **consts, num_warps=num_warps)
    return index


class BATMergeFunction(torch.autograd.Function):
    """Weighted merge ``(x, scores, size, index) -> (tokens, sizes)`` with weights ``size x max(a, eps)``.

    Forward and backward are ``kernels/weighted_merge.py``'s kernels. Gradients reach
    ``x``, ``scores`` and ``size``; ``index`` is given (not differentiable).
    """

    @staticmethod
    def forward(ctx, x, scores, size, index, n_out):
        out, size_out, wsum = weighted_merge(x, scores, size, index, n_out, True)
        if size is None:
            ctx.mark_non_differentiable(size_out)
        ctx.save_for_backward(x, scores, size, index, out, wsum)
        return out, size_out

    @staticmethod
    def backward(ctx, grad_out, grad_size_out):
        x, scores, size, index, out, wsum = ctx.saved_tensors
        need_gx, need_gscores = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_gsize = size is not None and ctx.needs_input_grad[2]
        if not (need_gx or need_gscores or need_gsize):
            return None, None, None, None, None
        grad_x, grad_scores, grad_size = weighted_merge_backward(
            grad_out, grad_size_out, x, out, index, wsum, scores, size, True, need_gx, need_gscores, need_gsize)
        return grad_x, grad_scores, grad_size, None, None


def bat_triton(x: torch.Tensor, scores: torch.Tensor, counts: BATCounts, size: Optional[torch.Tensor] = None,
               metric: Optional[torch.Tensor] = None, num_prefix_tokens: int = 1) -> Merged:
    """BAT token reduction (Long et al., CVPR 2023) with Triton kernels: up to five launches forward, one backward.

    Same semantics as :func:`fastprune.bat.bat_reference` (the specification), with the clipped
    counts given directly (:func:`fastprune.bat.bat_plan`). Arguments are expected validated by
    :func:`fastprune.bat.bat_tokens` (the front door).

    Args:
        x: ``[B, N, C]`` tokens, float32 / float16 / bfloat16, any strides; CUDA (or CPU under
            ``TRITON_INTERPRET=1``).
        scores: ``[B, N]`` class attention (softmax form; prefix columns ignored), read in float32.
        counts: ``(K, r, c, k)``: attentive tokens, matched pairs, clusters, neighbours, with
            ``1 <= K <= N - p``, ``0 <= r <= K // 2``, ``0 <= c <= N - p - K``, ``0 <= k < N - p - K``.
        size: ``[B, N]`` token sizes, or None for ones.
        metric: ``[B, N, Cm]`` features for matching and clustering; ``x`` if None. No gradient.
        num_prefix_tokens: ``p``.

    Returns:
        :class:`~fastprune.Merged` ``(x [B, S, C] in x's dtype, size [B, S] float32, index [B, N] int64)``
        with ``S = p + K - r + c``. Tokens that absorb nothing are bit-identical to the input.

    Raises:
        ValueError: counts out of range; tensors not on CUDA while the Triton interpreter is off.
    """
    B, N, _ = x.shape
    p = num_prefix_tokens
    K, r, c, k = counts
    n_in = N - p - K
    if not (1 <= K <= N - p and 0 <= r <= K // 2 and 0 <= c <= n_in and 0 <= k <= max(n_in - 1, 0)):
        raise ValueError(f"BAT counts out of range for N={N}, p={p}: {counts}")
    check_triton_device(x)
    metric = x if metric is None else metric
    scores = scores.float()
    size = None if size is None else size.float()
    index = bat_index_triton(scores.detach(), metric.detach(), counts, p)
    out, size_out = BATMergeFunction.apply(x, scores, size, index, counts.output_tokens(p))
    return Merged(out, size_out, index)


# ----------------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (see kernels/aot.py): ViT shapes, every metric dtype
# ----------------------------------------------------------------------------------------------------
_PTR = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}


def _aot_specs() -> list[KernelSpec]:
    """Both BAT kernels at the launch configurations ViT shapes use, each storage dtype at least once.

    The dtype only changes the conversion of the metric on load, so not every (shape, dtype) pair is
    compiled: that keeps the ahead-of-time test short (the clustering kernel takes seconds to compile).
    The selection and matching are ``kernels/select.py``'s and ``kernels/match.py``'s specs; the weighted
    merge's index-map variant (BAT's; MSTM and ToMe pass merge plans) is compiled here.
    """
    specs = []
    # Attentive tokens at keep rate 0.7 and the first reduction layer: 138 of 196 (224 px) and 404
    # of 576 (384 px).
    for K in (138, 404):
        consts, warps = _match_config(K)
        specs.append(KernelSpec(f"bat_match[K={K}]", _bat_match_kernel,
                                dict(kept_ptr="*i64", best_ptr="*fp32", partner_ptr="*i64", index_ptr="*i64",
                                     N="i32", P="i32", K="i32", R="i32"), consts, warps))
    # Inattentive set sizes there: 58 (BLOCK_I = 64, one row tile) and 172 (BLOCK_I = 256, several
    # row tiles).
    for dtype, n_inattentive in ((torch.float32, 58), (torch.bfloat16, 172)):
        consts, warps = _cluster_config(n_inattentive)
        specs.append(KernelSpec(
            f"bat_cluster[{_tag(dtype)},n={n_inattentive}]", _bat_cluster_kernel,
            dict(rest_ptr="*i64", metric_ptr=_PTR[dtype], stride_mb="i32", stride_mn="i32", stride_mc="i32",
                 index_ptr="*i64", N="i32", CM="i32", n="i32", NC="i32", KNN="i32", BASE="i32"),
            consts, warps))
    # The weighted merge as BAT launches it: from an index map (clusters: rows without an own token),
    # not a merge plan's lists, weights size x max(attention, eps); ViT/16 at 224 px, 768 channels.
    for dtype in (torch.float32, torch.bfloat16):
        specs.append(merge_spec(f"bat_weighted_merge[{_tag(dtype)},size_attn,map]", dtype, True, True, N=197,
                                C=768, R=None))
    return specs


def _tag(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


register(_aot_specs)
