"""Attention primitives: class attention without the N x N map, proportional attention on SDPA, and
timm's ``Attention`` forward with both.

* :func:`cls_attention` -- the class token's attention row ``[B, N]`` from the class query alone
  (``O(N C)``). Softmax form (EViT, BAT, MSTM) or logit form (IdleViT).
* :func:`received_attention` -- the mean attention each token receives, its stand-in on models
  without a class token (chunked, never the ``N x N`` map).
* :func:`proportional_attention` -- attention with ``+log(s_j)`` on every key ``j`` (ToMe's
  proportional attention, Bolya et al., ICLR 2023), given to ``F.scaled_dot_product_attention`` as an
  additive mask (``impl="mask"``) or as one extra q/k column (``impl="column"``, mask-free, so flash
  attention stays eligible on CUDA).
* :func:`attention_forward` -- a timm ``Attention`` module's forward with proportional attention, an
  optional extra mask, and the extras the methods ask for (class attention, keys). The one forward
  the timm patch and IdleViT both run.

Notation: ``q``, ``k``, ``v`` are ``[B, H, N, d]`` per-head queries/keys/values (after q/k norm);
``size`` is ``[B, N]`` (positive, float); ``scale`` multiplies ``q . k`` (``d ** -0.5`` by default).
"""
from __future__ import annotations

from typing import Iterable, NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import _checks

__all__ = ["cls_attention", "received_attention", "proportional_attention", "PROP_ATTN_IMPLS",
           "default_prop_attn_impl", "attention_qkv", "attention_forward", "AttentionOutput", "NEEDS"]

#: Implementations of :func:`proportional_attention`; ``"auto"`` picks per device, see
#: :func:`default_prop_attn_impl`.
PROP_ATTN_IMPLS = ("auto", "column", "mask", "explicit")

#: The implementation ``impl="auto"`` uses, per device type: on CPU the mask form is the faster
#: (``benchmarks/bench_proportional_attention.py``); on CUDA a float mask rules flash attention out,
#: the column form keeps the call mask-free.
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
    _checks.check_float_tensor(t, name, " of shape [B, H, N, d]")
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
    _checks.check_float_tensor(size, "size", " of shape [B, N] or None")
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
    # k @ q_cls as a batched matrix-vector product on k's strides: 2.3x faster than the einsum
    # "bhd,bhnd->bhn" on CPU (ViT-S/16, B=32, one thread: 1.34 vs 3.1 ms, an SDPA call being 16.6 ms)
    logits = torch.matmul(k.float(), q_cls[..., None]).squeeze(-1) * scale  # [B, H, N]
    if size is not None:
        logits = logits + size.float().log()[:, None, :]
    if form == "softmax":
        return logits.softmax(dim=-1).mean(dim=1)
    return logits.mean(dim=1)


def received_attention(q: torch.Tensor, k: torch.Tensor, *, scale: Optional[float] = None,
                       size: Optional[torch.Tensor] = None, chunk: int = 64) -> torch.Tensor:
    """The mean attention each token receives, averaged over heads: the class-attention stand-in of
    models without a class token.

    ``a_j = mean_h sum_i w_i softmax_j(q_i,h . k_j,h * scale + log s_j)`` with query weights
    ``w_i = s_i / sum s`` (``1 / N`` without ``size``): the attention a token gets from all tokens,
    a merged query counting for the patches it stands for (the "attention received" importance
    of token-pruning work such as Zero-TPrune, Wang et al. CVPR 2024, without its iterations).
    The ``[B, H, N, N]`` map is never formed: queries are taken ``chunk`` rows at a time
    (``O(chunk N H)`` memory, ``O(N^2 H d)`` FLOPs), in float32.

    Args:
        q: queries ``[B, H, N, d]``, after q norm.
        k: keys ``[B, H, N, d]``, after k norm.
        scale: logit scale; ``d ** -0.5`` if None.
        size: ``[B, N]`` token sizes (positive), or None.
        chunk: query rows per step, ``>= 1``.

    Returns:
        float32 ``[B, N]`` (each row sums to 1), differentiable with respect to ``q`` and ``k``.

    Raises:
        TypeError: ``q``/``k``/``size`` not floating tensors, ``scale`` not a number, ``chunk`` not an int.
        ValueError: ranks other than 4, ``q``/``k`` shapes differ, ``size`` not ``[B, N]``, ``scale <= 0``,
            ``chunk < 1``.
    """
    _check_heads(q, "q")
    _check_heads(k, "k")
    if q.shape != k.shape:
        raise ValueError(f"q and k must both be [B, H, N, d], got {tuple(q.shape)} and {tuple(k.shape)}")
    scale = _check_scale(scale, q.shape[-1])
    size = _check_key_size(size, k)
    chunk = _checks.check_int(chunk, "chunk", 1, 1 << 30)
    B, H, N, _ = k.shape
    kf = k.float()
    bias = None if size is None else size.float().log()[:, None, None, :]  # [B, 1, 1, N]
    w = (torch.full((B, N), 1.0 / N, device=k.device) if size is None
         else size.float() / size.float().sum(dim=1, keepdim=True))  # [B, N] query weights
    total = torch.zeros(B, H, N, dtype=torch.float32, device=k.device)
    for start in range(0, N, chunk):
        stop = min(start + chunk, N)
        logits = torch.matmul(q[:, :, start:stop].float(), kf.transpose(-1, -2)) * scale
        if bias is not None:
            logits = logits + bias
        total = total + torch.matmul(w[:, None, None, start:stop], logits.softmax(dim=-1)).squeeze(-2)
    return total.mean(dim=1)


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
    * ``"auto"``: per device type, see :func:`default_prop_attn_impl`.

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


