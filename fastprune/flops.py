"""FLOP counting that gives the same count on every supported torch, whichever attention kernel ran.

torch's :class:`~torch.utils.flop_counter.FlopCounterMode` knows a formula for some fused attention
kernels only, and which ones depends on the release (torch 2.14 has none for
``aten._scaled_dot_product_flash_attention_for_cpu``, the kernel ``F.scaled_dot_product_attention``
picks on CPU; 2.15 has one). :func:`counter` therefore maps every forward SDPA kernel the running
torch has to one formula, :func:`sdpa_flops`, equal to what the explicit ``q @ k^T`` and
``attn @ v`` matrix products count.
"""
from __future__ import annotations

from typing import Callable, Dict

import torch

#: Forward fused-attention ATen ops (those present in the running torch get :func:`sdpa_flops`).
SDPA_OPS = (
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_fused_attention_overrideable",
)


def sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of attention on ``query [B, Hq, Lq, D]``, ``key [B, Hk, Lk, D]``, ``value [B, Hk, Lk, Dv]``.

    ``2 B Hq Lq Lk D`` for ``q k^T`` plus ``2 B Hq Lq Lk Dv`` for ``attn v`` (multiply-adds x 2, as
    torch counts ``bmm``); the softmax, scale and mask are not counted, as for the explicit path.
    Grouped-query attention (``Hk`` dividing ``Hq``) counts per query head.

    Raises:
        ValueError: shapes that are not 4-d or do not agree.
    """
    if len(query_shape) != 4 or len(key_shape) != 4 or len(value_shape) != 4:
        raise ValueError(f"sdpa_flops: query, key and value must be 4-d [B, H, L, D], got {tuple(query_shape)}, "
                         f"{tuple(key_shape)}, {tuple(value_shape)}")
    b, hq, lq, d = query_shape
    _, hk, lk, dk = key_shape
    dv = value_shape[-1]
    if dk != d or value_shape[2] != lk or hq % hk:
        raise ValueError(f"sdpa_flops: incompatible query {tuple(query_shape)}, key {tuple(key_shape)}, "
                         f"value {tuple(value_shape)}")
    return 2 * b * hq * lq * lk * (d + dv)


def sdpa_mapping() -> Dict[object, Callable]:
    """``{aten op: formula}`` for every forward SDPA kernel of the running torch (see :data:`SDPA_OPS`)."""
    return {getattr(torch.ops.aten, name): sdpa_flops for name in SDPA_OPS if hasattr(torch.ops.aten, name)}


def counter(**kwargs) -> "torch.utils.flop_counter.FlopCounterMode":
    """A ``FlopCounterMode`` (``display=False`` unless given) that counts every SDPA kernel by :func:`sdpa_flops`."""
    from torch.utils.flop_counter import FlopCounterMode

    kwargs.setdefault("display", False)
    mapping = {**sdpa_mapping(), **kwargs.pop("custom_mapping", {})}
    return FlopCounterMode(custom_mapping=mapping, **kwargs)
