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

Forward = two kernel launches, composed of the shared primitives, no host synchronisation, no sort:

* :func:`_mstm_select_match_kernel` (grid ``(B,)``, one program per image): the top-k selection
  (``kernels/select.py``'s device functions, once per image) writes the image's *merge plan*: the
  kept tokens' output slots (the index map), their positions and the ``r`` sources' positions; then
  the cosine matching of the sources against the kept non-prefix tokens (``kernels/match.py``'s
  device function, tensor cores) writes each source's winner slot into the map and the plan;
* the weighted merge, ``kernels/weighted_merge.py`` (the one merge of every method): a gather from
  the plan's compact lists, each output row reads its own token and the sources sent to it (no
  scan of the index map); plus merged sizes and weight totals.

Backward = one launch, ``kernels/weighted_merge.py``'s backward: gradients w.r.t. ``x``, and w.r.t.
the merge weights, mapped in-kernel onto ``scores`` (``weight="size_attn"``) and ``size``. Selection
and matching are not differentiable (no gradient reaches ``metric``).

Matching runs on tensor cores (fp16/bf16 metrics; fp32: TF32x3), so a source whose two best kept
tokens differ in similarity by less than :func:`fastprune.kernels.match.near_tie_eps` may pick the
other one than the float64 reference; exact ties always go to the lower index.

All arithmetic is float32 whatever the storage dtype (fp32/fp16/bf16): values are converted on load
and converted back on store. Deterministic, no atomics.

The launches are PyTorch operators (``torch.library.triton_op``, launches through ``wrap_triton``), each
with a fake kernel, and autograd registered on the weighted merge:
``torch.ops.fastprune.mstm_select_match_triton`` (returns the plan ``[B, 2 N + r]``, whose first
``N`` columns are the index map), ``mstm_weighted_merge_triton`` and
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

from fastprune.reference import Merged

from . import check_triton_device
from .aot import KernelSpec, register
from .match import compiled_match_config, cosine_argmax, match_config
from .select import select_config, topk_row, write_selection
from .weighted_merge import (KERNELS_TRACEABLE, PTR, backward_spec, merge_spec, weighted_merge, weighted_merge_backward,
                             wrap_triton)

__all__ = ["mstm_merge_triton"]


# ----------------------------------------------------------------------------------------------------
# Launch 1: top-k selection and cosine matching, one program per image
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _mstm_select_match_kernel(
        scores_ptr, stride_sb, stride_sn,
        metric_ptr, metric_stride_b, metric_stride_n,
        plan_ptr, N, P, K, CM,
        RADIX_BITS: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
        COS_EPS: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_CM: tl.constexpr,
        SINGLE_CHUNK: tl.constexpr, RANK_CHUNK: tl.constexpr):
    """Selection and matching of one image (grid ``(B,)``): its merge plan ``plan[b]``
    (``[B, 2 N + R]`` int64, ``R = N - P - K`` sources, ``S = P + K`` outputs).

    1. top-``K`` of the score row (``kernels/select.py``'s :func:`~fastprune.kernels.select.topk_row`,
       once per image) and :func:`~fastprune.kernels.select.write_selection`: the index map
       ``plan[b, :N]`` (kept tokens' slots), the kept positions ``plan[b, N:N + S]`` (each output
       row's own token) and the sources ``plan[b, N + S:N + S + R]`` (ascending);
    2. a barrier (the lists are re-read by other threads of the program), then the cosine matching of
       the sources, ``BLOCK_I`` at a time, against the ``K`` kept non-prefix tokens
       (``kernels/match.py``'s :func:`~fastprune.kernels.match.cosine_argmax`, tensor cores): each
       source's winner slot ``p + j`` goes into the index map and ``plan[b, N + S + R:]``.

    Memory traffic: ``4 N`` bytes of scores, the metric of the ``N - P`` non-prefix tokens once
    (L2 re-reads of the candidates by later source tiles), ``8 (2 N + R)`` bytes written (and ``4 N``
    written and read back, cached: write_selection's slots).
    """
    pid_b = tl.program_id(0).to(tl.int64)
    R = N - P - K
    S = P + K
    plan = plan_ptr + pid_b * (2 * N + R)
    keep = topk_row(scores_ptr + pid_b * stride_sb, stride_sn, N, P, K, False, RADIX_BITS, BLOCK_N, RANK_CHUNK)
    write_selection(keep, plan, plan + N, plan + N + S, N, -1, True, True, BLOCK_N)
    tl.debug_barrier()
    metric_row = metric_ptr + pid_b * metric_stride_b
    for i0 in range(0, R, BLOCK_I):
        offs_i = i0 + tl.arange(0, BLOCK_I)
        valid_i = offs_i < R
        pos_i = tl.load(plan + N + S + offs_i, mask=valid_i, other=0)
        _best, arg = cosine_argmax(metric_row, metric_stride_n, pos_i, valid_i, plan + N + P, 1, 0, 1, K, CM,
                                   True, PRECISION, UPCAST, COS_EPS, BLOCK_I, BLOCK_J, BLOCK_CM, SINGLE_CHUNK)
        dst = (arg + P).to(tl.int64)
        tl.store(plan + pos_i, dst, mask=valid_i)
        tl.store(plan + N + S + R + offs_i, dst, mask=valid_i)


