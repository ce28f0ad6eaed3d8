"""IdleViT: every token stays, only the most attended ones go through each block; the token cut loss.

Semantics from "No Token Left Behind: Efficient Vision Transformer via Dynamic Token Idling" (Xu et
al., 2023), as specified in ``METHODS.md``:

* **Token idling.** In an idle layer the ``K`` non-prefix tokens with the highest class attention
  (logit form: ``a_j = mean_h q_cls,h . k_j,h * scale``) plus the prefix tokens are *selected*; only
  they go through the block, and their attention uses the keys and values of selected tokens only.
  Every other token is *idle*: it passes through unchanged (bit-identical) and the block outputs are
  written back to the selected positions. No token is ever removed, and an idle token may be selected
  again by a later layer.
* **Schedule** (:func:`idle_schedule`): layers 3-11 (0-based) of a 12-layer ViT keep
  ``K = int(N0 * rho^stage)`` of the ``N0`` patch tokens, with ``stage`` = 1, 1, 1, 2, 2, 2, 3, 3, 3
  (the evaluation schedule of the official code); layers 0-2 are full blocks.
* **Two forms that compute the same thing.** The *gather* form (inference) gathers the selected
  tokens into a ``[B, p + K, C]`` sequence, runs the unchanged block on it and scatters the outputs
  back (fused Triton gather/scatter kernels with a backward pass). The *mask* form (training) keeps
  all ``N`` tokens: keys of idle tokens get ``-inf`` (a boolean mask for
  ``F.scaled_dot_product_attention``, never an fp16-overflowing constant) and both residual updates
  are multiplied by the selection mask. The tests check that they agree.
* **Token cut loss** (:func:`token_cut_loss`), per idle layer, from the attention logits ``S`` before
  softmax and before the mask: ``W = softmax_j(mean_h S)``, ``D_ij = |m_i - m_j|`` with column 0 (the
  class token) zeroed, ``A_ij = m_i m_j``, ``inter_i = sum_j D_ij W_ij``, ``intra_i = sum_j A_ij W_ij``,
  ``L = mean_{b,i}(inter_i^2) + mean_{b,i}((intra_i - m_i)^2)``; averaged over the idle layers
  (:func:`cut_loss` collects it from a patched model) and added to the task loss with weight 20
  (:data:`CUT_LOSS_WEIGHT`).

Choices (``METHODS.md`` leaves them open):

* **Which attention ranks the tokens of layer l (choice).** A cheap class-query pass at the start of
  the block, with this block's own ``norm1`` and ``qkv``: the selection must happen before the block,
  and this ranks by exactly the logits the block's attention would compute (row 0 of the ``S`` the
  cut loss uses), in every layer including the first idle one, with no state carried between blocks.
  It costs ``O(N C)``, not ``O(N C^2)``: because ``mean_h q_h . k_h = q . k / H`` over the full width
  and ``k_j = W_k LN(x_j) + b_k``, the logits are ``scale / H * (LN(x_j) . (W_k^T q_cls) + q_cls . b_k)``
  -- one LayerNorm and one dot product per token, no keys are formed (:func:`cls_logits`; the
  literal computation from the keys is :func:`cls_logits_reference`). With q/k norm the keys are
  formed (the fold does not apply).
* ``K = floor(N0 * rho^stage + 1e-6)`` clipped to ``[1, N0]`` (the tolerance keeps ``N0 * rho^s`` that
  is an integer in exact arithmetic from losing one token to rounding). Ties: the lower index wins.
* Depths other than 12: the first idle layer is ``depth // 4`` and the remaining layers are split
  into three stages, ``stage = 1 + 3 (l - depth // 4) // (depth - depth // 4)``.
* Column 0 of ``D`` is zeroed as ``METHODS.md`` says (the class token only, also when there are more
  prefix tokens).

timm patch, ``fastprune.patch.timm(model, method="idle", r=0.7)``: ``r`` a float is the keep rate
``rho`` of the schedule above; an int ``r`` idles ``r`` tokens in every block, a list of ``depth``
ints ``r[l]`` in block ``l`` (:func:`idle_schedule`). The token count never changes, so the patch
state's ``num_tokens`` stays ``N``; its ``r_applied`` (and :func:`fastprune.patch.reduction_schedule`)
give the tokens each block leaves idle, ``N0 - K_l`` (``[0, 0, 0, 59, 59, 59, 100, 100, 100, 129, 129,
129]`` for ``r = 0.7`` and 196 patches). Options:

* ``form="auto"``: the mask form while the model is in training mode, the gather form in eval mode;
  ``"gather"`` / ``"mask"`` force one.
* ``cut_loss=True``: mask-form forwards record each idle layer's token cut loss; :func:`cut_loss`
  returns their mean after the forward (``loss = task + CUT_LOSS_WEIGHT * cut_loss(model)``).
* ``reselect=True``: the paper's rule, every token (idle ones included) competes in every idle layer.
  ``False`` (not the paper): only the previous idle layer's selected tokens compete, so an idle token
  stays idle (token pruning that keeps the idle tokens for the output). Off-the-shelf (no
  fine-tuning) this matters a lot: stale idle tokens make up ~40% of the later layers' selections
  with ``reselect=True`` on ViT-Ti/DeiT-Ti at ``rho = 0.7``, and accuracy drops far more; the paper
  fine-tunes with the cut loss.
* ``backend="auto"``: Triton on CUDA, PyTorch on CPU; ``"triton"`` / ``"reference"`` force one.

This module holds the PyTorch reference (the specification the kernels are tested against and the
CPU path), the public functional API with validation and backend dispatch, and the
``method="idle"`` registration for :func:`fastprune.patch.timm`. The Triton kernels are in
``kernels/idle.py``.
"""
from __future__ import annotations