#: What :func:`attention_forward` can compute besides the output (``need``): ``"cls_attn"`` the class
#: token's attention row, softmax form ``[B, N]`` float32 (with the ``log size`` bias when ``size`` is
#: given; prefix columns included); ``"cls_attn_logits"`` the same row in logit form; ``"keys"`` the
#: head-mean of the keys ``[B, N, d]`` after k norm (ToMe's matching metric); ``"received_attn"`` the
#: mean attention each token receives (:func:`received_attention`, ``[B, N]`` float32).
NEEDS = frozenset({"cls_attn", "cls_attn_logits", "keys", "received_attn"})


class AttentionOutput(NamedTuple):
    """What :func:`attention_forward` returns.

    Attributes:
        x: the module's output ``[B, N, C]`` (after ``proj`` and ``proj_drop``), x's dtype.
        cls_attn: ``[B, N]`` float32 class attention, softmax form, or None if not asked for.
        cls_attn_logits: ``[B, N]`` float32 class attention, logit form, or None.
        keys: ``[B, N, d]`` head-mean of the keys (after k norm), or None.
        received_attn: ``[B, N]`` float32 mean attention received (:func:`received_attention`), or None.
        q, k: ``[B, H, N, d]`` queries and keys after q/k norm with ``return_qk=True``, else None.
    """

    x: torch.Tensor
    cls_attn: Optional[torch.Tensor] = None
    cls_attn_logits: Optional[torch.Tensor] = None
    keys: Optional[torch.Tensor] = None
    received_attn: Optional[torch.Tensor] = None
    q: Optional[torch.Tensor] = None
    k: Optional[torch.Tensor] = None


def attention_qkv(attn: nn.Module, x: torch.Tensor) -> tuple:
    """Per-head ``(q, k, v)``, each ``[B, H, N, d]``, of a timm ``Attention`` on ``x`` (after q/k norm)."""
    B, N, _ = x.shape
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    return attn.q_norm(q), attn.k_norm(k), v


def attention_forward(attn: nn.Module, x: torch.Tensor, *, size: Optional[torch.Tensor] = None,
                      attn_mask: Optional[torch.Tensor] = None, need: Iterable[str] = (),
                      prop_attn_impl: str = "auto", return_qk: bool = False) -> AttentionOutput:
    """Run a timm ``Attention`` module with proportional attention, returning the requested extras.

    Same computation as ``timm.layers.Attention.forward`` (``qkv`` -> ``q_norm``/``k_norm`` ->
    attention -> ``norm`` -> ``gate`` -> ``proj`` -> ``proj_drop``), plus ``+log(size_j)`` on every
    key when ``size`` is given. With the module's ``fused_attn`` on, :func:`proportional_attention`
    with ``impl=prop_attn_impl`` (with ``size=None`` the very SDPA call timm makes); with it off,
    the explicit softmax path.

    Args:
        attn: a ``timm.layers.Attention`` module.
        x: normalised tokens ``[B, N, C]``.
        size: ``[B, N]`` float token sizes, or None (no bias).
        attn_mask: extra mask (bool, True = attend, or additive float) broadcastable to
            ``[B, H, N, N]``, or None.
        need: subset of :data:`NEEDS` (class attention from the class query at position 0, ``O(N C)``).
        prop_attn_impl: ``"auto"``, ``"column"`` or ``"mask"`` (see :func:`proportional_attention`).
        return_qk: also return the queries and keys.

    Raises:
        ValueError: unknown entries in ``need``.
    """
    need = frozenset(need)
    if not need <= NEEDS:
        raise ValueError(f"need must be a subset of {sorted(NEEDS)}, got {sorted(need)}")
    B, N, _ = x.shape
    gate_layer = getattr(attn, "gate", None)
    gate = gate_layer(x).sigmoid() if gate_layer is not None else None
    q, k, v = attention_qkv(attn, x)
    dropout_p = attn.attn_drop.p if attn.training else 0.0
    if attn.fused_attn:
        out = proportional_attention(q, k, v, size, attn_mask=attn_mask, dropout_p=dropout_p, impl=prop_attn_impl)
    else:  # timm's explicit path
        out = proportional_attention(q, k, v, size, scale=attn.scale, attn_mask=attn_mask, dropout_p=dropout_p,
                                     impl="explicit")
    out = attn.norm(out.transpose(1, 2).reshape(B, N, attn.num_heads * attn.head_dim))
    if gate is not None:
        out = out * gate
    out = attn.proj_drop(attn.proj(out))
    # class attention with the same log-size bias the attention above used (none if size is None)
    return AttentionOutput(
        x=out,
        cls_attn=cls_attention(q, k, scale=attn.scale, size=size) if "cls_attn" in need else None,
        cls_attn_logits=(cls_attention(q, k, scale=attn.scale, size=size, form="logit")
                         if "cls_attn_logits" in need else None),
        keys=k.mean(dim=1) if "keys" in need else None,
        received_attn=received_attention(q, k, scale=attn.scale, size=size) if "received_attn" in need else None,
        q=q if return_qk else None,
        k=k if return_qk else None,
    )
