"""ToMe: bipartite soft matching and size-weighted token merging.

Semantics from "Token Merging: Your ViT but Faster" (Bolya et al., ICLR 2023). Every block, between
the attention residual and the MLP, ToMe removes ``r`` tokens:

1. metric = head-mean of the keys, L2-normalised;
2. alternate split: even positions form set A, odd positions set B;
3. every A token finds its best B partner (largest cosine similarity); the class token (position 0,
   in A) is never a source and, with a distillation token (position 1, in B), nothing merges into it;
4. the ``r`` A tokens with the highest best-partner similarity merge into their partners
   (size-weighted average; several A tokens may land on one B token); sizes add up;
5. output: the unmerged A tokens in their original order (class token first), then all B tokens.

This module holds the PyTorch reference (the specification) and the functional API
:func:`tome_merge_tokens` / :func:`tome_merge` with input checks and backend dispatch: the fused
Triton kernels of :mod:`fastprune.kernels.tome` on CUDA, the C++ kernels (``csrc/tome_cpu.cpp``, then
the shared weighted merge) on CPU. The schedules are in
:mod:`fastprune.schedules` (:func:`tome_schedule`, re-exported here).

Choices (where the description leaves room, or where the published algorithm is generalised):

* **Prefix tokens** (``p`` = timm's ``num_prefix_tokens``: class, distillation, register tokens). The
  A/B split is taken over all ``N`` positions, exactly as published, so that for ``p = 1`` (class
  token) and ``p = 2`` (class + distillation token) the A/B membership of every token is the
  published one. A prefix token in A is never a source, a prefix token in B is never a destination.
  ``r`` is clipped to ``(N - p) // 2``, which never exceeds the number of non-prefix A tokens.
* **Output order**: the prefix tokens first (in their original order), then the unmerged non-prefix
  A tokens, then the non-prefix B tokens, each group in its original order. For ``p = 1`` this *is*
  the published order (the class token is the first unmerged A token). For ``p = 2`` the published
  code puts the distillation token after the unmerged A tokens; here it stays at position 1, where
  timm's distilled heads read it (same tokens, same values, only that token's position differs).
  For ``p = 0`` the published code leaves the unmerged A tokens in descending-score order; here they
  keep their original order (step 5). A permutation of tokens changes no prediction of a
  ViT whose positions are already embedded.
* **Ties**: a best partner tie goes to the lower B index (first maximum); a tie in best-partner
  similarity between A tokens goes to the lower A index (stable descending sort). The published code
  sorts with an unstable sort, so its tie order is unspecified.
* **Zero metric vectors**: norms are clamped to ``COSINE_EPS`` before dividing, so a zero metric row
  has similarity 0 to everything (the published code divides by the raw norm and would produce NaN).
* All arithmetic is in float32 (float64 for float64 input, used by the gradient checks); half
  precision tokens are converted on load and the result is cast back, so nothing overflows.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch

from . import _checks, _ext, backends
from .reference import COSINE_EPS, Merged, compute_dtype, stable_order, weighted_merge
from .schedules import TOME_SCHEDULES as SCHEDULES, check_count, tome_schedule

__all__ = [
    "Matching", "bipartite_soft_matching", "merge_wavg", "tome_merge_reference", "tome_merge_tokens",
    "tome_merge", "clip_r", "tome_schedule", "tome_token_counts", "SCHEDULES", "BACKENDS",
]

BACKENDS = backends.CPU_CPP_BACKENDS


class Matching(NamedTuple):
    """Result of ToMe's bipartite soft matching (all ``int64`` except ``score``).

    Attributes:
        index: ``[B, N]`` the output token every input position goes to (see :class:`~fastprune.Merged`).
        score: ``[B, NA]`` best-partner cosine similarity of every A token (``NA = ceil(N / 2)``),
            ``-inf`` for prefix tokens in A; float32 (float64 for float64 metric).
        partner: ``[B, NA]`` index into B (``NB = N // 2``) of every A token's best partner.
        merged: ``[B, NA]`` bool, the ``r`` A tokens that merge into their partner.
        n_out: number of output tokens, ``N - r`` with ``r`` already clipped.
    """

    index: torch.Tensor
    score: torch.Tensor
    partner: torch.Tensor
    merged: torch.Tensor
    n_out: int


def clip_r(r: int, num_tokens: int, num_prefix_tokens: int) -> int:
    """ToMe's clip: at most ``(N - p) // 2`` tokens can be merged in one step (one per A token)."""
    return max(0, min(r, (num_tokens - num_prefix_tokens) // 2))


@torch.no_grad()
def bipartite_soft_matching(metric: torch.Tensor, r: int, num_prefix_tokens: int = 1) -> Matching:
    """ToMe's bipartite soft matching (Bolya et al., ICLR 2023): which tokens merge, and where to.

    Matching is not differentiable (it only chooses); the merge that follows carries the gradients.

    Args:
        metric: ``[B, N, Cm]`` features compared by cosine similarity (ToMe: head-mean of the keys).
        r: tokens to merge, ``r >= 0``; clipped to ``(N - p) // 2``.
        num_prefix_tokens: ``p``, leading tokens never merged (class, distillation, registers).

    Returns:
        :class:`Matching`.
    """
    B, N, _ = metric.shape
    p = num_prefix_tokens
    r = clip_r(r, N, p)
    device = metric.device

    # 1. metric, L2-normalised
    m = metric.to(compute_dtype(metric))
    m = m / m.norm(dim=-1, keepdim=True).clamp_min(COSINE_EPS)

    # 2. alternate split: A = even positions, B = odd positions
    pos_a = torch.arange(0, N, 2, device=device)
    pos_b = torch.arange(1, N, 2, device=device)
    a, b = m[:, 0::2], m[:, 1::2]

    # 3. best B partner of every A token; prefix tokens neither merge nor receive
    sim = a @ b.transpose(1, 2)  # [B, NA, NB]
    sim = sim.masked_fill((pos_a < p)[None, :, None], float("-inf"))  # class token: never a source
    sim = sim.masked_fill((pos_b < p)[None, None, :], float("-inf"))  # distillation token: no sink
    partner = sim.argmax(dim=-1)  # first maximum: ties go to the lower B index
    score = sim.gather(2, partner[..., None]).squeeze(2)

    # 4. the r A tokens with the highest best-partner similarity merge (ties: lower A index)
    ranked = stable_order(score)
    merged = torch.zeros_like(score, dtype=torch.bool).scatter_(1, ranked[:, :r], True)

    # 5. output order: prefix tokens, unmerged A tokens, B tokens, each group in original order
    pos = torch.arange(N, device=device)
    group = torch.where(pos < p, 0, torch.where(pos % 2 == 0, 1, 2))
    merged_pos = torch.zeros(B, N, dtype=torch.bool, device=device)
    merged_pos[:, 0::2] = merged
    order_key = (group * N + pos).expand(B, N).masked_fill(merged_pos, 3 * N)  # merged tokens last
    stays_sorted = stable_order(order_key, descending=False)  # [B, N]: output slot t holds input position
    slot = torch.empty(B, N, dtype=torch.long, device=device)
    slot.scatter_(1, stays_sorted, pos.expand(B, N).contiguous())
    partner_pos = (2 * partner + 1)  # input position of every A token's partner, [B, NA]
    index = slot.clone()
    index[:, 0::2] = torch.where(merged, slot.gather(1, partner_pos), slot[:, 0::2])
    return Matching(index, score, partner, merged, N - r)


def merge_wavg(x: torch.Tensor, size: torch.Tensor, index: torch.Tensor,
               n_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ToMe's size-weighted average: ``x'_d = sum_{i -> d} s_i x_i / sum_{i -> d} s_i``; sizes add.

    ``x`` ``[B, N, C]``, ``size`` ``[B, N]``, ``index`` ``[B, N]`` (input -> output token). Returns
    ``(x' [B, n_out, C] in x's dtype, size' [B, n_out])``. Differentiable in ``x`` and ``size``.
    """
    return weighted_merge(x, size, size, index, n_out)


def tome_merge_reference(x: torch.Tensor, r: int, size: Optional[torch.Tensor] = None,
                         metric: Optional[torch.Tensor] = None, num_prefix_tokens: int = 1) -> Merged:
    """ToMe token merging, PyTorch reference (no input checks; float64 allowed for gradcheck).

    Bipartite soft matching on ``metric`` (``x`` if None), then the size-weighted average.
    ``size`` defaults to ones. Returns :class:`~fastprune.Merged` ``(x [B, N - r, C], size [B, N - r],
    index [B, N])`` with ``r`` clipped to ``(N - p) // 2``.
    """
    B, N, _ = x.shape
    if size is None:
        size = torch.ones(B, N, dtype=compute_dtype(x), device=x.device)
    size = size.to(compute_dtype(x))
    metric = x if metric is None else metric
    matching = bipartite_soft_matching(metric.detach(), r, num_prefix_tokens)
    x_out, size_out = merge_wavg(x, size, matching.index, matching.n_out)
    return Merged(x_out, size_out, matching.index)


def tome_merge_tokens(x: torch.Tensor, r: int, *, metric: Optional[torch.Tensor] = None,
                      size: Optional[torch.Tensor] = None, num_prefix_tokens: int = 1,
                      backend: str = "auto") -> Merged:
    """Merge ``r`` tokens by ToMe's bipartite soft matching and size-weighted average.

    Semantics: "Token Merging: Your ViT but Faster" (Bolya et al., ICLR 2023), see the module
    docstring for the steps and for the choices (prefix tokens, output order, ties). Prefix tokens
    pass through untouched. Matching is not differentiable; gradients reach ``x`` (and ``size`` when
    it requires grad) through the weighted average.

    Args:
        x: tokens ``[B, N, C]``, float32 / float16 / bfloat16, CPU or CUDA.
        r: tokens to remove, a Python int ``>= 0``; clipped to ``(N - num_prefix_tokens) // 2``
            (ToMe can merge at most one token per A token in a step).
        metric: ``[B, N, Cm]`` matching features; ToMe uses the head-mean of the keys
            (``k.mean(1)`` of the ``[B, H, N, d]`` keys). ``x`` if None. No gradient reaches it.
        size: ``[B, N]`` or ``[B, N, 1]`` token sizes (patches per token, positive); ones if None.
        num_prefix_tokens: ``p``, leading tokens never merged (class, distillation, registers),
            ``0 <= p <= N - 1``.
        backend: ``"auto"`` (Triton kernels on CUDA; on CPU the C++ kernels when the extension is
            built, else the reference), ``"triton"`` (on CPU tensors only under
            ``TRITON_INTERPRET=1``), ``"cpp"`` (C++, CPU tensors; same results as the reference, bit
            for bit) or ``"reference"``.

    Returns:
        :class:`~fastprune.Merged` ``(x, size, index)``: merged tokens ``[B, N - r, C]`` in x's dtype
        (``r`` after clipping), sizes ``[B, N - r]`` float32 and ``index`` ``[B, N]`` int64, the output
        token every input position went into. With ``r == 0`` after clipping the tokens are returned
        unchanged (the same tensor object).

    Raises:
        TypeError: ``x``/``metric``/``size`` not tensors or of an unsupported dtype, ``r`` or
            ``num_prefix_tokens`` not ints.
        ValueError: wrong ranks, B/N mismatch between ``x`` and ``metric``/``size``, ``r < 0``,
            ``num_prefix_tokens`` out of range, tensors on different devices, unknown ``backend``,
            ``backend="cpp"`` with CUDA tensors.
        RuntimeError: ``backend="cpp"`` when the C++ extension is not built.
    """
    _checks.check_tokens(x)
    B, N, _ = x.shape
    p = _checks.check_int(num_prefix_tokens, "num_prefix_tokens", 0, N - 1)
    r = check_count(r)
    metric = _checks.check_metric(metric, x)
    size = _checks.check_size(size, x)
    backend = backends.resolve_backend(backend, x, BACKENDS)
    r = clip_r(r, N, p)

    if r == 0:
        size = torch.ones(B, N, dtype=torch.float32, device=x.device) if size is None else size
        index = torch.arange(N, device=x.device).expand(B, N)
        return Merged(x, size, index)
    if backend == "triton":
        from .kernels.tome import tome_merge_triton

        return tome_merge_triton(x, r, metric=metric, size=size, num_prefix_tokens=p)
    if backend == "cpp":
        out = _ext.tome_merge_cpp(x, r, size=size, metric=metric, num_prefix_tokens=p)
    else:
        out = tome_merge_reference(x, r, size=size, metric=metric, num_prefix_tokens=p)
    return Merged(out.x, out.size.float(), out.index)


def tome_merge(x: torch.Tensor, r: int, **kwargs) -> torch.Tensor:
    """Merge ``r`` tokens of ``x`` by ToMe and return only the tokens ``[B, N - r, C]``.

    Same arguments, semantics and errors as :func:`tome_merge_tokens`, which also returns the merged
    sizes and the position map.
    """
    return tome_merge_tokens(x, r, **kwargs).x


def tome_token_counts(num_tokens: int, schedule: Sequence[int], num_prefix_tokens: int = 1) -> list[int]:
    """Token count after every block when ToMe merges ``schedule[l]`` tokens in block ``l``.

    Applies the per-block clip ``r_l <= (N_l - p) // 2``. Example: ViT-B/16 at 224 (197 tokens,
    ``p = 1``), ``r = 13`` in all 12 blocks ends with ``197 - 12 * 13 = 41`` tokens.
    """
    n = _checks.check_int(num_tokens, "num_tokens", 1, 2 ** 62)
    p = _checks.check_int(num_prefix_tokens, "num_prefix_tokens", 0, n - 1)
    counts = []
    for r in schedule:
        n -= clip_r(int(r), n, p)
        counts.append(n)
    return counts