import math
import numbers
import weakref
from typing import NamedTuple, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import _checks
from .attention import cls_attention
from .functional import _resolve_backend
from .reference import output_slots, topk_keep_mask

__all__ = [
    "IdleSelection", "IdleOutput", "idle_schedule", "idle_stage", "idle_keep_count", "cls_logits",
    "cls_logits_reference", "select_tokens", "idle_gather", "idle_scatter", "idle_block",
    "token_cut_loss", "token_cut_loss_reference", "cut_loss", "CUT_LOSS_WEIGHT", "DEFAULT_KEEP_RATE",
    "IDLE_FORMS",
]

#: Weight of the token cut loss in the training loss (the paper's recipe).
CUT_LOSS_WEIGHT = 20.0
#: Default keep rate ``rho`` (the paper's DeiT-S headline setting is 0.5; 0.7 is its mildest).
DEFAULT_KEEP_RATE = 0.7
#: ``"gather"``: the selected tokens go through the block as a short sequence (inference form);
#: ``"mask"``: all tokens, idle keys masked with -inf, residual updates times the selection mask
#: (training form, gives the cut loss).
IDLE_FORMS = ("gather", "mask")

#: Tolerance of the floor in ``K = floor(N0 * rho^stage)``.
_FLOOR_TOL = 1e-6


# --------------------------------------------------------------------------------------------------
# Schedule
# --------------------------------------------------------------------------------------------------

def idle_stage(layer: int, depth: int) -> int:
    """The stage of block ``layer`` in IdleViT's schedule: 0 (full block) or 1, 2, 3 (``rho^stage``).

    For ``depth = 12``: blocks 0-2 stage 0, 3-5 stage 1, 6-8 stage 2, 9-11 stage 3 (the official
    code's evaluation schedule). Other depths: first idle block ``depth // 4``, three equal stages
    after it (a choice; see the module docstring).
    """
    first = depth // 4
    if layer < first:
        return 0
    return 1 + (3 * (layer - first)) // (depth - first)


def idle_keep_count(num_patches: int, keep_rate: float, stage: int) -> int:
    """``K = floor(N0 * rho^stage)``, clipped to ``[1, N0]``: the patch tokens a stage-``stage``
    block selects (``stage = 0``: all ``N0``)."""
    if stage == 0:
        return num_patches
    return max(1, min(num_patches, math.floor(num_patches * keep_rate ** stage + _FLOOR_TOL)))


def _check_keep_spec(r, depth: int):
    """``r`` is a float keep rate in (0, 1], an int >= 0 or a sequence of ``depth`` ints >= 0."""
    if isinstance(r, bool):
        raise TypeError("r must be a float keep rate in (0, 1], an int or a list of ints, got a bool")
    if isinstance(r, numbers.Integral):
        if r < 0:
            raise ValueError(f"r must be >= 0, got {r}")
        return int(r)
    if isinstance(r, numbers.Real):
        r = float(r)
        if not 0.0 < r <= 1.0:  # also rejects NaN
            raise ValueError(f"a float r is IdleViT's keep rate rho and must satisfy 0 < rho <= 1, got {r}")
        return r
    if isinstance(r, Sequence) and not isinstance(r, str):
        if len(r) != depth:
            raise ValueError(f"a per-block r list must have one entry per block (depth={depth}), got {len(r)}")
        for i, ri in enumerate(r):
            if isinstance(ri, bool) or not isinstance(ri, numbers.Integral):
                raise TypeError(f"r[{i}] must be an int, got {type(ri).__name__} ({ri!r})")
            if ri < 0:
                raise ValueError(f"r[{i}] must be >= 0, got {ri}")
        return tuple(int(ri) for ri in r)
    raise TypeError(f"r must be a float keep rate in (0, 1], an int or a list of ints, got {type(r).__name__}")


