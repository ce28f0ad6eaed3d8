"""The eager PyTorch op chains that authors of token-reduction methods write: the baselines to beat.

Written here from the methods' descriptions (METHODS.md), the way a research code base does it:
a chain of standard PyTorch ops in the model's dtype, each one a separate kernel launch and a
round trip through memory. They are what fastprune's fused kernels replace, so they are timed next
to them. They are not the specification (that is :mod:`fastprune.reference`); on distinct inputs
they compute the same result, which the benchmarks check before timing.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def mstm_merge_eager(x: torch.Tensor, scores: torch.Tensor, r: int, num_prefix_tokens: int = 1) -> torch.Tensor:
    """MSTM merge (Bian et al., 2023) as an eager op chain: sort, gather, normalise, bmm, argmax, scatter mean.

    1. ``argsort`` of the class attention: the ``N - p - r`` best non-prefix tokens are crucial
       (re-sorted by position to keep the spatial order), the ``r`` others are merged away.
    2. ``gather`` the crucial and the other tokens.
    3. L2-normalise both and take the batched matmul similarity ``[B, r, N - p - r]`` (no grad).
    4. ``argmax``: each other token's most similar crucial token.
    5. ``scatter_reduce(mean, include_self=True)``: each crucial token becomes the mean of itself
       and the tokens merged into it (the size-weighted average when every size is 1).

    Args:
        x: tokens ``[B, N, C]``, any float dtype; the chain computes in that dtype.
        scores: class attention ``[B, N]`` (prefix columns ignored).
        r: tokens removed, ``1 <= r <= N - p - 1``.
        num_prefix_tokens: ``p``, leading tokens passed through.

    Returns:
        ``[B, N - r, C]``: prefix tokens, then the crucial tokens in their original order.
    """
    B, N, C = x.shape
    p = num_prefix_tokens
    n_keep = N - p - r
    order = scores[:, p:].argsort(dim=1, descending=True) + p  # [B, N - p]
    keep_idx = order[:, :n_keep].sort(dim=1).values  # [B, N - p - r], spatial order
    other_idx = order[:, n_keep:]  # [B, r]
    kept = x.gather(1, keep_idx[..., None].expand(B, n_keep, C))
    others = x.gather(1, other_idx[..., None].expand(B, r, C))
    with torch.no_grad():
        sim = F.normalize(others, dim=-1) @ F.normalize(kept, dim=-1).transpose(1, 2)  # [B, r, N - p - r]
        dst = sim.argmax(dim=-1)  # [B, r]
    kept = kept.scatter_reduce(1, dst[..., None].expand(B, r, C), others, reduce="mean", include_self=True)
    return torch.cat([x[:, :p], kept], dim=1)


def cls_attention_full_map(q: torch.Tensor, k: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Class attention the usual way: the full ``[B, H, N, N]`` softmax map, then its row 0.

    This is what EViT/BAT/MSTM code bases do (they take ``attn[:, :, 0]`` from the attention
    map the block computes anyway, which rules out fused attention).

    Args:
        q, k: ``[B, H, N, d]`` queries and keys, any float dtype (the chain computes in it).
        scale: logit scale, ``d ** -0.5`` if None.

    Returns:
        ``[B, N]`` head-mean of the class token's softmax attention over all N keys, in q's dtype.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    attn = (q @ k.transpose(-2, -1) * scale).softmax(dim=-1)  # [B, H, N, N]
    return attn[:, :, 0].mean(dim=1)


def cls_attention_row0(q: torch.Tensor, k: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Class attention the economical eager way: only the class query's row, ``[B, H, 1, N]``.

    The best a plain PyTorch user can do without a kernel (three launches: matmul, softmax, mean);
    a fairer baseline for a fused kernel than the full map. Same arguments and result as
    :func:`cls_attention_full_map`.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    attn = (q[:, :, :1] @ k.transpose(-2, -1) * scale).softmax(dim=-1)  # [B, H, 1, N]
    return attn[:, :, 0].mean(dim=1)


def tome_merge_eager(x: torch.Tensor, r: int, num_prefix_tokens: int = 1) -> torch.Tensor:
    """ToMe (Bolya et al., ICLR 2023) as an eager op chain: normalise, bmm, max, argsort, gather, scatter mean.

    Bipartite soft matching on ``x`` itself as the metric: even positions form set A, odd set B;
    every A token's best B partner by cosine similarity (``max`` of the batched matmul); the ``r`` A
    tokens with the best scores (``argsort``) are averaged into their partners (``scatter_reduce``
    mean: the size-weighted average when every size is 1). The class token (position 0) is never a
    source. Output: the unmerged A tokens in their original order (class token first), then set B.
    Written for ``num_prefix_tokens == 1``, the case benchmarked.

    Args:
        x: tokens ``[B, N, C]``, any float dtype; the chain computes in that dtype.
        r: tokens removed, ``1 <= r <= (N - 1) // 2``.
        num_prefix_tokens: must be 1.

    Returns:
        ``[B, N - r, C]``.
    """
    if num_prefix_tokens != 1:
        raise ValueError(f"tome_merge_eager is written for one prefix token, got {num_prefix_tokens}")
    B, N, C = x.shape
    with torch.no_grad():
        m = F.normalize(x, dim=-1)
        sim = m[:, 0::2] @ m[:, 1::2].transpose(1, 2)  # [B, NA, NB]
        sim[:, 0, :] = float("-inf")  # the class token is never merged
        best, partner = sim.max(dim=-1)  # [B, NA]
        ranked = best.argsort(dim=-1, descending=True)
        src = ranked[:, :r]  # A tokens merged away
        unmerged = ranked[:, r:].sort(dim=-1).values  # original order, class token first
        dst = partner.gather(1, src)  # their B partners
    xa, xb = x[:, 0::2], x[:, 1::2]
    kept_a = xa.gather(1, unmerged[..., None].expand(B, unmerged.shape[1], C))
    src_x = xa.gather(1, src[..., None].expand(B, r, C))
    xb = xb.scatter_reduce(1, dst[..., None].expand(B, r, C), src_x, reduce="mean", include_self=True)
    return torch.cat([kept_a, xb], dim=1)


def evit_eager(x: torch.Tensor, scores: torch.Tensor, keep: int, num_prefix_tokens: int = 1) -> torch.Tensor:
    """EViT (Liang et al., ICLR 2022) as an eager op chain: argsort, gather, weighted sum, cat.

    The ``keep`` non-prefix tokens with the largest class attention are kept (in their original
    order); the others are fused into one token ``sum_i a_i x_i`` with their raw class attention as
    weights. Output: prefix, kept tokens, fused token.

    Args:
        x: tokens ``[B, N, C]``, any float dtype; the chain computes in that dtype.
        scores: class attention ``[B, N]`` (prefix columns ignored).
        keep: ``K``, non-prefix tokens kept, ``1 <= K < N - p``.
        num_prefix_tokens: ``p``.

    Returns:
        ``[B, p + K + 1, C]``.
    """
    B, N, C = x.shape
    p = num_prefix_tokens
    order = scores[:, p:].argsort(dim=1, descending=True) + p
    keep_idx = order[:, :keep].sort(dim=1).values
    drop_idx = order[:, keep:]
    kept = x.gather(1, keep_idx[..., None].expand(B, keep, C))
    dropped = x.gather(1, drop_idx[..., None].expand(B, N - p - keep, C))
    weights = scores.gather(1, drop_idx).to(x.dtype)
    fused = (dropped * weights[..., None]).sum(dim=1, keepdim=True)
    return torch.cat([x[:, :p], kept, fused], dim=1)
