"""IdleViT: every token stays, only the most attended ones go through each block.

Semantics from "No Token Left Behind: Efficient Vision Transformer via Dynamic Token Idling" (Xu et
al., 2023):

* **Token idling.** In an idle layer the ``K`` non-prefix tokens with the highest class attention
  (logit form: ``a_j = mean_h q_cls,h . k_j,h * scale``) plus the prefix tokens are *selected*; only
  they go through the block, and their attention uses the keys and values of selected tokens only.
  Every other token is *idle*: it passes through unchanged (bit-identical). No token is removed, and
  an idle token may be selected again by a later layer.
* **Schedule** (:func:`fastprune.schedules.idle_schedule`): layers 3-11 (0-based) of a 12-layer ViT
  keep ``K = int(N0 * rho^stage)`` of the ``N0`` patch tokens, ``stage`` = 1, 1, 1, 2, 2, 2, 3, 3, 3;
  layers 0-2 are full blocks.
* **Two forms that compute the same thing.** *gather* (inference): the selected tokens go through
  the unchanged block as a ``[B, p + K, C]`` sequence and are scattered back. *mask* (training): all
  ``N`` tokens, keys of idle tokens masked (a boolean mask for SDPA), both residual updates
  multiplied by the selection mask.
* **Token cut loss**: :mod:`fastprune.idle_loss` (re-exported here); :func:`cut_loss` collects it from
  a patched model.

Choices (the paper leaves them open):

* **Ranking.** A class-query pass at the start of the block with this block's own ``norm1`` and
  ``qkv``, i.e. row 0 of the logits its attention computes, folded so that no key is formed:
  ``mean_h q_h . k_h = q . k / H`` and ``k_j = W_k LN(x_j) + b_k`` give
  ``scale / H * (LN(x_j) . (W_k^T q_cls) + q_cls . b_k)``, ``O(N C)`` (:func:`cls_logits`; literally
  from the keys: :func:`cls_logits_reference`). With q/k norm the keys are formed.
* ``K = floor(N0 * rho^stage + 1e-6)`` clipped to ``[1, N0]``; ties: the lower index wins.
* Depths other than 12: the first idle layer is ``depth // 4``, then three equal stages.
* ``candidates`` (the patch's ``reselect=False``, not the paper's rule): only the previous idle
  layer's selected tokens compete, so an idle token stays idle.

The Triton kernels are in ``kernels/idle.py``; the timm integration (``method="idle"``) in
:mod:`fastprune.patch`.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import _checks, backends
from .attention import attention_forward, attention_qkv, cls_attention
from .idle_loss import CUT_LOSS_WEIGHT, token_cut_loss, token_cut_loss_reference
from .reference import output_slots, topk_keep_mask, true_positions
from .schedules import DEFAULT_KEEP_RATE, idle_keep_count, idle_schedule, idle_stage

__all__ = [
    "IdleSelection", "IdleOutput", "CutLossRecord", "idle_schedule", "idle_stage", "idle_keep_count",
    "cls_logits", "cls_logits_reference", "select_tokens", "idle_gather", "idle_scatter", "idle_block",
    "token_cut_loss", "token_cut_loss_reference", "cut_loss", "CUT_LOSS_WEIGHT", "DEFAULT_KEEP_RATE",
    "IDLE_FORMS", "BACKENDS",
]

BACKENDS = backends.TRITON_BACKENDS
#: ``"gather"``: the selected tokens go through the block as a short sequence (inference form);
#: ``"mask"``: all tokens, idle keys masked, residual updates times the selection mask (training form,
#: gives the cut loss).
IDLE_FORMS = ("gather", "mask")


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


def cls_logits_reference(x: torch.Tensor, block: nn.Module) -> torch.Tensor:
    """The class token's attention logits of ``block`` on tokens ``x``, computed literally.

    ``a_j = mean_h (q_cls,h . k_j,h * scale)`` with ``q, k`` from ``block.attn.qkv(block.norm1(x))``
    (after q/k norm); the class query is at position 0. Forms every key: ``O(N C^2)``.
    Returns float32 ``[B, N]`` (prefix columns included).
    """
    q, k, _ = attention_qkv(block.attn, block.norm1(x))
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
    backend = backends.resolve_backend(backend, x, BACKENDS)
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
    backend = backends.resolve_backend(backend, scores, BACKENDS)
    scores = scores.detach()
    if backend == "triton":
        from .kernels.idle import topk_select_triton

        index, slot = topk_select_triton(scores, k, p)
        return IdleSelection(slot >= 0, index, slot)
    scores = torch.where(torch.isnan(scores), torch.full_like(scores, float("-inf")), scores)
    keep = topk_keep_mask(scores, k, p)
    index = true_positions(keep, p + k)  # selected positions in increasing order, a fixed [B, p + k] shape
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
    backend = backends.resolve_backend(backend, x, BACKENDS)
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
    backend = backends.resolve_backend(backend, x, BACKENDS)
    if backend == "triton" and x.dtype != torch.float64:
        from .kernels.idle import idle_scatter_triton

        return idle_scatter_triton(x, y, selection.index, selection.slot)
    return x.scatter(1, selection.index[..., None].expand(-1, -1, x.shape[-1]), y.to(x.dtype))


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


def _masked_block(block: nn.Module, x: torch.Tensor, keep: torch.Tensor):
    """Training form: all tokens, idle keys masked, residual updates multiplied by the mask ``m``."""
    m = keep.to(x.dtype)[..., None]
    out = attention_forward(block.attn, block.norm1(x), attn_mask=keep[:, None, None, :], return_qk=True)
    x = x + m * block.drop_path1(block.ls1(out.x))
    x = x + m * block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
    return x, out.q, out.k


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
    backend = backends.resolve_backend(backend, x, BACKENDS)

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
# The cut loss of a whole model's last forward
# --------------------------------------------------------------------------------------------------

class CutLossRecord:
    """What one forward of a model with IdleViT layers records: each idle layer's token cut loss
    (``losses``, block index -> 0-d tensor), whether any layer computed one (``computed``), and the
    last idle layer's selection (``selected``, ``[B, N]`` bool, for ``reselect=False``)."""

    def __init__(self) -> None:
        self.computed = False
        self.losses: dict = {}
        self.selected: Optional[torch.Tensor] = None


def cut_loss(model: nn.Module) -> torch.Tensor:
    """The token cut loss of a model patched with ``method="idle"``, from its last forward.

    The mean over the idle layers (blocks that idled at least one token) of each layer's
    :func:`token_cut_loss`; the training loss is ``task_loss + CUT_LOSS_WEIGHT * cut_loss(model)``.
    Recorded by forwards in the mask form with ``cut_loss=True``. A 0-d zero when no layer idled.
    ``model`` is any model whose integration records a :class:`CutLossRecord` and returns it from
    ``model.fastprune_record("idle")`` (as :func:`fastprune.patch.timm` does).

    Raises:
        ValueError: ``model`` is not patched with ``method="idle"``.
        RuntimeError: no forward ran yet, or the last one ran in the gather form.
    """
    get = getattr(model, "fastprune_record", None)
    if get is None:
        raise ValueError("model is not patched with method 'idle' (fastprune.patch.timm(model, method='idle'))")
    record = get("idle")
    if record is None:
        raise RuntimeError("no forward of the patched model has run yet")
    if not record.computed:
        raise RuntimeError("the last forward computed no token cut loss: it needs the mask form (form='mask', "
                           "or form='auto' with model.train()) and cut_loss=True")
    if not record.losses:
        return torch.zeros((), device=next(model.parameters()).device)
    return torch.stack([v.float() for v in record.losses.values()]).mean()