def idle_schedule(r: Union[float, int, Sequence[int]], depth: int, num_patches: int) -> list[int]:
    """Selected patch tokens per block, ``[K_0, ..., K_{depth-1}]`` (``K_l = num_patches``: full block).

    Args:
        r: a float ``rho`` in ``(0, 1]``: IdleViT's schedule, ``K_l = int(N0 * rho^stage(l))`` (see
            :func:`idle_stage`; ``rho = 1`` idles nothing); an int: every block idles ``r`` tokens
            (``K = N0 - r``); a list of ``depth`` ints: block ``l`` idles ``r[l]``. ``K >= 1`` always.
        depth: number of blocks (>= 1).
        num_patches: ``N0``, the non-prefix tokens (196 for a /16 ViT at 224 px), >= 1.

    Raises:
        TypeError/ValueError: ``r`` of the wrong type or out of range, a list of the wrong length,
            ``depth`` or ``num_patches`` not positive ints.
    """
    depth = _checks.check_int(depth, "depth", 1, 1 << 16)
    num_patches = _checks.check_int(num_patches, "num_patches", 1, 1 << 30)
    r = _check_keep_spec(r, depth)
    if isinstance(r, float):
        return [idle_keep_count(num_patches, r, idle_stage(layer, depth)) for layer in range(depth)]
    if isinstance(r, int):
        return [max(1, num_patches - r)] * depth
    return [max(1, num_patches - ri) for ri in r]


# --------------------------------------------------------------------------------------------------
# Ranking: the class token's attention logits, before the block
# --------------------------------------------------------------------------------------------------

def _check_block(block) -> None:
    """``block`` must look like timm's pre-norm ``Block`` with a ``timm.layers.Attention``."""
    for name in ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2"):
        if not hasattr(block, name):
            raise TypeError(f"block must be a timm vision_transformer.Block (pre-norm, with norm1, attn, ls1, "
                            f"drop_path1, norm2, mlp, ls2, drop_path2); {type(block).__name__} has no {name!r}")
    for name in ("qkv", "num_heads", "head_dim", "scale", "q_norm", "k_norm", "proj"):
        if not hasattr(block.attn, name):
            raise TypeError(f"block.attn must be a timm.layers.Attention; {type(block.attn).__name__} has no {name!r}")


def _qkv(attn: nn.Module, xn: torch.Tensor):
    """Per-head ``q, k, v`` ``[B, H, N, d]`` of a timm ``Attention`` (after q/k norm)."""
    B, N, _ = xn.shape
    qkv = attn.qkv(xn).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    return attn.q_norm(q), attn.k_norm(k), v


def cls_logits_reference(x: torch.Tensor, block: nn.Module) -> torch.Tensor:
    """The class token's attention logits of ``block`` on tokens ``x``, computed literally.

    ``a_j = mean_h (q_cls,h . k_j,h * scale)`` with ``q, k`` from ``block.attn.qkv(block.norm1(x))``
    (after q/k norm); the class query is at position 0. Forms every key: ``O(N C^2)``.
    Returns float32 ``[B, N]`` (prefix columns included).
    """
    q, k, _ = _qkv(block.attn, block.norm1(x))
    return cls_attention(q[:, :, :1], k, scale=block.attn.scale, form="logit")


def _folded_class_query(x: torch.Tensor, block: nn.Module):
    """``(u [B, C], c [B], factor, ln_eps)`` with ``logits_j = factor * (LN(x_j) . u + c)``, or None
    when the fold does not apply (q/k norm). ``LN`` is the affine-free LayerNorm when ``ln_eps`` is
    not None (norm1 is a LayerNorm; its affine part is folded into ``u`` and ``c``), else ``norm1``."""
    attn, norm = block.attn, block.norm1
    if not (isinstance(attn.q_norm, nn.Identity) and isinstance(attn.k_norm, nn.Identity)):
        return None
    width = attn.num_heads * attn.head_dim
    w_qkv = attn.qkv.weight.float()
    b_qkv = attn.qkv.bias.float() if attn.qkv.bias is not None else None
    ln = isinstance(norm, nn.LayerNorm) and len(norm.normalized_shape) == 1
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    x_cls = x[:, 0].to(dtype)
    if ln:
        weight = norm.weight.to(dtype) if norm.weight is not None else None
        bias = norm.bias.to(dtype) if norm.bias is not None else None
        xn_cls = F.layer_norm(x_cls, norm.normalized_shape, weight, bias, norm.eps)
    else:
        xn_cls = norm(x[:, :1]).to(dtype)[:, 0]
    w_q, w_k = w_qkv[:width].to(dtype), w_qkv[width:2 * width].to(dtype)
    q = xn_cls @ w_q.T  # [B, H * d]
    if b_qkv is not None:
        q = q + b_qkv[:width].to(dtype)
    u = q @ w_k  # [B, C]: k_j . q = LN(x_j) . (W_k^T q) + b_k . q
    c = q @ b_qkv[width:2 * width].to(dtype) if b_qkv is not None else q.new_zeros(q.shape[0])
    if ln:
        if norm.bias is not None:
            c = c + u @ norm.bias.to(dtype)
        if norm.weight is not None:
            u = u * norm.weight.to(dtype)
    return u, c, attn.scale / attn.num_heads, (norm.eps if ln else None)


