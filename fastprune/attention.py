"""Class attention without the N x N map, and proportional attention that keeps SDPA fused.

Two primitives every token-reduction method in fastprune needs (see ``METHODS.md``, "Shared
primitives"):

* :func:`cls_attention` -- the class token's attention row ``[B, N]``, from the class query alone:
  ``O(N * C)`` work and memory, never the ``[B, H, N, N]`` attention map. Softmax form (EViT, BAT,
  MSTM) or logit form (IdleViT).
* :func:`proportional_attention` -- attention in which every key ``j`` gets ``+log(s_j)`` on its
  logit, ``s_j`` being the number of patches token ``j`` stands for (ToMe's proportional attention,
  Bolya et al., ICLR 2023). Two ways to give that bias to ``F.scaled_dot_product_attention``:
  an additive float mask (``impl="mask"``) or one extra q/k column (``impl="column"``), which leaves
  the call mask-free so that flash attention stays eligible on CUDA.

Notation: ``q``, ``k``, ``v`` are ``[B, H, N, d]`` per-head queries/keys/values (after q/k norm);
``size`` is ``[B, N]`` (positive, float); ``scale`` multiplies ``q . k`` (``d ** -0.5`` by default).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["cls_attention", "proportional_attention", "PROP_ATTN_IMPLS", "default_prop_attn_impl"]

#: Implementations of :func:`proportional_attention`; ``"auto"`` picks per device, see
#: :func:`default_prop_attn_impl`.
PROP_ATTN_IMPLS = ("auto", "column", "mask", "explicit")

#: The implementation ``impl="auto"`` uses, per device type.
#: CPU: ``"mask"``, measured with ``benchmarks/bench_proportional_attention.py`` (Xeon 2.8 GHz, fp32,
#: DeiT-Ti/S/B shapes, B = 1 and 32): the mask form costs 2-30 % over unbiased SDPA, the column form
#: 28-77 % (the CPU flash kernel takes a float mask at little cost, while the column form copies q, k,
#: v and pays for head dim 65).
#: CUDA: ``"column"``, because an additive float mask rules flash attention out (the column form keeps
#: the call mask-free, so flash stays eligible for fp16/bf16). Not yet timed on a GPU: run the
#: benchmark with ``--device cuda --dtype float16`` and revise.
_DEFAULT_IMPL = {"cpu": "mask", "cuda": "column"}

#: On CUDA the extra column is padded so that the head dim is a multiple of this (flash and
#: memory-efficient attention want q, k, v of equal, 8-aligned head dims). The CPU flash kernel only
#: needs equal head dims, so there the head dim grows by one.
_CUDA_HEAD_DIM_MULTIPLE = 8

CLS_ATTN_FORMS = ("softmax", "logit")


def default_prop_attn_impl(device: torch.device | str) -> str:
    """The implementation ``impl="auto"`` of :func:`proportional_attention` picks on ``device``."""
    return _DEFAULT_IMPL.get(torch.device(device).type, "mask")


def _check_heads(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [B, H, N, d], got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if t.dim() != 4:
        raise ValueError(f"{name} must have shape [B, H, N, d] (rank 4), got shape {tuple(t.shape)}")
    if min(t.shape) < 1:
        raise ValueError(f"{name} must have B, H, N, d >= 1, got shape {tuple(t.shape)}")


def _check_scale(scale, head_dim: int) -> float:
    if scale is None:
        return head_dim ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a Python float or None, got {type(scale).__name__}")
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    return float(scale)


def _check_key_size(size, k: torch.Tensor) -> Optional[torch.Tensor]:
    """``size`` is None or a floating ``[B, N]`` / ``[B, N, 1]`` tensor matching ``k``'s B and N."""
    if size is None:
        return None
    if not isinstance(size, torch.Tensor):
        raise TypeError(f"size must be a torch.Tensor of shape [B, N] or None, got {type(size).__name__}")
    if not size.is_floating_point():
        raise TypeError(f"size must be a floating-point tensor, got {size.dtype}")
    if size.device != k.device:
        raise ValueError(f"size is on {size.device} but k is on {k.device}: they must be on the same device")
    if size.dim() == 3 and size.shape[-1] == 1:
        size = size.squeeze(-1)
    B, _, N, _ = k.shape
    if size.dim() != 2 or size.shape[0] != B or size.shape[1] != N:
        raise ValueError(f"size must have shape [B, N] with B={B}, N={N} (k's batch and key count), "
                         f"got {tuple(size.shape)}")
    return size


