"""EViT's inattentive token fusion on the GPU: the top-k selection, then the one weighted merge.

Semantics: "Not All Patches are What You Need: Expediting Vision Transformers via Token
Reorganizations" (Liang et al., ICLR 2022), written out step by step in
:func:`fastprune.evit.evit_reference`, which this file reproduces (same selection, same order,
float32 arithmetic):

1. **top-k selection**: keep the prefix tokens and the ``K`` non-prefix tokens with the largest class
   attention (ties: lower index);
2. **fusion**: the other tokens are fused into one token ``sum_i w_i x_i`` with ``w_i = max(a_i, eps)``
   (the paper's weights) or ``w_i / sum_j w_j`` (``normalize``); its size is the sum of their sizes;
3. output: prefix tokens and kept tokens in their original order, then the fused token.

Forward = three launches, no host synchronisation: the top-k selection
(:func:`~fastprune.kernels.select.select_topk_triton`, grid ``(B,)``, once per image) writes the index
map (kept tokens: their output slot; the others: ``p + K``); the weights (``a_i`` for fused tokens, 1
for kept ones: one elementwise op); then ``kernels/weighted_merge.py``'s merge, the one weighted merge
of every method, from the index map: kept rows are gathered (a lone token with weight 1: copied bit for
bit), the fused token is its "tail" row, summed over all the inattentive tokens in ``[32, 64]`` tiles.
Backward = the weighted merge's backward (one launch) and a masked copy of the weight gradient.

All arithmetic is float32 whatever the storage dtype; deterministic, no atomics, no sort.
"""
from __future__ import annotations

from typing import Optional

import torch

from fastprune.reference import Merged

from . import check_triton_device
from .aot import KernelSpec, register
from .select import select_topk_triton
from .weighted_merge import backward_spec, merge_spec, weighted_merge, weighted_merge_backward

__all__ = ["evit_triton", "EViTFunction"]


# ----------------------------------------------------------------------------------------------------
# Launchers and autograd Function
# ----------------------------------------------------------------------------------------------------
def _evit_forward(x, scores, size, K, p, normalize):
    index = select_topk_triton(scores, K, p, drop_slot=p + K, kept=False).slot  # kept: slot; fused: p + K
    fused = index == p + K
    w = torch.where(fused, scores, 1.0)  # a kept token is its row's only token, copied (weight 1)
    out, size_out, wsum = weighted_merge(x, w, size, index, p + K + 1, True, size_weight=False,
                                         normalize=normalize, tail=1)
    return out, size_out, index, w, fused, wsum


class EViTFunction(torch.autograd.Function):
    """Fused EViT ``(x, scores, size) -> (tokens, sizes, index)``: the top-k selection, then the weighted
    merge with weights ``max(a_i, eps)`` on the fused token's row (``kernels/weighted_merge.py``).

    Gradients reach ``x`` and ``scores`` (through the fusion weights of the fused tokens). Sizes and
    the index map are not differentiable; nothing flows through the selection.
    """

    @staticmethod
    def forward(ctx, x, scores, size, K, num_prefix_tokens, normalize):
        out, size_out, index, w, fused, wsum = _evit_forward(x, scores, size, K, num_prefix_tokens, normalize)
        ctx.mark_non_differentiable(size_out, index)
        ctx.save_for_backward(x, size, out, index, w, fused, wsum)
        ctx.normalize = normalize
        return out, size_out, index

    @staticmethod
    def backward(ctx, grad_out, grad_size_out, grad_index):
        x, size, out, index, w, fused, wsum = ctx.saved_tensors
        need_gx, need_ga = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_gx or need_ga):
            return None, None, None, None, None, None
        grad_x, grad_w, _ = weighted_merge_backward(grad_out, None, x, out, index, wsum, w, size, True, need_gx,
                                                    need_ga, False, size_weight=False, normalize=ctx.normalize)
        grad_scores = torch.where(fused, grad_w, 0.0) if need_ga else None
        return grad_x, grad_scores, None, None, None, None


def evit_triton(x: torch.Tensor, scores: torch.Tensor, K: int, size: Optional[torch.Tensor] = None,
                num_prefix_tokens: int = 1, normalize: bool = False) -> Merged:
    """EViT token fusion (Liang et al., ICLR 2022) with fused Triton kernels: three launches forward, two
    backward.

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
        normalize: fusion weights ``w_i / sum_j w_j`` instead of ``w_i = max(a_i, eps)``
            (``eps = 1e-12``).

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
    size = None if size is None else size.float()
    out, size_out, index = EViTFunction.apply(x, scores, size, int(K), int(num_prefix_tokens), bool(normalize))
    return Merged(out, size_out, index)


# ----------------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (see kernels/aot.py): ViT shapes, every storage dtype
# ----------------------------------------------------------------------------------------------------
def _aot_specs() -> list[KernelSpec]:
    """EViT's instantiations of the weighted merge (an index map, the fused token as a tail row, sizes
    out of the weights), paper and normalised forms, every storage dtype at least once (ViT-Ti/16 at
    224 px, ViT-B/16 at 384 px)."""
    specs = []
    for dtype, N, C, normalize in ((torch.float32, 197, 192, False), (torch.float16, 577, 768, True),
                                   (torch.bfloat16, 197, 192, True)):
        form = "normalized" if normalize else "paper"
        specs.append(merge_spec(f"evit_merge[{str(dtype).replace('torch.', '')},N={N},C={C},{form}]", dtype, True,
                                True, N=N, C=C, R=None, size_weight=False, normalize=normalize, tail=1))
    for dtype, normalize in ((torch.float32, True), (torch.bfloat16, False)):
        specs.append(backward_spec(f"evit_merge_backward[{str(dtype).replace('torch.', '')},"
                                   f"{'normalized' if normalize else 'paper'}]", dtype, True, True, True, True, False,
                                   size_weight=False, normalize=normalize))
    return specs


register(_aot_specs)