@torch.no_grad()
def cls_logits(x: torch.Tensor, block: nn.Module, *, backend: str = "auto") -> torch.Tensor:
    """The class token's attention logits of ``block``, from the class query alone, before the block.

    Same values as :func:`cls_logits_reference` (``a_j = mean_h q_cls,h . k_j,h * scale``, with
    ``q, k`` from ``block.attn.qkv(block.norm1(x))``), computed without forming the keys:
    ``a_j = scale / H * (LN(x_j) . (W_k^T q_cls) + q_cls . b_k)``, ``O(N C)`` (the LayerNorm's affine
    part is folded into the vector). Used to rank the tokens of an idle layer (IdleViT, Xu et al.
    2023; see the module docstring for this choice). Not differentiable (the ranking is not).

    Args:
        x: tokens ``[B, N, C]`` entering the block (float32/float16/bfloat16, or float64 on the
            reference backend); the class token at position 0.
        block: a timm ``Block`` with ``timm.layers.Attention``.
        backend: ``"auto"`` (Triton on CUDA, PyTorch on CPU), ``"triton"`` or ``"reference"``.

    Returns:
        float32 ``[B, N]`` (float64 for float64 input), prefix columns included.

    Raises:
        TypeError: ``x`` not a ``[B, N, C]`` float tensor, ``block`` not a timm ``Block``.
        ValueError: unknown ``backend``; ``x``'s width is not the block's.
    """
    if not (isinstance(x, torch.Tensor) and x.dtype == torch.float64):
        _checks.check_tokens(x)
    _check_block(block)
    if x.shape[-1] != block.attn.qkv.in_features:
        raise ValueError(f"x has width C={x.shape[-1]} but the block expects {block.attn.qkv.in_features}")
    backend = _resolve_backend(backend, x)
    folded = _folded_class_query(x, block)
    if folded is None:  # q/k norm: the keys must be formed
        return cls_logits_reference(x, block)
    u, c, factor, ln_eps = folded
    if backend == "triton" and x.dtype != torch.float64:
        from .kernels.idle import cls_logits_triton

        xin = x if ln_eps is not None else block.norm1(x)
        return cls_logits_triton(xin, u, c, factor, ln_eps)
    xf = x.to(u.dtype)
    xn = F.layer_norm(xf, (x.shape[-1],), eps=ln_eps) if ln_eps is not None else block.norm1(x).to(u.dtype)
    return factor * ((xn @ u[:, :, None])[..., 0] + c[:, None])


# --------------------------------------------------------------------------------------------------
# Selection, gather and scatter
# --------------------------------------------------------------------------------------------------

class IdleSelection(NamedTuple):
    """The tokens an idle layer sends through its block.

    Attributes:
        keep: ``[B, N]`` bool, True for the selected tokens (the prefix and the top ``K``).
        index: ``[B, p + K]`` int64, the selected positions in increasing order.
        slot: ``[B, N]`` int64, each token's row in ``index`` (its row in the gathered sequence), -1
            for idle tokens.
    """

    keep: torch.Tensor
    index: torch.Tensor
    slot: torch.Tensor


def select_tokens(scores: torch.Tensor, k: int, num_prefix_tokens: int = 1, *,
                  backend: str = "auto") -> IdleSelection:
    """Top-k selection of an idle layer: the prefix tokens plus the ``k`` best-scoring other tokens.

    Ties go to the lower index; NaN scores rank last (as ``-inf``). Not differentiable.

    Args:
        scores: ``[B, N]`` float class attention logits (prefix columns ignored).
        k: tokens to select besides the prefix, ``0 <= k <= N - p``.
        num_prefix_tokens: ``p``, ``0 <= p <= N``.
        backend: ``"auto"``, ``"triton"`` or ``"reference"``.

    Returns:
        :class:`IdleSelection`.

    Raises:
        TypeError: ``scores`` not a floating tensor, ``k``/``num_prefix_tokens`` not ints.
        ValueError: ``scores`` not ``[B, N]`` with B, N >= 1, ``k``/``p`` out of range, unknown backend.
    """
    if not isinstance(scores, torch.Tensor) or not scores.is_floating_point():
        raise TypeError(f"scores must be a floating-point torch.Tensor of shape [B, N], got "
                        f"{type(scores).__name__ if not isinstance(scores, torch.Tensor) else scores.dtype}")
    if scores.dim() != 2 or min(scores.shape) < 1:
        raise ValueError(f"scores must have shape [B, N] with B, N >= 1, got {tuple(scores.shape)}")
    N = scores.shape[1]
    p = _checks.check_int(num_prefix_tokens, "num_prefix_tokens", 0, N)
    k = _checks.check_int(k, "k", 0, N - p)
    backend = _resolve_backend(backend, scores)
    scores = scores.detach()
    if backend == "triton":
        from .kernels.idle import topk_select_triton

        index, slot = topk_select_triton(scores, k, p)
        return IdleSelection(slot >= 0, index, slot)
    scores = torch.where(torch.isnan(scores), torch.full_like(scores, float("-inf")), scores)
    keep = topk_keep_mask(scores, k, p)
    # selected positions in increasing order: a stable sort puts the selected tokens first, in their order
    # (a fixed [B, p + k] shape, unlike nonzero(), so torch.compile traces it without a graph break)
    index = torch.sort(keep.to(torch.uint8), dim=1, descending=True, stable=True).indices[:, :p + k]
    slot = torch.where(keep, output_slots(keep), -1)
    return IdleSelection(keep, index, slot)


