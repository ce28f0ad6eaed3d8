"""PyTorch reference of fastprune's token reduction: the specification the kernels are tested against.

Written for reading, not for speed: every function is one step of a method, stated in its docstring
(ties, clamps, output order), so that this file alone specifies what the kernels compute. It is also
the CPU fallback of :func:`fastprune.merge`. All arithmetic is done in float32
(float64 if the input is float64, which the gradient checks use), whatever the input dtype.

Notation: ``x`` tokens ``[B, N, C]``; ``p`` prefix tokens (class, distillation, register tokens) at
the front, never merged; ``scores`` the class token's attention ``[B, N]``; ``r`` tokens removed.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

#: Norms below this are clamped before dividing in cosine similarity (a zero vector has similarity 0).
COSINE_EPS = 1e-6
#: Importance weights are clamped to at least this, so a weight sum is never zero.
WEIGHT_EPS = 1e-12
#: Weights of the weighted merge (see :func:`merge_weights`).
MERGE_WEIGHTS = ("size", "size_attn")


class Merged(NamedTuple):
    """Result of a token merge.

    Attributes:
        x: merged tokens ``[B, N - r, C]``, dtype of the input tokens.
        size: ``[B, N - r]`` float32, the number of patches each output token stands for.
        index: ``[B, N]`` int64, the output token every input position went into (prefix tokens map to
            themselves). ``x_in[b, i]`` contributes to ``x[b, index[b, i]]``.
    """

    x: torch.Tensor
    size: torch.Tensor
    index: torch.Tensor


class BATCounts(NamedTuple):
    """Token counts of one BAT layer: ``K`` attentive, ``r`` matched pairs, ``c`` clusters, ``k`` neighbours."""

    K: int
    r: int
    c: int
    k: int

    def output_tokens(self, num_prefix_tokens: int) -> int:
        """``p + K - r + c``."""
        return num_prefix_tokens + self.K - self.r + self.c


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 for half inputs, float64 for float64 inputs (gradient checks)."""
    return torch.promote_types(x.dtype, torch.float32)


def onnx_exporting() -> bool:
    """True while ``torch.onnx.export`` traces (then ``backend="auto"`` is the reference and the
    reference avoids the ops ONNX lacks: stable sort, ``cdist``)."""
    return torch.compiler.is_exporting() and torch.onnx.is_in_onnx_export()


def stable_order(values: torch.Tensor, descending: bool = True) -> torch.Tensor:
    """``[B, M]`` int64: each row's indices in stable sorted order (ties: lower index first; NaN
    counts as larger than every number, as in ``torch.sort``).

    Under ONNX export (ONNX has no stable sort) the order comes from ranks, ``rank_i = #{j before
    i}``, with ``O(M^2)`` comparisons; otherwise ``torch.sort(stable=True)``.
    """
    if not onnx_exporting():
        return torch.sort(values, dim=1, descending=descending, stable=True).indices
    return _rank_order(values, descending)


def _rank_order(values: torch.Tensor, descending: bool) -> torch.Tensor:
    """:func:`stable_order` by ranks: ``j`` goes before ``i`` if it is strictly better, or equal and lower."""
    M = values.shape[1]
    v, w = values[:, :, None], values[:, None, :]  # i along dim 1, j along dim 2
    better, tied = ((w > v) if descending else (w < v)), w == v
    if values.is_floating_point():
        nan_v, nan_w = torch.isnan(v), torch.isnan(w)
        better = (better & ~nan_v & ~nan_w) | ((nan_w & ~nan_v) if descending else (nan_v & ~nan_w))
        tied = tied | (nan_v & nan_w)
    pos = torch.arange(M, device=values.device)
    rank = (better | (tied & (pos[None, :] < pos[:, None]))).sum(dim=2)  # [B, M]
    return torch.zeros_like(rank).scatter_(1, rank, pos.expand_as(rank).contiguous())


def pairwise_distance(m: torch.Tensor) -> torch.Tensor:
    """``[B, n, n]`` Euclidean distances between the rows of ``m`` ``[B, n, C]``, by differences
    (no ``|a|^2 + |b|^2 - 2 a.b`` cancellation). Under ONNX export (ONNX has no ``cdist``) the
    differences are formed explicitly, ``O(n^2 C)`` memory."""
    if not onnx_exporting():
        return torch.cdist(m, m, compute_mode="donot_use_mm_for_euclid_dist")
    return (m[:, :, None, :] - m[:, None, :, :]).pow(2).sum(dim=-1).sqrt()


def topk_keep_mask(scores: torch.Tensor, k: int, num_prefix_tokens: int) -> torch.Tensor:
    """Top-k selection: ``[B, N]`` bool mask of prefix tokens plus the ``k`` highest-scoring others.

    Ties are broken by the lower token index (a stable descending sort).
    """
    B, N = scores.shape
    p = num_prefix_tokens
    order = stable_order(scores[:, p:])  # [B, N - p]
    keep = torch.zeros(B, N, dtype=torch.bool, device=scores.device)
    keep[:, :p] = True
    keep.scatter_(1, order[:, :k] + p, True)
    return keep