def cls_attention(q: torch.Tensor, k: torch.Tensor, *, scale: Optional[float] = None,
                  size: Optional[torch.Tensor] = None, form: str = "softmax") -> torch.Tensor:
    """The class token's attention row, averaged over heads, from the class query only.

    Softmax form (EViT, Liang et al. ICLR 2022; BAT, Long et al. CVPR 2023; MSTM, Bian et al. 2023):
    ``a_j = mean_h softmax_j(q_cls,h . k_j,h * scale + log s_j)`` over all ``N`` keys. Prefix columns
    (class, distillation, register tokens) are part of the softmax and are returned; the caller drops
    them. ``log s_j`` is added only when ``size`` is given (proportional attention).

    Logit form (IdleViT, Xu et al. 2023): ``a_j = mean_h (q_cls,h . k_j,h * scale [+ log s_j])``, the
    head-mean of the pre-softmax logits (``log s_j`` again only when ``size`` is given).

    Only ``q[:, :, 0]`` (the class query) is read: ``O(N * C)`` work, the ``[B, H, N, N]`` attention
    map is never formed. Computed in float32 whatever the input dtype, so half-precision inputs
    cannot overflow.

    Args:
        q: queries ``[B, H, Nq, d]`` (``Nq`` >= 1; the class token's query at position 0), after q norm.
            Passing only the class query (``Nq == 1``) is fine.
        k: keys ``[B, H, N, d]``, after k norm; float32 / float16 / bfloat16 (any float dtype).
        scale: logit scale; ``d ** -0.5`` if None (timm's ``Attention.scale``).
        size: ``[B, N]`` token sizes (patches per token, must be positive), or None.
        form: ``"softmax"`` (probabilities, each row sums to 1 before the head mean) or ``"logit"``.

    Returns:
        float32 ``[B, N]`` on ``k``'s device. Differentiable with respect to ``q`` and ``k``.

    Raises:
        TypeError: ``q``/``k``/``size`` not floating tensors, ``scale`` not a number.
        ValueError: ranks other than 4, ``q``/``k`` mismatching in B, H or d, ``size`` not ``[B, N]``,
            tensors on different devices, ``scale <= 0``, unknown ``form``.
    """
    _check_heads(q, "q")
    _check_heads(k, "k")
    if q.device != k.device:
        raise ValueError(f"q is on {q.device} but k is on {k.device}: they must be on the same device")
    if q.shape[0] != k.shape[0] or q.shape[1] != k.shape[1] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q [B, H, Nq, d] and k [B, H, N, d] must agree in B, H and d, "
                         f"got q {tuple(q.shape)} and k {tuple(k.shape)}")
    if form not in CLS_ATTN_FORMS:
        raise ValueError(f"form must be one of {CLS_ATTN_FORMS}, got {form!r}")
    scale = _check_scale(scale, q.shape[-1])
    size = _check_key_size(size, k)

    q_cls = q[:, :, 0].float()  # [B, H, d]
    logits = torch.einsum("bhd,bhnd->bhn", q_cls, k.float()) * scale  # [B, H, N]
    if size is not None:
        logits = logits + size.float().log()[:, None, :]
    if form == "softmax":
        return logits.softmax(dim=-1).mean(dim=1)
    return logits.mean(dim=1)


def _log_size_bias(size: torch.Tensor) -> torch.Tensor:
    """``log(size)`` in float32, ``[B, N]``."""
    return size.float().log()