def _check_selection(selection, x: torch.Tensor) -> None:
    if not isinstance(selection, IdleSelection):
        raise TypeError(f"selection must be an IdleSelection (from select_tokens), got {type(selection).__name__}")
    B, N = x.shape[:2]
    if selection.keep.shape != (B, N) or selection.slot.shape != (B, N) or selection.index.shape[0] != B:
        raise ValueError(f"selection is for shape {tuple(selection.keep.shape)}, x has B={B}, N={N}")
    _checks.check_same_device(x, selection.index, "selection")


def idle_gather(x: torch.Tensor, selection: IdleSelection, *, backend: str = "auto") -> torch.Tensor:
    """The selected tokens ``x[b, selection.index[b]]``: ``[B, p + K, C]`` in x's dtype, differentiable.

    Raises:
        TypeError/ValueError: ``x`` not ``[B, N, C]`` float, ``selection`` not an
            :class:`IdleSelection` for x's shape and device, unknown backend.
    """
    if not (isinstance(x, torch.Tensor) and x.dtype == torch.float64):
        _checks.check_tokens(x)
    _check_selection(selection, x)
    backend = _resolve_backend(backend, x)
    if backend == "triton" and x.dtype != torch.float64:
        from .kernels.idle import idle_gather_triton

        return idle_gather_triton(x, selection.index, selection.slot)
    return x.gather(1, selection.index[..., None].expand(-1, -1, x.shape[-1]))


def idle_scatter(x: torch.Tensor, y: torch.Tensor, selection: IdleSelection, *,
                 backend: str = "auto") -> torch.Tensor:
    """Write the block outputs back: ``out = x`` with ``out[b, index[b]] = y[b]``.

    Idle tokens come out bit-identical to ``x``. Differentiable with respect to ``x`` (idle rows)
    and ``y``.

    Args:
        x: tokens ``[B, N, C]`` entering the block.
        y: block outputs of the selected tokens ``[B, p + K, C]`` (cast to x's dtype).
        selection: the :class:`IdleSelection` ``y`` was computed for.
        backend: ``"auto"``, ``"triton"`` or ``"reference"``.

    Returns:
        ``[B, N, C]`` in x's dtype.

    Raises:
        TypeError/ValueError: bad ``x``/``y``/``selection`` shapes, dtypes or devices, unknown backend.
    """
    if not (isinstance(x, torch.Tensor) and x.dtype == torch.float64):
        _checks.check_tokens(x)
    _check_selection(selection, x)
    if not isinstance(y, torch.Tensor) or not y.is_floating_point():
        raise TypeError(f"y must be a floating-point torch.Tensor, got {type(y).__name__}")
    R = selection.index.shape[1]
    if y.shape != (x.shape[0], R, x.shape[2]):
        raise ValueError(f"y must have shape [B, p + K, C] = {(x.shape[0], R, x.shape[2])}, got {tuple(y.shape)}")
    _checks.check_same_device(x, y, "y")
    backend = _resolve_backend(backend, x)
    if backend == "triton" and x.dtype != torch.float64:
        from .kernels.idle import idle_scatter_triton

        return idle_scatter_triton(x, y, selection.index, selection.slot)
    return x.scatter(1, selection.index[..., None].expand(-1, -1, x.shape[-1]), y.to(x.dtype))


# --------------------------------------------------------------------------------------------------
# Token cut loss
# --------------------------------------------------------------------------------------------------

