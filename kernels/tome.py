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
  (``kernels/match.py``'s device function, tensor cores) of the non-prefix A tokens, up to 128 at a
  time, against the non-prefix B tokens with a running argmax; then the top-``r`` A tokens
  (``kernels/select.py``'s top-k device functions, once per image, ties to the lower index) and the
  output order, stored as the merge plan: the index map ``[B, N]`` followed by compact lists (each
  output row's own token, the merged A tokens and their destinations). Near-ties (similarities
  closer than :func:`fastprune.kernels.match.near_tie_eps`) may resolve otherwise than the float64
  reference; exact ties go to the lower B index.
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
from .match import compiled_match_config, cosine_argmax, match_config
from .select import order_keys, radix_bits, rank_chunk, rank_topk_row, topk_mask
from .weighted_merge import PTR, backward_spec, merge_spec, weighted_merge, weighted_merge_backward

__all__ = ["tome_merge_triton", "ToMeMergeFunction"]


# ----------------------------------------------------------------------------------------------------
# Launch 1: matching, top-r selection and output order, one program per image
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _tome_match_select_kernel(
        metric_ptr, metric_stride_b, metric_stride_n, score_ptr, partner_ptr, plan_ptr,
        N, NA, NB, P, R, CM,
        BLOCK_NA: tl.constexpr, RADIX_BITS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
        COS_EPS: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_CM: tl.constexpr,
        SINGLE_CHUNK: tl.constexpr, RANK_CHUNK: tl.constexpr):
    """Bipartite matching, top-``r`` selection and the output order of one image (grid ``(B,)``).

    1. matching (``kernels/match.py``'s :func:`~fastprune.kernels.match.cosine_argmax`, tensor cores):
       the ``NS = NA - A0`` non-prefix A tokens (``A0 = (P + 1) // 2``), ``BLOCK_I`` at a time, against
       the non-prefix B tokens, as position ranges; the best similarity and partner (index among the
       non-prefix B tokens) of each go to the scratch rows ``score[b]``, ``partner[b]`` (``[B, NS]``);
    2. a barrier, then the top-``R`` of those scores, ties to the lower index (``kernels/select.py``'s
       :func:`~fastprune.kernels.select.rank_topk_row` for ``BLOCK_NA <= 256`` (``RANK_CHUNK > 0``: one
       reduction), else :func:`~fastprune.kernels.select.topk_mask`; once per image: no sort, no host sync);
    3. output slots: prefix tokens keep their position; unmerged A tokens follow in order
       (``P + cumsum - 1``); the ``j``-th non-prefix B token goes to ``P + n_unmerged + j``; a merged
       A token maps to its partner's slot. Stores the merge plan ``plan[b]`` (``[B, 2 N + R]`` int64):
       the index map, the own token of every output row, the merged A tokens (ascending) and their
       slots (``kernels/weighted_merge.py`` gathers from these lists).

    Memory traffic: the metric of the ``N - P`` non-prefix tokens once (the B tokens re-read from L2
    by later A tiles), ``8 NS`` bytes of scratch written and read back, ``8 (2 N + R)`` bytes written.
    """
    pid_b = tl.program_id(0).to(tl.int64)
    A0 = (P + 1) // 2
    NS = NA - A0
    metric_row = metric_ptr + pid_b * metric_stride_b
    for i0 in range(0, NS, BLOCK_I):
        offs_i = i0 + tl.arange(0, BLOCK_I)
        valid_i = offs_i < NS
        best, arg = cosine_argmax(metric_row, metric_stride_n, 2 * A0 + 2 * offs_i.to(tl.int64), valid_i,
                                  metric_ptr, 0, 2 * (P // 2) + 1, 2, NB - P // 2, CM, False, PRECISION, UPCAST,
                                  COS_EPS, BLOCK_I, BLOCK_J, BLOCK_CM, SINGLE_CHUNK)
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

    b_base = P + NS - R  # slot of the j-th non-prefix B token is b_base + j
    partner = tl.load(partner_ptr + pid_b * NS + offs - A0, mask=candidate, other=0)
    slot_unmerged = P + tl.cumsum((candidate & (merged == 0)).to(tl.int32), axis=0) - 1
    slot_a = tl.where(pos_a < P, pos_a, tl.where(merged, b_base + partner, slot_unmerged))
    valid_b = offs < NB
    pos_b = 2 * offs + 1
    slot_b = tl.where(pos_b < P, pos_b, b_base + offs - P // 2)

    plan = plan_ptr + pid_b * (2 * N + R)
    S = N - R
    tl.store(plan + pos_a, slot_a.to(tl.int64), mask=valid)
    tl.store(plan + pos_b, slot_b.to(tl.int64), mask=valid_b)
    tl.store(plan + N + slot_a, pos_a.to(tl.int64), mask=kept_a)
    tl.store(plan + N + slot_b, pos_b.to(tl.int64), mask=valid_b)
    nth = tl.cumsum(merged.to(tl.int32), axis=0) - 1
    tl.store(plan + N + S + nth, pos_a.to(tl.int64), mask=merged)
    tl.store(plan + N + S + R + nth, slot_a.to(tl.int64), mask=merged)


# ----------------------------------------------------------------------------------------------------
# Launch configuration (shared with the ahead-of-time compile specs below)
# ----------------------------------------------------------------------------------------------------
def match_select_config(N: int, p: int, CM: int, dtype: torch.dtype, compiled: bool = False) -> tuple[dict, int]:
    """Constants and num_warps of :func:`_tome_match_select_kernel` for ``N`` tokens: ``BLOCK_NA >= NA``
    (a power of two), the top-r search (ranks for ``BLOCK_NA <= 256``, else the radix search and its
    width); the matching's tiles of
    ``kernels/match.py``, with all A tokens of a ViT/16 at 224 px in one tile (up to 128 sources: the
    per-image chain is one candidate sweep; 32 for float32, whose TF32x3 triples the products' registers),
    8 warps for tiles of 64 sources or more."""
    NA, NB = (N + 1) // 2, N // 2
    NS, M = NA - (p + 1) // 2, NB - p // 2
    block_na = max(16, triton.next_power_of_2(NA))
    consts, _ = (compiled_match_config if compiled else match_config)(NS, M, CM, dtype)
    block_i = max(16, min(32 if dtype == torch.float32 else 64 if block_na > 1024 else 128,
                            triton.next_power_of_2(NS)))
    num_warps = 8 if block_i >= 64 or block_na > 1024 else 4
    consts.update(BLOCK_NA=block_na, RADIX_BITS=radix_bits(block_na, num_warps),
                  RANK_CHUNK=rank_chunk(block_na, num_warps), BLOCK_I=block_i)
    return consts, num_warps


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
    consts, num_warps = match_select_config(N, p, CM, metric.dtype)
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
        consts, warps = match_select_config(N, 1, 64, dtype, compiled=True)
        specs.append(KernelSpec(
            f"tome_match_select[{str(dtype).replace('torch.', '')},N={N},Cm=64]", _tome_match_select_kernel,
            dict(metric_ptr=PTR[dtype], metric_stride_b="i32", metric_stride_n="i32", score_ptr="*fp32",
                 partner_ptr="*i32", plan_ptr="*i64", N="i32", NA="i32", NB="i32", P="i32", R="i32", CM="i32"),
            consts, warps, divisible=("CM", "metric_stride_b", "metric_stride_n")))
    return specs


register(_aot_specs)