def select_match_config(N: int, r: int, p: int, CM: int, dtype: torch.dtype, compiled: bool = False
                        ) -> tuple[dict, int]:
    """Constants and num_warps of :func:`_mstm_select_match_kernel`: the selection's row
    (``kernels/select.py``'s :func:`~fastprune.kernels.select.select_config`) and the matching's tiles
    (``kernels/match.py``'s), the larger warp count of the two."""
    sel, sel_warps = select_config(N)
    match, match_warps = (compiled_match_config if compiled else match_config)(r, N - p - r, CM, dtype)
    return dict(sel, **match), max(sel_warps, match_warps)


def _select_match(scores: torch.Tensor, metric: torch.Tensor, r: int, p: int, *,
                  traceable: bool = False) -> torch.Tensor:
    """Selection + matching, one launch: the merge plan ``[B, 2 N + r]`` int64 (index map, kept
    positions, sources, their slots: see :func:`_mstm_select_match_kernel`) from fp32 scores
    ``[B, N]`` and the metric ``[B, N, Cm]``. ``traceable=True`` launches through :func:`wrap_triton`
    (inside the operators)."""
    B, N, CM = metric.shape
    metric = metric if metric.stride(-1) == 1 else metric.contiguous()
    plan = torch.empty(B, 2 * N + r, dtype=torch.int64, device=metric.device)
    consts, num_warps = select_match_config(N, r, p, CM, metric.dtype)
    kernel = wrap_triton(_mstm_select_match_kernel) if traceable else _mstm_select_match_kernel
    kernel[(B,)](scores, scores.stride(0), scores.stride(1), metric, metric.stride(0), metric.stride(1),
                 plan, N, p, N - p - r, CM, **consts, num_warps=num_warps)
    return plan


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

    ``scores [B, N]`` float32, ``metric [B, N, Cm]`` -> the merge plan ``[B, 2 N + r]`` int64: the
    index map (``plan[:, :N]``, see :func:`mstm_merge_triton`) followed by the compact lists the
    weighted merge gathers from. Not differentiable (discrete).
    """
    return _select_match(scores, metric, r, num_prefix_tokens, traceable=True)


@_select_match_op.register_fake
def _(scores, metric, r, num_prefix_tokens):
    B, N, _ = metric.shape
    torch._check(0 <= num_prefix_tokens)
    torch._check(1 <= r)
    torch._check(r <= N - num_prefix_tokens - 1)
    return metric.new_empty(B, 2 * N + r, dtype=torch.int64)


@_define_op("fastprune::mstm_weighted_merge_triton", mutates_args=())
def _weighted_merge_op(x: torch.Tensor, scores: torch.Tensor, size: Optional[torch.Tensor], index: torch.Tensor,
                       r: int, size_attn: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.ops.fastprune.mstm_weighted_merge_triton``: the weighted merge (launch 2).

    ``(x [B, N, C], scores [B, N] fp32, size [B, N] fp32 or None, index, r, size_attn)``
    -> ``(x' [B, N - r, C] in x's dtype, size' [B, N - r] fp32, W [B, N - r] fp32)``, ``W`` the merge
    weight totals (saved for the backward). ``index``: the selection's plan ``[B, 2 N + r]`` (the
    gather reads its compact lists) or an index map ``[B, N]`` int64 (``index[b, i]`` in ``[0, N - r)``
    is the output token input token ``i`` goes to; the gather scans it). Differentiable with respect
    to ``x``, ``scores`` (``size_attn``) and ``size``.
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
    plan = torch.ops.fastprune.mstm_select_match_triton(scores.detach(), metric.detach(), r, p)
    out, size_out, _ = torch.ops.fastprune.mstm_weighted_merge_triton(x, scores, size, plan, r,
                                                                       weight == "size_attn")
    return Merged(out, size_out, plan[:, : x.shape[1]])


# ----------------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (see kernels/aot.py): typical ViT shapes, every storage dtype
# ----------------------------------------------------------------------------------------------------
def select_match_spec(name: str, N: int, r: int, CM: int, dtype: torch.dtype, p: int = 1) -> KernelSpec:
    """The spec of :func:`_mstm_select_match_kernel` as :func:`_select_match` launches it."""
    consts, warps = select_match_config(N, r, p, CM, dtype, compiled=True)
    return KernelSpec(
        name, _mstm_select_match_kernel,
        dict(scores_ptr="*fp32", stride_sb="i32", stride_sn="i32", metric_ptr=PTR[dtype], metric_stride_b="i32",
             metric_stride_n="i32", plan_ptr="*i64", N="i32", P="i32", K="i32", CM="i32"),
        consts, warps, divisible=("CM", "metric_stride_b", "metric_stride_n"))


def _aot_specs() -> list:
    """MSTM's kernels, every storage dtype, in a few compiles (they are slow).

    The fused selection + matching at N = 197 (13 sources against 183 kept tokens) with metric = x
    (768 channels, in chunks) and on head-mean keys (64 channels, one chunk), and at N = 577; the
    merge (from the plan's lists) with and without sizes, both weightings; the backward with all
    gradients (``size_attn``) and the ``x``+``size`` gradients of ``weight="size"``. C is a runtime
    argument.
    """
    def name(kind, dtype, extra):
        return f"{kind}[{str(dtype).replace('torch.', '')},{extra}]"

    specs = [select_match_spec(name("mstm_select_match", dtype, "N=197,r=13,Cm=768"), 197, 13, 768, dtype)
             for dtype in PTR]
    specs.append(select_match_spec(name("mstm_select_match", torch.bfloat16, "N=197,r=13,Cm=64"), 197, 13, 64,
                                   torch.bfloat16))
    specs.append(select_match_spec(name("mstm_select_match", torch.float16, "N=577,r=40,Cm=1024"), 577, 40, 1024,
                                   torch.float16))
    for dtype, has_size, size_attn in ((torch.float32, True, False), (torch.float16, True, True),
                                       (torch.bfloat16, False, False), (torch.bfloat16, True, True)):
        variant = ("size_attn" if size_attn else "size") + ("" if has_size else ",ones")
        specs.append(merge_spec(name("mstm_weighted_merge", dtype, variant), dtype, has_size, size_attn))
    for dtype, size_attn in ((torch.float32, True), (torch.float16, True), (torch.bfloat16, False)):
        specs.append(backward_spec(name("mstm_merge_backward", dtype, "size_attn" if size_attn else "size"), dtype,
                                   True, size_attn, True, size_attn, True))
    return specs


register(_aot_specs)