def _mask_float(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return keep.to(dtype) if keep.dtype == torch.bool else keep.detach().to(dtype)


def token_cut_loss_reference(logits: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The token cut loss of one idle layer, written like the paper (IdleViT, Xu et al., 2023).

    ``W = softmax_j(mean_h S)``; ``D_ij = |m_i - m_j|`` with column 0 zeroed; ``A_ij = m_i m_j``;
    ``inter_i = sum_j D_ij W_ij``; ``intra_i = sum_j A_ij W_ij``;
    ``L = mean_{b,i} inter_i^2 + mean_{b,i} (intra_i - m_i)^2``.

    Args:
        logits: ``S``, the attention logits before softmax and mask, ``[B, H, N, N]`` or
            ``[B, N, N]`` (already head-averaged).
        keep: ``m``, ``[B, N]`` selection mask (bool, or float in [0, 1]; not differentiated).

    Returns:
        0-d tensor, float32 (float64 for float64 logits).
    """
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    S = logits.to(dtype)
    T = S.mean(dim=1) if S.dim() == 4 else S  # [B, N, N]
    W = T.softmax(dim=-1)
    m = _mask_float(keep, dtype)
    D = (m[:, :, None] - m[:, None, :]).abs()
    D[:, :, 0] = 0.0
    A = m[:, :, None] * m[:, None, :]
    inter = (D * W).sum(dim=-1)
    intra = (A * W).sum(dim=-1)
    return (inter ** 2).mean() + ((intra - m) ** 2).mean()


def token_cut_loss(q: torch.Tensor, k: torch.Tensor, keep: torch.Tensor, *, scale: Optional[float] = None,
                   backend: str = "auto") -> torch.Tensor:
    """The token cut loss of one idle layer from its queries and keys (IdleViT, Xu et al., 2023).

    ``S = q k^T * scale`` per head (before softmax and before the idle-key mask), then
    :func:`token_cut_loss_reference`. The Triton kernel computes the head mean as one dot product per
    head, runs an online softmax over key tiles and never writes the ``[B, N, N]`` map in the forward
    pass; the backward pass writes the head-mean logit gradient once (``[B, N, N]`` float32, 1/H of
    an attention map) and forms ``dq``, ``dk`` with two batched matmuls. Computed in float32.

    Args:
        q, k: ``[B, H, N, d]`` queries and keys after q/k norm (what the attention multiplies),
            float32/float16/bfloat16 (float64 on the reference backend); differentiable.
        keep: ``[B, N]`` selection mask ``m``, bool or float in [0, 1] (no gradient).
        scale: logit scale, ``d ** -0.5`` if None.
        backend: ``"auto"`` (Triton on CUDA, PyTorch on CPU), ``"triton"`` or ``"reference"``.

    Returns:
        0-d float32 tensor (float64 for float64 inputs on the reference backend).

    Raises:
        TypeError: ``q``/``k``/``keep`` not tensors of a floating (``keep``: bool or floating) dtype,
            ``scale`` not a number.
        ValueError: ``q``, ``k`` not ``[B, H, N, d]`` of the same shape, ``keep`` not ``[B, N]``,
            different devices, ``scale <= 0``, unknown backend.
    """
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point torch.Tensor [B, H, N, d], got "
                            f"{type(t).__name__ if not isinstance(t, torch.Tensor) else t.dtype}")
        if t.dim() != 4 or min(t.shape) < 1:
            raise ValueError(f"{name} must have shape [B, H, N, d] with all sizes >= 1, got {tuple(t.shape)}")
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape [B, H, N, d], got {tuple(q.shape)} and {tuple(k.shape)}")
    if not isinstance(keep, torch.Tensor) or not (keep.dtype == torch.bool or keep.is_floating_point()):
        raise TypeError(f"keep must be a bool or floating torch.Tensor [B, N], got {type(keep).__name__}")
    B, H, N, d = q.shape
    if keep.shape != (B, N):
        raise ValueError(f"keep must have shape [B, N] = {(B, N)}, got {tuple(keep.shape)}")
    for name, t in (("k", k), ("keep", keep)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}: they must be on the same device")
    if scale is None:
        scale = d ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a float, got {type(scale).__name__}")
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    backend = _resolve_backend(backend, q)
    if backend == "triton" and q.dtype != torch.float64:
        from .kernels.idle import token_cut_stats_triton

        m = _mask_float(keep, torch.float32)
        inter, intra = token_cut_stats_triton(q, k.to(q.dtype), m, float(scale))
        return (inter ** 2).mean() + ((intra - m) ** 2).mean()
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    logits = (q.to(dtype) * scale) @ k.to(dtype).transpose(-2, -1)
    return token_cut_loss_reference(logits, keep)


# --------------------------------------------------------------------------------------------------
# The idle block, both forms
# --------------------------------------------------------------------------------------------------

class IdleOutput(NamedTuple):
    """Result of :func:`idle_block`.

    Attributes:
        x: ``[B, N, C]`` tokens after the block (idle tokens bit-identical to the input).
        selection: the :class:`IdleSelection` that went through the block (None when every token did).
        cut_loss: 0-d float32 token cut loss of this layer, or None (not asked for, or no token idle).
    """

    x: torch.Tensor
    selection: Optional[IdleSelection]
    cut_loss: Optional[torch.Tensor]


def _full_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm's pre-norm block: ``x + drop_path1(ls1(attn(norm1(x))))``, then the MLP residual."""
    x = x + block.drop_path1(block.ls1(block.attn(block.norm1(x))))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


def _masked_attention(attn: nn.Module, xn: torch.Tensor, keep: torch.Tensor):
    """timm ``Attention`` in which every query attends to the selected keys only (idle keys -inf,
    through a boolean mask). Returns ``(out [B, N, C], q, k)`` with ``q, k`` ``[B, H, N, d]``."""
    B, N, _ = xn.shape
    gate_layer = getattr(attn, "gate", None)
    gate = gate_layer(xn).sigmoid() if gate_layer is not None else None
    q, k, v = _qkv(attn, xn)
    mask = keep[:, None, None, :]  # [B, 1, 1, N], True = attend
    dropout_p = attn.attn_drop.p if attn.training else 0.0
    if getattr(attn, "fused_attn", True):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=attn.scale)
    else:
        a = ((q * attn.scale) @ k.transpose(-2, -1)).masked_fill(~mask, float("-inf"))
        out = attn.attn_drop(a.softmax(dim=-1)) @ v
    out = out.transpose(1, 2).reshape(B, N, attn.num_heads * attn.head_dim)
    out = attn.norm(out) if hasattr(attn, "norm") else out
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out)), q, k


