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

Forward = three launches, no host synchronisation, no sort, no atomics, and no ``[B, N/2, N/2]``
similarity matrix in global memory:

* the cosine matching, ``kernels/match.py`` (grid ``(B, cdiv(NA - p_A, BLOCK_I))``, tensor cores): a
  program holds a tile of non-prefix A tokens and streams the non-prefix B tokens with a running
  argmax; writes the best score and partner of every non-prefix A token. Near-ties (similarities
  closer than :func:`fastprune.kernels.match.near_tie_eps`) may resolve otherwise than the float64
  reference; exact ties go to the lower B index.
* :func:`_tome_select_kernel` (grid ``(B,)``): the top-``r`` A tokens (``kernels/select.py``'s
  top-k device function, ties to the lower index), then the output order as the index map ``[B, N]``.
* the size-weighted merge by that index map: ``kernels/weighted_merge.py``, the one weighted merge of
  every method (a gather: each output row reads its own token and the A tokens merged into it).

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
from .match import _cosine_match_kernel, match_config
from .select import order_keys, radix_bits, topk_mask
from .weighted_merge import backward_spec, merge_spec, weighted_merge, weighted_merge_backward

__all__ = ["tome_merge_triton", "ToMeMergeFunction"]


# ----------------------------------------------------------------------------------------------------
# Launch 2: top-r selection and output order
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _tome_select_kernel(
        score_ptr, partner_ptr, index_ptr,
        N, NA, NB, P, R,
        BLOCK_NA: tl.constexpr, RADIX_BITS: tl.constexpr):
    """Top-``r`` selection and the output order of one image (one program per image).

    ``score [B, NS]`` and ``partner [B, NS]`` (int64) are the best similarity and the best partner
    (index among the non-prefix B tokens) of the ``NS = NA - A0`` non-prefix A tokens, ``A0 = (P + 1) // 2``:

    1. merged = the ``R`` non-prefix A tokens with the largest score, ties to the lower index
       (``kernels/select.py``'s :func:`~fastprune.kernels.select.topk_mask`: no sort, no host sync);
    2. output slots: prefix tokens keep their position; unmerged A tokens follow in order
       (``P + cumsum - 1``); the ``j``-th non-prefix B token goes to ``P + n_unmerged + j``; a merged
       A token maps to its partner's slot;
    3. stores the index map ``index[b, pos]`` (int64).

    Memory traffic: reads ``12 NS`` bytes, writes ``8 N`` bytes.
    """
    pid_b = tl.program_id(0).to(tl.int64)
    A0 = (P + 1) // 2
    NS = NA - A0
    offs = tl.arange(0, BLOCK_NA)
    valid = offs < NA
    pos_a = 2 * offs
    candidate = valid & (offs >= A0)
    s = tl.load(score_ptr + pid_b * NS + offs - A0, mask=candidate, other=float("-inf"))

    # 1. the top-R scores
    merged = topk_mask(order_keys(s, candidate, False), R, RADIX_BITS)
    unmerged = candidate & (merged == 0)

    # 2. slots
    b_base = P + NS - R  # slot of the j-th non-prefix B token is b_base + j
    partner = tl.load(partner_ptr + pid_b * NS + offs - A0, mask=candidate, other=0).to(tl.int32)
    slot_unmerged = P + tl.cumsum(unmerged.to(tl.int32), axis=0) - 1
    slot_a = tl.where(pos_a < P, pos_a, tl.where(merged, b_base + partner, slot_unmerged))

    # 3. stores
    tl.store(index_ptr + pid_b * N + pos_a, slot_a.to(tl.int64), mask=valid)

    valid_b = offs < NB
    pos_b = 2 * offs + 1
    slot_b = tl.where(pos_b < P, pos_b, b_base + offs - P // 2)
    tl.store(index_ptr + pid_b * N + pos_b, slot_b.to(tl.int64), mask=valid_b)


# ----------------------------------------------------------------------------------------------------
# Launch configuration (shared with the ahead-of-time compile specs below)
# ----------------------------------------------------------------------------------------------------
def _select_config(NA: int) -> tuple[dict, int]:
    """``BLOCK_NA >= NA`` (a power of two), the radix width of the top-r search."""
    block_na = max(16, triton.next_power_of_2(NA))
    num_warps = 4 if block_na <= 1024 else 8
    return dict(BLOCK_NA=block_na, RADIX_BITS=radix_bits(block_na, num_warps)), num_warps


# ----------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------
def _match_and_select(metric: torch.Tensor, r: int, p: int) -> torch.Tensor:
    """Launches 1 and 2: the index map ``[B, N]`` int64, for ``1 <= r <= (N - p) // 2``.

    Matching is ``kernels/match.py``'s: the non-prefix A tokens (even positions ``>= p``) against the
    non-prefix B tokens (odd positions ``>= p``), as position ranges.
    """
    B, N, CM = metric.shape
    metric = metric if metric.stride(-1) == 1 else metric.contiguous()
    NA, NB = (N + 1) // 2, N // 2
    a0, b0 = (p + 1) // 2, p // 2  # prefix A and B tokens
    NS, M = NA - a0, NB - b0
    dev = metric.device
    best = torch.empty(B, NS, dtype=torch.float32, device=dev)
    partner = torch.empty(B, NS, dtype=torch.int64, device=dev)
    consts, num_warps = match_config(NS, M, CM, metric.dtype)
    _cosine_match_kernel[(B, triton.cdiv(NS, consts["BLOCK_I"]))](
        metric, metric.stride(0), metric.stride(1),
        partner, 0, 0, 2 * a0, 2, NS,
        partner, 0, 0, 2 * b0 + 1, 2, M,
        best, partner, partner, 0, 0, CM,
        SRC_LIST=False, CAND_LIST=False, WRITE_MAP=False, **consts, num_warps=num_warps)

    index = torch.empty(B, N, dtype=torch.int64, device=dev)
    consts, num_warps = _select_config(NA)
    _tome_select_kernel[(B,)](best, partner, index, N, NA, NB, p, r, **consts, num_warps=num_warps)
    return index


class ToMeMergeFunction(torch.autograd.Function):
    """Fused ToMe merge with a fused backward: ``(x, size, metric) -> (x', size', index)``.

    Gradients reach ``x`` and ``size`` (through the weights ``s_i / S_d`` and through
    ``size' = scatter-sum(size)``). ``index`` is not differentiable and nothing reaches ``metric``
    (matching is discrete).
    """

    @staticmethod
    def forward(ctx, x, size, metric, r, num_prefix_tokens):
        index = _match_and_select(metric.detach(), r, num_prefix_tokens)
        out, size_out, wsum = weighted_merge(x, None, size, index, x.shape[1] - r, False)
        ctx.mark_non_differentiable(index)
        if size is None:
            ctx.mark_non_differentiable(size_out)
        ctx.save_for_backward(x, size, out, wsum, index)
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
    """ToMe token merging (Bolya et al., ICLR 2023) with fused Triton kernels: 3 launches forward, 1 backward.

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
    """ToMe's own selection kernel, and its instantiations of the weighted merge, every storage dtype.
    Its matching at N = 197 (98 A x 98 B tokens, ranges) is ``kernels/match.py``'s own spec."""
    specs = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        tag = str(dtype).replace("torch.", "")
        for has_size in (False, True):
            specs.append(merge_spec(f"tome_merge[{tag},{'size' if has_size else 'ones'}]", dtype, has_size, False))
        specs.append(backward_spec(f"tome_merge_backward[{tag},size]", dtype, True, False, True, False, True))
    for N in (197, 577, 2049):  # ViT/16 at 224 and 384 px with the class token, and a large input
        consts, warps = _select_config((N + 1) // 2)
        specs.append(KernelSpec(
            f"tome_select[N={N}]", _tome_select_kernel,
            dict(score_ptr="*fp32", partner_ptr="*i64", index_ptr="*i64", N="i32", NA="i32", NB="i32",
                 P="i32", R="i32"),
            consts, warps))
    return specs


register(_aot_specs)