def _merge_masks(bias: torch.Tensor, attn_mask: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """Additive float mask ``bias [B, 1, 1, N] (+ attn_mask)`` in ``dtype``; a bool mask gives -inf."""
    if attn_mask is None:
        return bias.to(dtype)
    if attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros(attn_mask.shape, dtype=dtype, device=attn_mask.device).masked_fill(
            ~attn_mask, float("-inf"))
    return (bias + attn_mask.float()).to(dtype)


def proportional_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           size: Optional[torch.Tensor] = None, *, scale: Optional[float] = None,
                           attn_mask: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
                           impl: str = "auto") -> torch.Tensor:
    """Multi-head attention with ToMe's proportional attention: ``softmax(q k^T * scale + log s) v``.

    Proportional attention ("Token Merging: Your ViT but Faster", Bolya et al., ICLR 2023) adds
    ``log(s_j)`` to every query's logit for key ``j``, so that a merged token that stands for ``s_j``
    patches gets the attention weight those patches would have had together. With ``size=None`` this
    is exactly ``F.scaled_dot_product_attention(q, k, v)`` (same call, same backend).

    Implementations (all equal up to rounding; tested against each other and the explicit formula):

    * ``"column"``: fold the bias into one extra q/k column: ``q' = [q, 1]``,
      ``k' = [k, log(s) / scale]``, so ``q' . k' * scale = q . k * scale + log s``; ``v`` gets a zero
      column (SDPA's fused kernels want equal head dims; on CUDA all three are zero-padded to a
      multiple of 8) and the output is sliced back to ``d``. SDPA is called with the ORIGINAL
      ``scale``, and without a mask, so on CUDA flash attention stays eligible (fp16/bf16).
    * ``"mask"``: an additive float mask ``log(s)[:, None, None, :]``. On CUDA a float mask forces
      SDPA off flash attention (onto memory-efficient or math), which is slower.
    * ``"explicit"``: ``softmax(q k^T * scale + log s) @ v`` with the ``[B, H, N, N]`` map, in the
      input dtype (timm's non-fused path; what ``fused_attn=False`` runs).
    * ``"auto"``: the one measured fastest on this device type, see :func:`default_prop_attn_impl`
      and ``benchmarks/bench_proportional_attention.py``.

    Args:
        q, k, v: ``[B, H, N, d]`` (q may have its own query count ``Nq``), same dtype and device.
        size: ``[B, N]`` positive token sizes of the keys (float), or None for plain attention.
        scale: logit scale, ``d ** -0.5`` if None.
        attn_mask: optional extra mask broadcastable to ``[B, H, Nq, N]``: bool (True = attend) or
            additive float, as for ``F.scaled_dot_product_attention``.
        dropout_p: attention dropout probability (pass 0 in eval).
        impl: ``"auto"``, ``"column"``, ``"mask"`` or ``"explicit"``.

    Returns:
        ``[B, H, Nq, d]`` in ``q``'s dtype.

    Raises:
        TypeError: non-tensor or non-floating inputs, ``scale`` not a number.
        ValueError: ranks other than 4, mismatching B/H/d/N between q, k, v, ``size`` not ``[B, N]``,
            unknown ``impl``.
    """
    _check_heads(q, "q")
    _check_heads(k, "k")
    _check_heads(v, "v")
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q [B, H, Nq, d], k [B, H, N, d], v [B, H, N, dv] disagree: "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.device != k.device or k.device != v.device:
        raise ValueError("q, k and v must be on the same device")
    if impl not in PROP_ATTN_IMPLS:
        raise ValueError(f"impl must be one of {PROP_ATTN_IMPLS}, got {impl!r}")
    size = _check_key_size(size, k)
    head_dim = q.shape[-1]
    if impl == "auto":
        impl = default_prop_attn_impl(q.device)

    if impl == "explicit":
        scale = _check_scale(scale, head_dim)
        attn = (q * scale) @ k.transpose(-2, -1)
        if size is not None:
            attn = attn + _log_size_bias(size).to(attn.dtype)[:, None, None, :]
        if attn_mask is not None:
            attn = attn.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool \
                else attn + attn_mask
        attn = attn.softmax(dim=-1)
        if dropout_p > 0:
            attn = F.dropout(attn, p=dropout_p)
        return attn @ v

    if size is None:
        if scale is None:  # the very call timm's Attention makes
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                              scale=_check_scale(scale, head_dim))
    scale = _check_scale(scale, head_dim)
    log_size = _log_size_bias(size)  # [B, N] float32

    if impl == "mask":
        mask = _merge_masks(log_size[:, None, None, :], attn_mask, q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)

    # impl == "column": q' = [q, 1, 0...], k' = [k, log(s) / scale, 0...], v' = [v, 0...]
    dv = v.shape[-1]
    width = max(head_dim + 1, dv)
    if q.is_cuda:
        width = -(-width // _CUDA_HEAD_DIM_MULTIPLE) * _CUDA_HEAD_DIM_MULTIPLE
    q_col = q.new_zeros(q.shape[:-1] + (width - head_dim,))
    q_col[..., 0] = 1.0
    k_col = k.new_zeros(k.shape[:-1] + (width - head_dim,))
    k_col[..., 0] = (log_size / scale).to(k.dtype)[:, None, :]
    q2 = torch.cat([q, q_col], dim=-1)
    k2 = torch.cat([k, k_col], dim=-1)
    v2 = F.pad(v, (0, width - dv))
    out = F.scaled_dot_product_attention(q2, k2, v2, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale)
    return out[..., :dv]