def _masked_block(block: nn.Module, x: torch.Tensor, keep: torch.Tensor):
    """Training form: all tokens, idle keys masked, residual updates multiplied by the mask ``m``."""
    m = keep.to(x.dtype)[..., None]
    out, q, k = _masked_attention(block.attn, block.norm1(x), keep)
    x = x + m * block.drop_path1(block.ls1(out))
    x = x + m * block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
    return x, q, k


def idle_block(block: nn.Module, x: torch.Tensor, k: int, *, num_prefix_tokens: int = 1, form: str = "gather",
               cut_loss: bool = False, candidates: Optional[torch.Tensor] = None,
               backend: str = "auto") -> IdleOutput:
    """Run one timm ``Block`` as an IdleViT idle layer (Xu et al., 2023).

    1. Rank: the class token's attention logits of this block, before the block (:func:`cls_logits`).
    2. Select the prefix tokens and the ``k`` best-ranked others (:func:`select_tokens`).
    3. ``form="gather"``: gather them (:func:`idle_gather`), run the block on the ``p + k`` tokens,
       write the outputs back (:func:`idle_scatter`). ``form="mask"``: run the block on all tokens
       with the idle keys masked (``-inf``) and both residual updates multiplied by the selection
       mask. Both forms give the same tokens; idle tokens are bit-identical to the input.
    4. ``cut_loss=True`` (mask form only): also the token cut loss from this block's logits.

    With ``k == N - p`` (nothing idle) this is exactly the unchanged block.

    Args:
        block: a timm ``vision_transformer.Block`` with ``timm.layers.Attention``.
        x: tokens ``[B, N, C]`` (float32/float16/bfloat16; float64 with the reference backend), the
            class token at position 0.
        k: non-prefix tokens to select, ``1 <= k <= N - p``.
        num_prefix_tokens: ``p >= 1`` (the class token ranks the others).
        form: ``"gather"`` (inference) or ``"mask"`` (training).
        cut_loss: compute the token cut loss (needs ``form="mask"``).
        candidates: optional ``[B, N]`` bool, the tokens that may be selected (e.g. the previous idle
            layer's selection, so that an idle token is never selected again -- NOT the paper's rule,
            see the ``reselect`` option of the patch); others rank last. None: every token (IdleViT).
        backend: ``"auto"`` (Triton on CUDA, PyTorch on CPU), ``"triton"`` or ``"reference"``.

    Returns:
        :class:`IdleOutput` ``(x, selection, cut_loss)``.

    Raises:
        TypeError: ``block`` not a timm ``Block``, ``x`` not a float ``[B, N, C]`` tensor, ``k``,
            ``num_prefix_tokens`` not ints, ``cut_loss`` not a bool.
        ValueError: ``k``/``num_prefix_tokens`` out of range, unknown ``form``/``backend``,
            ``cut_loss`` with ``form="gather"``, width mismatch, ``candidates`` not a ``[B, N]`` bool
            tensor on x's device.
    """
    if not (isinstance(x, torch.Tensor) and x.dtype == torch.float64):
        _checks.check_tokens(x)
    _check_block(block)
    B, N, C = x.shape
    p = _checks.check_int(num_prefix_tokens, "num_prefix_tokens", 1, max(1, N - 1))
    if N - p < 1:
        raise ValueError(f"x must have at least one non-prefix token (N={N}, num_prefix_tokens={p})")
    k = _checks.check_int(k, "k", 1, N - p)
    if form not in IDLE_FORMS:
        raise ValueError(f"form must be one of {IDLE_FORMS}, got {form!r}")
    if not isinstance(cut_loss, bool):
        raise TypeError(f"cut_loss must be a bool, got {type(cut_loss).__name__}")
    if cut_loss and form != "mask":
        raise ValueError("cut_loss=True needs form='mask' (the loss uses the logits of all tokens)")
    if candidates is not None and not (isinstance(candidates, torch.Tensor) and candidates.dtype == torch.bool
                                       and candidates.shape == (B, N) and candidates.device == x.device):
        raise ValueError(f"candidates must be a bool tensor of shape [B, N] = {(B, N)} on x's device")
    backend = _resolve_backend(backend, x)

    if k == N - p:  # nothing idle: the plain block
        return IdleOutput(_full_block(block, x), None, None)
    scores = cls_logits(x, block, backend=backend)
    if candidates is not None:
        scores = scores.masked_fill(~candidates, float("-inf"))
    selection = select_tokens(scores, k, p, backend=backend)
    if form == "gather":
        xs = idle_gather(x, selection, backend=backend)
        return IdleOutput(idle_scatter(x, _full_block(block, xs), selection, backend=backend), selection, None)
    out, q, kk = _masked_block(block, x, selection.keep)
    loss = token_cut_loss(q, kk, selection.keep, scale=block.attn.scale, backend=backend) if cut_loss else None
    return IdleOutput(out, selection, loss)


