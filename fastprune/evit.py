"""EViT: keep the attentive tokens, fuse the inattentive ones into one token.

Semantics from "Not All Patches are What You Need: Expediting Vision Transformers via Token
Reorganizations" (Liang et al., ICLR 2022), as specified in ``METHODS.md``: after the attention
residual of a reduction layer (3, 6 and 9, 0-based, by default), the ``K = ceil(rho (N - p))``
non-prefix tokens with the largest class attention (softmax form) are kept; the other ``N - p - K``
("inattentive") tokens are fused into ONE extra token ``sum_i a_i x_i``, weighted by their class
attention ``a_i``. Output: prefix tokens, kept tokens, fused token; then the MLP.

This module holds the PyTorch reference (:func:`evit_reference`, the specification the kernel is
tested against and the CPU path) and the public functional API (:func:`evit_tokens`, :func:`evit`)
with input validation and backend dispatch. The fused Triton kernels (one launch selects and fuses)
live in ``kernels/evit.py``.

Choices (``METHODS.md`` leaves them open):

* kept tokens are written in their **original order** (as MSTM's kept tokens), not by attention;
* fusion weights are the raw class attention (the paper's form, weights sum to less than 1) by
  default; ``normalize=True`` divides them by their sum (a weighted average);
* the fused token's size is the sum of the fused tokens' sizes; sizes do not enter the weights
  (with proportional attention they are already part of ``a``).
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch

from . import _checks
from .functional import _resolve_backend
from .reference import WEIGHT_EPS, Merged, compute_dtype, output_slots, topk_keep_mask

__all__ = ["evit_tokens", "evit", "evit_reference", "kept_count", "check_keep_rate", "true_positions",
           "DEFAULT_KEEP_RATE", "DEFAULT_LAYERS"]

#: EViT's reduction layers (0-based block indices) and keep rate for DeiT/ViT with 12 blocks.
DEFAULT_LAYERS = (3, 6, 9)
DEFAULT_KEEP_RATE = 0.7

#: ``ceil`` tolerance: ``0.7 * 10`` is ``7.000000000000001`` in floating point and must keep 7 tokens.
_CEIL_TOL = 1e-6


def check_keep_rate(keep_rate, name: str = "keep_rate") -> float:
    """``keep_rate`` must be a real number (not bool) with ``0 < keep_rate <= 1``; returns a float."""
    if isinstance(keep_rate, torch.Tensor) and keep_rate.dim() == 0 and keep_rate.is_floating_point():
        keep_rate = float(keep_rate)
    if isinstance(keep_rate, bool) or not isinstance(keep_rate, numbers.Real):
        raise TypeError(f"{name} must be a float in (0, 1], got {type(keep_rate).__name__} ({keep_rate!r})")
    keep_rate = float(keep_rate)
    if not 0.0 < keep_rate <= 1.0:  # also rejects NaN
        raise ValueError(f"{name} must satisfy 0 < {name} <= 1, got {keep_rate}")
    return keep_rate


def kept_count(num_tokens: int, num_prefix_tokens: int, keep_rate: float) -> int:
    """``K = ceil(keep_rate * (N - p))``, the number of attentive tokens kept (EViT, BAT).

    Clipped to ``[1, N - p]``: a positive keep rate always keeps at least one token. The product is
    rounded up with a tolerance of 1e-6, so that ``0.7 * 10`` keeps 7 tokens, not 8.
    """
    n = num_tokens - num_prefix_tokens
    return max(1, min(n, math.ceil(keep_rate * n - _CEIL_TOL)))


def true_positions(mask: torch.Tensor, count: int) -> torch.Tensor:
    """``[B, count]`` int64: the positions where each row of ``mask`` is True, ascending.

    Every row must hold exactly ``count`` True entries. A stable sort of the mask rather than
    ``nonzero()``, so that the shape is known without looking at the data (``torch.compile`` with
    ``fullgraph=True`` and ``torch.export`` trace it).
    """
    return torch.sort((~mask).to(torch.uint8), dim=1, stable=True).indices[:, :count]


def evit_reference(x: torch.Tensor, scores: torch.Tensor, keep_rate: float, *,
                   size: Optional[torch.Tensor] = None, num_prefix_tokens: int = 1,
                   normalize: bool = False) -> Merged:
    """EViT inattentive token fusion (Liang et al., ICLR 2022), written to read like the paper.

    1. Attentive tokens: the ``K = ceil(rho (N - p))`` non-prefix tokens with the largest class
       attention (ties: lower index).
    2. Inattentive tokens (the other ``N - p - K``) are fused into one token ``sum_i a_i x_i``
       (``normalize=True``: ``sum_i a_i x_i / max(sum_i a_i, 1e-12)``); its size is ``sum_i s_i``.
    3. Output: prefix tokens, attentive tokens in their original order, the fused token.

    No validation (see :func:`evit_tokens`). Computes in float32 (float64 for float64 inputs, which
    the gradient checks use). Differentiable with respect to ``x`` and ``scores`` (through the fusion
    weights); the selection itself is not.

    Args:
        x: ``[B, N, C]`` tokens.
        scores: ``[B, N]`` class attention, softmax form (prefix columns ignored).
        keep_rate: ``rho`` in ``(0, 1]``.
        size: ``[B, N]`` token sizes; ones if None.
        num_prefix_tokens: ``p``.
        normalize: divide the fusion weights by their sum.

    Returns:
        :class:`~fastprune.Merged` ``(x [B, p + K + 1, C], size [B, p + K + 1], index [B, N])``, or the
        input unchanged (size ones / as given, identity index) when ``K == N - p``.
    """
    B, N, C = x.shape
    p = num_prefix_tokens
    K = kept_count(N, p, keep_rate)
    dtype = compute_dtype(x)
    size = torch.ones(B, N, dtype=torch.float32, device=x.device) if size is None else size
    if K == N - p:
        return Merged(x, size, torch.arange(N, device=x.device).expand(B, N))

    keep = topk_keep_mask(scores.detach(), K, p)  # prefix + K attentive tokens
    a = torch.where(keep, torch.zeros_like(scores), scores).to(dtype)  # inattentive weights, 0 elsewhere
    if normalize:
        a = a / a.sum(dim=1, keepdim=True).clamp_min(WEIGHT_EPS)
    xf = x.to(dtype)
    fused = (a[..., None] * xf).sum(dim=1, keepdim=True)  # [B, 1, C]
    kept_idx = true_positions(keep, p + K)  # prefix and attentive tokens, in their original order
    kept = xf.gather(1, kept_idx[..., None].expand(B, p + K, C))
    x_out = torch.cat([kept, fused], dim=1).to(x.dtype)

    size_out = torch.cat([size.gather(1, kept_idx), (size * ~keep).sum(dim=1, keepdim=True)], dim=1)
    index = output_slots(keep).masked_fill(~keep, p + K)  # every fused token goes to slot p + K
    return Merged(x_out, size_out, index)


def evit_tokens(x: torch.Tensor, attn: torch.Tensor, keep_rate: float, *, size: Optional[torch.Tensor] = None,
                num_prefix_tokens: int = 1, normalize: bool = False, backend: str = "auto") -> Merged:
    """Keep the attentive tokens and fuse the inattentive ones into one token (EViT).

    Semantics from "Not All Patches are What You Need" (Liang et al., ICLR 2022): keep the
    ``K = ceil(keep_rate * (N - p))`` non-prefix tokens with the largest class attention (ties: lower
    index); fuse the other ``N - p - K`` tokens into one token ``sum_i a_i x_i`` weighted by their
    class attention (the paper's form: weights are not renormalised; ``normalize=True`` gives the
    weighted average ``sum_i a_i x_i / sum_i a_i``). Sizes: kept tokens keep theirs, the fused
    token's size is the sum of the fused sizes. Output order **(choice)**: prefix tokens, attentive
    tokens in their original order, the fused token last. Prefix tokens pass through untouched.

    Args:
        x: tokens ``[B, N, C]``, float32 / float16 / bfloat16, CPU or CUDA.
        attn: the class token's attention, softmax form: ``[B, N]``, ``[B, H, N]`` (averaged over
            heads) or ``[B, H, N, N]`` (row 0, averaged over heads); on x's device. Prefix columns
            are ignored. Gradients flow into it through the fusion weights.
        keep_rate: ``rho``, a float with ``0 < keep_rate <= 1``. ``1.0`` (or any rate that keeps
            every token) is a no-op; a small rate keeps at least one token (``K >= 1``).
        size: ``[B, N]`` or ``[B, N, 1]`` token sizes (patches per token); ones if None.
        num_prefix_tokens: ``p``, leading tokens never fused (class, distillation, registers),
            ``0 <= p <= N - 1``.
        normalize: fuse with weights ``a_i / sum_j a_j`` instead of ``a_i``.
        backend: ``"auto"`` (the fused Triton kernel on CUDA, the PyTorch reference on CPU),
            ``"triton"`` (also on CPU tensors under ``TRITON_INTERPRET=1``) or ``"reference"``.

    Returns:
        :class:`~fastprune.Merged` ``(x, size, index)``: tokens ``[B, p + K + 1, C]`` in x's dtype
        (computed in float32), sizes ``[B, p + K + 1]`` float32, and ``index`` ``[B, N]`` int64, the
        output position each input token went into (``p + K`` for every fused token). When no token
        is fused the input is returned unchanged (the same tensor object) with an identity index.

    Raises:
        TypeError: ``x``/``attn``/``size`` not tensors or of an unsupported dtype, ``keep_rate`` not
            a real number, ``num_prefix_tokens`` not an int, ``normalize`` not a bool.
        ValueError: wrong ranks or shapes, tensors on different devices, ``keep_rate`` outside
            ``(0, 1]``, ``num_prefix_tokens`` out of range, unknown ``backend``.
    """
    _checks.check_tokens(x)
    B, N, _ = x.shape
    p = _checks.check_int(num_prefix_tokens, "num_prefix_tokens", 0, N - 1)
    keep_rate = check_keep_rate(keep_rate)
    scores = _checks.cls_scores(attn, x)
    size = _checks.check_size(size, x)
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool, got {type(normalize).__name__}")
    backend = _resolve_backend(backend, x)

    K = kept_count(N, p, keep_rate)
    if K == N - p:
        size = torch.ones(B, N, dtype=torch.float32, device=x.device) if size is None else size
        return Merged(x, size, torch.arange(N, device=x.device).expand(B, N))
    if backend == "triton":
        from .kernels.evit import evit_triton

        return evit_triton(x, scores, K, size=size, num_prefix_tokens=p, normalize=normalize)
    return evit_reference(x, scores, keep_rate, size=size, num_prefix_tokens=p, normalize=normalize)


def evit(x: torch.Tensor, attn: torch.Tensor, keep_rate: float, **kwargs) -> torch.Tensor:
    """EViT token fusion returning only the tokens ``[B, p + K + 1, C]``.

    Same arguments, semantics and errors as :func:`evit_tokens`, which also returns the sizes and
    the position map.
    """
    return evit_tokens(x, attn, keep_rate, **kwargs).x


# ----------------------------------------------------------------------------------------------------
# timm patch: method="evit" (shared with method="bat")
# ----------------------------------------------------------------------------------------------------
BACKENDS = ("auto", "triton", "reference")
#: Options of the ``"evit"`` patch method and their defaults (the paper's reduction layers, and no
#: proportional attention: see :func:`register_with_patch`).
PATCH_DEFAULTS = {"layers": DEFAULT_LAYERS, "normalize": False, "backend": "auto", "prop_attn": False}


def parse_layers(layers, depth: Optional[int] = None) -> tuple:
    """The ``layers`` option: block indices (0-based) that reduce, as a sorted tuple of distinct ints.

    Accepts an iterable of ints or a comma-separated string (``"3,6,9"``, as the evaluation CLI passes
    it). With ``depth``, every index must be ``< depth``.

    Raises:
        TypeError: not ints. ValueError: negative, repeated or ``>= depth`` indices.
    """
    if isinstance(layers, str):
        try:
            layers = [int(part) for part in layers.split(",") if part.strip()]
        except ValueError:
            raise ValueError(f"layers must be block indices like '3,6,9', got {layers!r}") from None
    if isinstance(layers, bool) or isinstance(layers, numbers.Integral):
        layers = [layers]
    try:
        layers = list(layers)
    except TypeError:
        raise TypeError(f"layers must be a sequence of block indices, got {type(layers).__name__}") from None
    for value in layers:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"layers must hold ints (0-based block indices), got {value!r}")
        if value < 0 or (depth is not None and value >= depth):
            raise ValueError(f"layers must be block indices in [0, {depth}), got {value}" if depth is not None
                             else f"layers must be >= 0, got {value}")
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers must not repeat a block, got {layers}")
    return tuple(sorted(int(v) for v in layers))


def patch_keep_rate(r, method: str) -> Optional[float]:
    """The ``r`` given to :func:`fastprune.patch.timm` for EViT / BAT: a float keep rate, or ``0``.

    Returns the keep rate, or None for ``r == 0`` (no reduction, the patch's default).

    Raises:
        TypeError: an int other than 0, or a per-block list.
    """
    if isinstance(r, float):
        return check_keep_rate(r, "r")
    if isinstance(r, numbers.Integral) and not isinstance(r, bool) and r == 0:
        return None
    raise TypeError(f"method {method!r} takes r = a float keep rate in (0, 1] applied at its reduction "
                    f"layers (e.g. r={DEFAULT_KEEP_RATE}), or 0 for no reduction; got {r!r}")


def _validate_common(options) -> None:
    parse_layers(options["layers"])
    _checks.check_choice(options["backend"], "backend", BACKENDS)


def _patch_schedule_for(method: str):
    def schedule(r, depth: int, options):
        """Validate ``r`` (keep rate or 0) and ``layers`` against the model's depth, once at patch time."""
        patch_keep_rate(r, method)
        parse_layers(options["layers"], depth)
        return r

    return schedule


def patch_block_r(method: str, output_tokens):
    """The ``block_r`` hook (see :func:`fastprune.patch.register_method`) shared by ``method="evit"``
    and ``"bat"``: the keep rate ``r`` applies at the blocks of the ``layers`` option only.

    ``output_tokens(N, p, keep_rate, options)`` is the token count the method leaves from ``N``; a
    block removes ``N - output_tokens`` tokens at a reducing layer and none elsewhere (nor with
    ``r = 0``). A reducing block whose method would leave all ``N`` tokens (a keep rate leaving one
    inattentive token in EViT) runs unreduced. The patch then runs its own attention-reduce-MLP block
    with that ``r``, and :func:`fastprune.patch.reduction_schedule` reports the same counts.
    """
    def block_r(sctx) -> int:
        keep_rate = patch_keep_rate(sctx.r, method)
        if keep_rate is None or sctx.block_index not in parse_layers(sctx.options["layers"]):
            return 0
        N = sctx.num_tokens
        return max(0, N - output_tokens(N, sctx.num_prefix_tokens, keep_rate, sctx.options))

    return block_r


def _evit_output_tokens(N: int, p: int, keep_rate: float, options) -> int:
    K = kept_count(N, p, keep_rate)
    return N if K == N - p else p + K + 1


def _evit_reducer(x: torch.Tensor, ctx) -> tuple:
    """EViT in a timm block (after the attention residual): keep the attentive tokens, fuse the rest
    into one token weighted by this block's class attention; see :func:`evit_tokens`."""
    out = evit_tokens(x, ctx.cls_attn, ctx.state.r, size=ctx.size, num_prefix_tokens=ctx.num_prefix_tokens,
                      normalize=ctx.options["normalize"], backend=ctx.options["backend"])
    return out.x, out.size, out.index


def _evit_validate(options) -> None:
    _validate_common(options)
    if not isinstance(options["normalize"], bool):
        raise TypeError(f"normalize must be a bool, got {options['normalize']!r}")


def register_with_patch() -> None:
    """Register ``method="evit"`` with :func:`fastprune.patch.timm` (done when :mod:`fastprune.patch`
    is first imported; importing this module alone does not import timm).

    ``fastprune.patch.timm(model, method="evit", r=0.7)``: EViT (Liang et al., ICLR 2022) with the
    paper's schedule -- at blocks 3, 6 and 9 (0-based), after the attention residual, keep the
    ``ceil(r (N - p))`` most class-attended tokens and fuse the others into one token. ``r`` is the
    keep rate (a float in ``(0, 1]``; the paper's default is 0.7, :data:`DEFAULT_KEEP_RATE`), or 0 for
    no reduction. With N = 197 tokens (224 px, /16) and ``r = 0.7``, the blocks see
    197, 140, 100 and 72 tokens. Options:

    * ``layers=(3, 6, 9)``: the reducing blocks (a tuple of 0-based indices, or ``"3,6,9"``);
    * ``normalize=False``: fuse with weights ``a_i / sum a`` instead of the paper's ``a_i``;
    * ``backend="auto"`` (Triton on CUDA, the reference on CPU), ``"triton"`` or ``"reference"``;
    * the common ``prop_attn`` -- **off by default for EViT (choice)**, unlike the other methods --
      and ``prop_attn_impl``. With ``prop_attn=True`` the fused token's size (the number of patches
      it stands for) enters the attention as ``log size``. The paper has no proportional attention,
      and off the shelf EViT does much better without it: measured on the project's 500-image
      ImageNet sample (CPU, timm preprocessing) at ``r = 0.7``, ViT-Ti/16 (82.6 top-1 unreduced)
      gives 79.8 top-1 with ``prop_attn=False`` and 59.2 with ``prop_attn=True``.
    """
    from . import patch

    if "evit" not in patch.available_methods():
        patch.register_method("evit", _evit_reducer, needs={"cls_attn"}, defaults=PATCH_DEFAULTS,
                              validate=_evit_validate, schedule=_patch_schedule_for("evit"),
                              block_r=patch_block_r("evit", _evit_output_tokens))