def output_slots(keep: torch.Tensor) -> torch.Tensor:
    """``[B, N]`` int64: the output position of every kept token (kept tokens keep their order)."""
    return torch.cumsum(keep.long(), dim=1) - 1


def true_positions(mask: torch.Tensor, count: int) -> torch.Tensor:
    """``[B, count]`` int64: the positions where each row of ``mask`` is True, ascending.

    Every row must hold exactly ``count`` True entries. A scatter by running count rather than
    ``nonzero()``, so that the shape is known without looking at the data (``torch.compile`` with
    ``fullgraph=True``, ``torch.export`` and ONNX export trace it).
    """
    B, N = mask.shape
    slot = torch.where(mask, torch.cumsum(mask.long(), dim=1) - 1, count)  # False entries: a spare column
    pos = torch.arange(N, device=mask.device).expand(B, N).contiguous()
    return torch.zeros(B, count + 1, dtype=torch.long, device=mask.device).scatter_(1, slot, pos)[:, :count]


def cosine_best_kept(metric: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Cosine matching: for every token, the index of the most similar kept token.

    ``sim(i, j) = <m_i, m_j> / (max(|m_i|, eps) max(|m_j|, eps))`` over kept, non-prefix ``j`` only
    (prefix tokens never absorb anything). Ties go to the lower index. Returns ``[B, N]`` int64.
    """
    m = metric.to(compute_dtype(metric))
    m = m / m.norm(dim=-1, keepdim=True).clamp_min(COSINE_EPS)
    sim = m @ m.transpose(1, 2)  # [B, N, N]
    sim = sim.masked_fill(~keep[:, None, :], float("-inf"))
    return sim.argmax(dim=-1)


def merge_weights(scores: torch.Tensor, size: torch.Tensor, weight: str) -> torch.Tensor:
    """Weights of the weighted merge: ``size`` (ToMe's size-weighted average, the default) or
    ``size * cls attention`` (MSTM's size x importance choice)."""
    if weight == "size":
        return size
    if weight == "size_attn":
        return size * scores.clamp_min(WEIGHT_EPS)
    raise ValueError(f"weight must be 'size' or 'size_attn', got {weight!r}")


def weighted_merge(x: torch.Tensor, w: torch.Tensor, size: torch.Tensor, index: torch.Tensor,
                   n_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted merge: ``x'_d = sum_{i -> d} (w_i / W_d) x_i`` with ``W_d = sum_{i -> d} w_i``; sizes add.

    Dividing each weight by its destination's total before summing makes a token that absorbs
    nothing come out bit-identical (its weight is exactly 1).
    """
    B, N, C = x.shape
    xf = x.to(compute_dtype(x))
    w = w.to(xf.dtype)
    total = torch.zeros(B, n_out, dtype=xf.dtype, device=x.device).scatter_add(1, index, w)
    share = w / total.gather(1, index)  # [B, N]
    out = torch.zeros(B, n_out, C, dtype=xf.dtype, device=x.device)
    out = out.scatter_add(1, index[..., None].expand(B, N, C), xf * share[..., None])
    size_out = torch.zeros(B, n_out, dtype=size.dtype, device=x.device).scatter_add(1, index, size)
    return out.to(x.dtype), size_out


def mstm_merge(x: torch.Tensor, scores: torch.Tensor, r: int, size: Optional[torch.Tensor] = None,
               metric: Optional[torch.Tensor] = None, num_prefix_tokens: int = 1,
               weight: str = "size") -> Merged:
    """MSTM token merging (Bian et al., 2023): merge non-crucial tokens into crucial ones.

    1. Crucial tokens: the ``N - p - r`` non-prefix tokens with the largest class attention.
    2. Each of the ``r`` others is matched to the crucial token it is most cosine-similar to on
       ``metric`` (many-to-one).
    3. Each crucial token becomes the weighted average of itself and the tokens matched to it;
       sizes add up.
    4. Output: the prefix tokens, then the crucial tokens in their original order.

    Args:
        x: ``[B, N, C]`` tokens.
        scores: ``[B, N]`` class attention (prefix columns are ignored).
        r: number of tokens to remove, ``0 <= r <= N - p - 1``.
        size: ``[B, N]`` token sizes; ones if None.
        metric: ``[B, N, Cm]`` features compared by cosine similarity; ``x`` if None.
        num_prefix_tokens: ``p``.
        weight: ``"size"`` or ``"size_attn"`` (see :func:`merge_weights`).

    Returns:
        :class:`Merged` ``(x [B, N - r, C], size [B, N - r], index [B, N])``.
    """
    B, N, _ = x.shape
    p = num_prefix_tokens
    scores = scores.to(compute_dtype(x))
    if size is None:
        size = torch.ones(B, N, dtype=scores.dtype, device=x.device)
    size = size.to(scores.dtype)
    metric = x if metric is None else metric

    keep = topk_keep_mask(scores.detach(), N - p - r, p)
    slots = output_slots(keep)
    candidates = keep.clone()
    candidates[:, :p] = False
    best = cosine_best_kept(metric.detach(), candidates)
    index = torch.where(keep, slots, slots.gather(1, best))

    w = merge_weights(scores, size, weight)
    x_out, size_out = weighted_merge(x, w, size, index, N - r)
    return Merged(x_out, size_out, index)