# --------------------------------------------------------------------------------------------------
# timm patch: method="idle"
# --------------------------------------------------------------------------------------------------

class _ForwardCutLoss:
    """What one forward of a patched model records: the token cut losses, the last selection."""

    def __init__(self) -> None:
        self.computed = False  # some block ran in the mask form with cut_loss=True
        self.losses: dict = {}  # block index -> 0-d loss, for the blocks that idled tokens
        self.selected: Optional[torch.Tensor] = None  # [B, N] bool, the last idle layer's selection


#: Per patched model (keyed by its PatchState): the last forward's :class:`_ForwardCutLoss`.
_CUT_LOSSES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()

IDLE_OPTION_FORMS = ("auto",) + IDLE_FORMS


def _idle_validate(options) -> None:
    if options["form"] not in IDLE_OPTION_FORMS:
        raise ValueError(f"form must be one of {IDLE_OPTION_FORMS}, got {options['form']!r}")
    if not isinstance(options["cut_loss"], bool):
        raise TypeError(f"cut_loss must be a bool, got {options['cut_loss']!r}")
    if not isinstance(options["reselect"], bool):
        raise TypeError(f"reselect must be a bool, got {options['reselect']!r}")
    if options["backend"] not in ("auto", "triton", "reference"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'reference', got {options['backend']!r}")


def _idle_block_r(sctx) -> int:
    """``method="idle"``'s ``block_r`` hook: the tokens block ``l`` leaves idle, ``N0 - K_l`` with
    ``K_l`` from :func:`idle_schedule` (``N0`` = the patch count), so that the patch state's
    ``r_applied`` and :func:`fastprune.patch.reduction_schedule` show IdleViT's real counts."""
    k = idle_schedule(sctx.r, sctx.depth, sctx.num_patches)[sctx.block_index]
    return sctx.num_patches - k


def _idle_block_forward(block: nn.Module, x: torch.Tensor, ctx) -> tuple:
    """``method="idle"``'s block forward for :func:`fastprune.patch.timm` (see :func:`idle_block`)."""
    st = ctx.state
    p = ctx.num_prefix_tokens
    if p < 1:
        raise ValueError("method 'idle' ranks tokens by the class token's attention: the model needs a class token")
    if ctx.block_index == 0 or st not in _CUT_LOSSES:
        _CUT_LOSSES[st] = _ForwardCutLoss()
    k = x.shape[1] - p - ctx.r  # ctx.r: the tokens this block idles, from _idle_block_r
    options = ctx.options
    form = options["form"]
    if form == "auto":
        form = "mask" if block.training else "gather"
    want_loss = options["cut_loss"] and form == "mask"
    record = _CUT_LOSSES[st]
    candidates = None if options["reselect"] or record.selected is None else record.selected
    out = idle_block(block, x, k, num_prefix_tokens=p, form=form, cut_loss=want_loss, candidates=candidates,
                     backend=options["backend"])
    record.computed |= want_loss
    if out.cut_loss is not None:
        record.losses[ctx.block_index] = out.cut_loss
    if out.selection is not None:
        record.selected = out.selection.keep
    return out.x, None, None


def cut_loss(model: nn.Module) -> torch.Tensor:
    """The token cut loss of a model patched with ``method="idle"``, from its last forward.

    The mean over the idle layers (blocks that idled at least one token) of each layer's
    :func:`token_cut_loss`; the training loss is ``task_loss + CUT_LOSS_WEIGHT * cut_loss(model)``.
    Recorded by forwards in the mask form (``form="mask"``, or ``"auto"`` with the model in training
    mode) with ``cut_loss=True`` (the default). A 0-d zero when no layer idled.

    Raises:
        ValueError: ``model`` is not patched with ``method="idle"``.
        RuntimeError: the last forward ran in the gather form (no loss was computed).
    """
    from . import patch

    st = patch.state(model)
    if st.method.name != "idle":
        raise ValueError(f"model is patched with method {st.method.name!r}, not 'idle'")
    record = _CUT_LOSSES.get(st)
    if record is None:
        raise RuntimeError("no forward of the patched model has run yet")
    if not record.computed:
        raise RuntimeError("the last forward computed no token cut loss: it needs the mask form (form='mask', "
                           "or form='auto' with model.train()) and cut_loss=True")
    if not record.losses:
        return torch.zeros((), device=next(model.parameters()).device)
    return torch.stack([v.float() for v in record.losses.values()]).mean()


def register_with_patch() -> None:
    """Register ``method="idle"`` with :func:`fastprune.patch.timm` (done when ``fastprune.patch`` is
    first imported). See the module docstring for ``r`` and the options."""
    from . import patch

    if "idle" not in patch.available_methods():
        patch.register_method("idle", block_forward=_idle_block_forward,
                              defaults={"form": "auto", "cut_loss": True, "reselect": True, "backend": "auto"},
                              validate=_idle_validate, block_r=_idle_block_r, removes_tokens=False)
