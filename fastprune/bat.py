"""BAT: keep the attentive tokens diverse -- match the attentive ones, cluster the inattentive ones.

Semantics from "Beyond Attentive Tokens: Incorporating Token Importance and Diversity for Efficient
Vision Transformers" (Long et al., CVPR 2023). At blocks 3, 6 and 9 (0-based) by default, after the
attention residual:

1. **decouple** the non-prefix tokens by class attention (softmax form): the top
   ``K = ceil(rho (N - p))`` are *attentive*, the rest *inattentive*; prefix tokens bypass everything;
2. **attentive token matching**: bipartite soft matching of homogeneous attentive tokens (cosine on
   the metric): ``r`` pairs are combined, so ``K - r`` attentive tokens remain;
3. **inattentive token clustering**: a simplified density-peak clustering (DPC-kNN) groups the
   inattentive tokens into ``c`` clusters, each of which becomes one token;
4. every combination is a weighted average with weights ``cls attention x size`` and sizes add up.

Output: prefix tokens, the ``K - r`` remaining attentive tokens in their original order, then the ``c``
cluster tokens in the original order of their centres: ``p + K - r + c`` tokens.

This module holds the PyTorch reference (:func:`bat_reference`, the specification the kernels are
tested against; one function per step of the paper) and the public functional API
(:func:`bat_tokens`, :func:`bat`). The fused Triton kernels live in ``kernels/bat.py``, the C++ CPU
kernels in ``csrc/bat_cpu.cpp`` (then the shared weighted merge).

Choices (the paper leaves them open):

* **number of pairs** ``r``: a parameter; by default ``r = c - 1``, so that the output has exactly
  EViT's token count at the same keep rate (``p + K + 1``: EViT's single fused token is replaced by
  ``c`` cluster tokens, paid for by ``c - 1`` matched attentive pairs), so BAT and EViT cost the
  same at the same keep rate. ``r`` is clipped to ``K // 2`` (the size of the smaller matching set);
* **bipartite soft matching**: the attentive tokens, in their original order, alternate between set
  A (even positions) and set B (odd positions); each A token's partner is its most cosine-similar B
  token (ties: lower index); the ``r`` A tokens with the most similar partners (ties: lower index)
  are merged into them. As in ToMe, two A tokens may share a partner;
* **number of clusters** ``c``, default 10 (:data:`DEFAULT_NUM_CLUSTERS`; our choice, the paper's
  value is not known to us), is clipped to the number of inattentive tokens; ``k`` nearest
  neighbours (default 5, as in TCFormer's DPC-kNN) is clipped to the number of other inattentive
  tokens and excludes the token itself;
* **DPC-kNN**: ``D = cdist(m, m) / sqrt(Cm)`` on the raw metric; density
  ``rho_i = exp(-mean of the k smallest D_ij^2)``; "higher density" ties are broken by the lower
  index (the densest token is unique); ``delta`` of the densest token is its largest distance to
  another inattentive token (0 if it is alone); centres are the top-``c`` of ``rho_i * delta_i``, ranked
  in log space (``log rho_i + log delta_i``, same order, no underflow of ``exp``), ties to the lower
  index; every token joins its nearest centre (ties: lower index), a centre joins itself;
* **merge weights** ``max(a_i, 1e-12) x size_i`` for both the matched pairs and the clusters; gradients
  flow into ``x`` and the class attention; matching and clustering are not differentiable.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from . import _checks, _ext, backends
from .reference import (COSINE_EPS, BATCounts, Merged, compute_dtype, merge_weights, pairwise_distance,
                        stable_order, topk_keep_mask, true_positions, weighted_merge)
from .schedules import DEFAULT_KEEP_RATE, DEFAULT_LAYERS, check_keep_rate, kept_count

__all__ = ["bat_tokens", "bat", "bat_reference", "bat_plan", "bat_index", "BATCounts", "decouple",
           "attentive_token_matching", "dpc_knn", "DEFAULT_KEEP_RATE", "DEFAULT_LAYERS",
           "DEFAULT_NUM_CLUSTERS", "DEFAULT_KNN", "BACKENDS"]

BACKENDS = backends.CPU_CPP_BACKENDS
#: Clusters of inattentive tokens per reduction layer **(choice)**; matched pairs default to one less.
DEFAULT_NUM_CLUSTERS = 10
#: Neighbours in DPC-kNN's density (TCFormer's default).
DEFAULT_KNN = 5


def bat_plan(num_tokens: int, num_prefix_tokens: int, keep_rate: float,
             num_clusters: int = DEFAULT_NUM_CLUSTERS, num_pairs: Optional[int] = None,
             k: int = DEFAULT_KNN) -> BATCounts:
    """The token counts of a BAT layer on ``N`` tokens (arguments assumed validated).

    ``K = ceil(rho (N - p))`` (at least 1); ``c = min(num_clusters, N - p - K)``;
    ``r = min(num_pairs, K // 2)`` with ``num_pairs = c - 1`` by default (EViT's token count);
    ``k = min(k, N - p - K - 1)``.
    """
    K = kept_count(num_tokens, num_prefix_tokens, keep_rate)
    n_inattentive = num_tokens - num_prefix_tokens - K
    c = min(num_clusters, n_inattentive)
    r = max(c - 1, 0) if num_pairs is None else num_pairs
    r = min(r, K // 2)
    return BATCounts(K, r, c, max(0, min(k, n_inattentive - 1)))


# ----------------------------------------------------------------------------------------------------
# The reference, step by step
# ----------------------------------------------------------------------------------------------------
def decouple(scores: torch.Tensor, K: int, num_prefix_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 1: ``(attentive, inattentive)`` ``[B, N]`` bool masks of the non-prefix tokens.

    The attentive tokens are the ``K`` with the largest class attention (ties: lower index).
    """
    keep = topk_keep_mask(scores, K, num_prefix_tokens)
    nonprefix = torch.ones_like(keep)
    nonprefix[:, :num_prefix_tokens] = False
    return keep & nonprefix, ~keep


def _gather_tokens(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return t.gather(1, idx[..., None].expand(-1, -1, t.shape[-1]))


def attentive_token_matching(metric: torch.Tensor, attentive: torch.Tensor, K: int,
                             r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 2: bipartite soft matching of the attentive tokens; returns ``(src, dst)``, ``[B, r]`` token indices.

    The ``K`` attentive tokens in their original order alternate between set A (even positions) and set B
    (odd positions). Each A token's partner is its most cosine-similar B token (ties: lower index);
    the ``r`` A tokens with the largest similarity (ties: lower index) are the sources ``src``, merged
    into their partners ``dst``.
    """
    attentive_idx = true_positions(attentive, K)  # [B, K]
    a_idx, b_idx = attentive_idx[:, 0::2], attentive_idx[:, 1::2]
    m = metric.to(compute_dtype(metric))
    m = m / m.norm(dim=-1, keepdim=True).clamp_min(COSINE_EPS)
    sim = _gather_tokens(m, a_idx) @ _gather_tokens(m, b_idx).transpose(1, 2)  # [B, |A|, |B|]
    partner = sim.argmax(dim=-1)  # first maximum: lower index
    best = sim.gather(-1, partner[..., None]).squeeze(-1)
    chosen = stable_order(best)[:, :r]
    return a_idx.gather(1, chosen), b_idx.gather(1, partner.gather(1, chosen))


def dpc_knn(metric: torch.Tensor, inattentive: torch.Tensor, n: int, c: int,
            k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 3: DPC-kNN clustering of the ``n`` inattentive tokens; returns ``(idx, cluster)``, both ``[B, n]``.

    ``idx`` are the inattentive token indices (ascending), ``cluster`` the cluster (``0 .. c - 1``, in
    the original order of the centres) each of them joins.

    * ``D = cdist(m, m) / sqrt(Cm)``;
    * density ``rho_i = exp(-mean_{j in kNN(i)} D_ij^2)`` over the ``k`` nearest other tokens;
    * ``delta_i = min_{j denser than i} D_ij`` ("denser": higher density, or equal density and a lower
      index); the densest token gets ``max_j D_ij``;
    * centres: the ``c`` largest ``rho_i * delta_i`` (compared as ``log rho_i + log delta_i``; ties:
      lower index); every token joins its nearest centre (ties: lower index), a centre itself.
    """
    idx = true_positions(inattentive, n)  # [B, n]
    B = idx.shape[0]
    m = _gather_tokens(metric.to(compute_dtype(metric)), idx)
    D = pairwise_distance(m) / math.sqrt(m.shape[-1])  # [B, n, n]
    eye = torch.eye(n, dtype=torch.bool, device=m.device)

    if k > 0:
        knn_sq = (D ** 2).masked_fill(eye, float("inf")).topk(k, dim=-1, largest=False).values
        log_density = -knn_sq.mean(dim=-1)  # log rho
    else:
        log_density = torch.zeros(B, n, dtype=D.dtype, device=D.device)

    ld_i, ld_j = log_density[:, :, None], log_density[:, None, :]
    lower_index = torch.ones(n, n, dtype=torch.bool, device=m.device).tril(-1)  # [i, j]: j < i
    denser = (ld_j > ld_i) | ((ld_j == ld_i) & lower_index)  # [B, i, j]: j is denser than i
    delta = D.masked_fill(~denser, float("inf")).min(dim=-1).values
    delta = torch.where(denser.any(dim=-1), delta, D.max(dim=-1).values)  # the densest token
    log_score = log_density + delta.log()  # log(rho * delta)

    centres = torch.zeros(B, n, dtype=torch.bool, device=m.device)
    centres.scatter_(1, stable_order(log_score)[:, :c], True)
    nearest = D.masked_fill(~centres[:, None, :], float("inf")).argmin(dim=-1)  # first minimum
    nearest = torch.where(centres, torch.arange(n, device=m.device).expand(B, n), nearest)
    cluster = (torch.cumsum(centres.long(), dim=1) - 1).gather(1, nearest)
    return idx, cluster


def bat_index(scores: torch.Tensor, metric: torch.Tensor, counts: BATCounts, num_prefix_tokens: int) -> torch.Tensor:
    """Steps 1-3 as an index map ``[B, N]`` int64: the output token each input token goes into."""
    B, N = scores.shape
    p = num_prefix_tokens
    K, r, c, k = counts
    attentive, inattentive = decouple(scores, K, p)

    survivors = ~inattentive  # prefix + attentive tokens not merged away
    if r > 0:
        src, dst = attentive_token_matching(metric, attentive, K, r)
        survivors = survivors.scatter(1, src, False)
    slots = torch.cumsum(survivors.long(), dim=1) - 1
    index = slots.clone()
    if r > 0:
        index.scatter_(1, src, slots.gather(1, dst))
    if c > 0:
        idx, cluster = dpc_knn(metric, inattentive, N - p - K, c, k)
        index.scatter_(1, idx, p + K - r + cluster)
    return index


def bat_reference(x: torch.Tensor, scores: torch.Tensor, keep_rate: float, *, size: Optional[torch.Tensor] = None,
                  metric: Optional[torch.Tensor] = None, num_prefix_tokens: int = 1,
                  num_clusters: int = DEFAULT_NUM_CLUSTERS, num_pairs: Optional[int] = None,
                  k: int = DEFAULT_KNN) -> Merged:
    """BAT token reduction (Long et al., CVPR 2023), written to read like the paper.

    Decouple by class attention, match attentive tokens, cluster inattentive tokens (DPC-kNN), then
    one weighted merge with weights ``max(a, 1e-12) x size``. No validation (see :func:`bat_tokens`).
    Computes in float32 (float64 for float64 inputs, which the gradient checks use).

    Args:
        x: ``[B, N, C]`` tokens.
        scores: ``[B, N]`` class attention, softmax form (prefix columns ignored).
        keep_rate: ``rho`` in ``(0, 1]``.
        size: ``[B, N]`` token sizes; ones if None.
        metric: ``[B, N, Cm]`` features for matching and clustering; ``x`` if None.
        num_prefix_tokens: ``p``.
        num_clusters, num_pairs, k: see :func:`bat_tokens`.

    Returns:
        :class:`~fastprune.Merged` ``(x [B, p + K - r + c, C], size, index [B, N])``; the input
        unchanged (identity index) when nothing is matched or clustered.
    """
    B, N, _ = x.shape
    p = num_prefix_tokens
    counts = bat_plan(N, p, keep_rate, num_clusters, num_pairs, k)
    size = torch.ones(B, N, dtype=torch.float32, device=x.device) if size is None else size
    if counts.r == 0 and counts.c == 0:
        return Merged(x, size, torch.arange(N, device=x.device).expand(B, N))
    metric = x if metric is None else metric
    index = bat_index(scores.detach(), metric.detach(), counts, p)
    scores = scores.to(compute_dtype(x))
    w = merge_weights(scores, size.to(scores.dtype), "size_attn")
    x_out, size_out = weighted_merge(x, w, size, index, counts.output_tokens(p))
    return Merged(x_out, size_out, index)


# ----------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------
def bat_tokens(x: torch.Tensor, attn: torch.Tensor, keep_rate: float, *, size: Optional[torch.Tensor] = None,
               metric: Optional[torch.Tensor] = None, num_prefix_tokens: int = 1,
               num_clusters: int = DEFAULT_NUM_CLUSTERS, num_pairs: Optional[int] = None,
               k: int = DEFAULT_KNN, backend: str = "auto") -> Merged:
    """Reduce tokens by BAT: keep attentive tokens, match similar ones, cluster the inattentive ones.

    BAT (Long et al., CVPR 2023), the steps of the module docstring: decouple by class attention,
    match ``r`` attentive pairs, cluster the inattentive tokens into ``c`` tokens (DPC-kNN), merge
    with weights ``cls attention x size``. Output: prefix tokens, the remaining attentive tokens in
    their original order, the cluster tokens in the order of their centres.

    Args:
        x: tokens ``[B, N, C]``, float32 / float16 / bfloat16, CPU or CUDA.
        attn: the class token's attention, softmax form: ``[B, N]``, ``[B, H, N]`` or ``[B, H, N, N]``
            (row 0), averaged over heads; on x's device. Prefix columns are ignored. Gradients flow
            into it through the merge weights.
        keep_rate: ``rho``, ``0 < keep_rate <= 1``; ``1.0`` with the default ``num_pairs`` is a no-op.
        size: ``[B, N]`` or ``[B, N, 1]`` token sizes (patches per token, positive); ones if None.
        metric: ``[B, N, Cm]`` features for matching and clustering (the head-mean of the keys in
            the timm patch); ``x`` if None. Receives no gradient.
        num_prefix_tokens: ``p``, leading tokens passed through untouched, ``0 <= p <= N - 1``.
        num_clusters: ``c >= 1``, clusters of inattentive tokens; clipped to their number
            (``N - p - K``; 0 when the keep rate keeps every token).
        num_pairs: ``r >= 0``, attentive tokens merged into a partner; clipped to ``K // 2``.
            Default ``c - 1`` (after clipping ``c``), giving EViT's token count ``p + K + 1``.
        k: ``k >= 1`` nearest neighbours for the density; clipped to ``N - p - K - 1``.
        backend: ``"auto"`` (Triton kernels on CUDA; on CPU the C++ kernels when the extension is
            built, else the reference), ``"triton"`` (also on CPU tensors under
            ``TRITON_INTERPRET=1``), ``"cpp"`` (C++, CPU tensors; same results as the reference, bit
            for bit) or ``"reference"``.

    Returns:
        :class:`~fastprune.Merged` ``(x, size, index)``: tokens ``[B, p + K - r + c, C]`` in x's dtype
        (computed in float32), sizes float32, and ``index`` ``[B, N]`` int64, the output token each
        input token went into. Tokens that absorb nothing are bit-identical to the input. With
        ``r == c == 0`` the input is returned unchanged (the same tensor object).

    Raises:
        TypeError: ``x``/``attn``/``size``/``metric`` not tensors or of an unsupported dtype,
            ``keep_rate`` not a real number, ``num_prefix_tokens``/``num_clusters``/``num_pairs``/``k``
            not ints.
        ValueError: wrong ranks or shapes, tensors on different devices, ``keep_rate`` outside
            ``(0, 1]``, ``num_prefix_tokens`` out of range, ``num_clusters < 1``, ``num_pairs < 0``,
            ``k < 1``, unknown ``backend``, ``backend="cpp"`` with CUDA tensors.
        RuntimeError: ``backend="cpp"`` when the C++ extension is not built.
    """
    p, scores, size = _checks.check_attention_inputs(x, attn, size, num_prefix_tokens)
    B, N, _ = x.shape
    keep_rate = check_keep_rate(keep_rate)
    metric = _checks.check_metric(metric, x)
    num_clusters = _checks.check_int(num_clusters, "num_clusters", 1, 2 ** 31 - 1)
    if num_pairs is not None:
        num_pairs = _checks.check_int(num_pairs, "num_pairs", 0, 2 ** 31 - 1)
    k = _checks.check_int(k, "k", 1, 2 ** 31 - 1)
    backend = backends.resolve_backend(backend, x, BACKENDS)

    counts = bat_plan(N, p, keep_rate, num_clusters, num_pairs, k)
    if counts.r == 0 and counts.c == 0:
        size = torch.ones(B, N, dtype=torch.float32, device=x.device) if size is None else size
        return Merged(x, size, torch.arange(N, device=x.device).expand(B, N))
    if backend == "triton":
        from .kernels.bat import bat_triton

        return bat_triton(x, scores, counts, size=size, metric=metric, num_prefix_tokens=p)
    if backend == "cpp":
        return _ext.bat_merge_cpp(x, scores, counts, size=size, metric=metric, num_prefix_tokens=p)
    return bat_reference(x, scores, keep_rate, size=size, metric=metric, num_prefix_tokens=p,
                         num_clusters=num_clusters, num_pairs=num_pairs, k=k)


def bat(x: torch.Tensor, attn: torch.Tensor, keep_rate: float, **kwargs) -> torch.Tensor:
    """BAT token reduction returning only the tokens ``[B, p + K - r + c, C]``.

    Same arguments, semantics and errors as :func:`bat_tokens`, which also returns the sizes and the
    position map.
    """
    return bat_tokens(x, attn, keep_rate, **kwargs).x
