"""timm drop-in: token reduction inside a timm ``VisionTransformer``, patched in place and revertible.

    import timm, fastprune.patch
    model = timm.create_model("deit_small_patch16_224", pretrained=True)
    fastprune.patch.timm(model, method="merge", r=13)   # MSTM merging, 13 tokens fewer per block
    logits = model(images)
    fastprune.patch.state(model).num_tokens             # tokens each block saw in that forward
    fastprune.patch.revert(model)                        # the original model again, bit for bit

What patching does (timm >= 1.0.16; written against timm 1.0.31's ``vision_transformer.py`` and
``layers/attention.py``): the model's class and every block's class are swapped for thin subclasses
(swapped back by :func:`revert`); no parameter or buffer is touched. A patched block runs

    x = x + drop_path1(ls1(attn(norm1(x))))      # attention with proportional attention (+log size)
    x, size, index = reduce(x, context)          # the method's reducer, when this block's r > 0
    x = x + drop_path2(ls2(mlp(norm2(x))))

where the attention is timm's own ``Attention`` module run by :func:`attention_forward`: same
``qkv``, ``q_norm``/``k_norm``, ``scale``, attention ``norm`` (scale_norm), ``gate``, ``proj``, dropout;
``F.scaled_dot_product_attention`` when the module's ``fused_attn`` is on (kept on), the explicit
softmax path when it is off. It also returns what the method asked for: the class token's attention
row (softmax form, with the ``log size`` bias when proportional attention is on), its logit form, or
the head-mean of the keys (ToMe's matching metric).

Methods are a small registry (:func:`register_method`): a *reducer* gets the tokens after the
attention residual and a :class:`ReductionContext` and returns ``(x, size, index)``; a method may
instead supply a whole *block forward* (IdleViT-style methods that send only some tokens through the
block). Built in: ``"merge"`` (MSTM, Bian et al. 2023, via :func:`fastprune.merge_tokens`), and from
their own modules, registered when this module is first imported: ``"tome"`` (:mod:`fastprune.tome`),
``"evit"`` (:mod:`fastprune.evit`), ``"bat"`` (:mod:`fastprune.bat`), ``"idle"`` (:mod:`fastprune.idle`).

Per-forward state (reset by every ``forward_features`` / ``forward`` / ``forward_intermediates``) is a
:class:`PatchState` at ``model._fastprune``, also returned by :func:`state`: token sizes, the composed
position map and the token count each block saw.
"""
from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass, field, replace as _dc_replace
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Optional, Sequence, Union

import timm as _timm_lib  # the package; this module's :func:`timm` is the patch function
import torch
import torch.nn as nn
from timm.layers import Attention as _TimmAttention
from timm.models.vision_transformer import Block as _TimmBlock
from timm.models.vision_transformer import VisionTransformer as _TimmVisionTransformer

from . import _checks
from .attention import PROP_ATTN_IMPLS, cls_attention, proportional_attention
from .evit import kept_count as _evit_kept_count
from .functional import BACKENDS as MERGE_BACKENDS, merge_tokens

__all__ = [
    "timm", "revert", "state", "is_patched", "reduction_schedule", "register_method", "available_methods",
    "attention_forward", "AttentionOutput", "ReductionContext", "ScheduleContext", "Method", "PatchState",
    "NEEDS", "COMMON_OPTIONS",
]

#: What a method can ask the patched attention for (``needs`` of :func:`register_method`):
#: ``"cls_attn"`` the class token's attention row, softmax form ``[B, N]`` float32 (with the
#: ``log size`` bias when proportional attention is on; prefix columns included);
#: ``"cls_attn_logits"`` the same row in logit form (head-mean of ``q_cls . k_j * scale [+ log s_j]``);
#: ``"keys"`` the head-mean of the keys ``[B, N, d]`` after k norm (ToMe's matching metric).
NEEDS = frozenset({"cls_attn", "cls_attn_logits", "keys"})

#: Options every method accepts, with their defaults (a method's ``defaults`` may change the default
#: for that method, see :func:`register_method`).
COMMON_OPTIONS = MappingProxyType({"prop_attn": True, "prop_attn_impl": "auto"})

#: Oldest timm whose ``VisionTransformer``/``Block``/``Attention`` layout this module follows.
MIN_TIMM_VERSION = (1, 0, 16)

#: ``global_pool`` values a patched model supports ('avg' and 'avgmax' become size-weighted).
SUPPORTED_POOLS = ("", "token", "avg", "avgmax", "max")


# --------------------------------------------------------------------------------------------------
# Attention with proportional attention and the extras the methods need
# --------------------------------------------------------------------------------------------------

class AttentionOutput(NamedTuple):
    """What :func:`attention_forward` returns.

    Attributes:
        x: the attention module's output ``[B, N, C]`` (after ``proj`` and ``proj_drop``), x's dtype.
        cls_attn: ``[B, N]`` float32 class attention, softmax form, or None if not asked for.
        cls_attn_logits: ``[B, N]`` float32 class attention, logit form, or None.
        keys: ``[B, N, d]`` head-mean of the keys (after k norm), keys' dtype, or None.
    """

    x: torch.Tensor
    cls_attn: Optional[torch.Tensor] = None
    cls_attn_logits: Optional[torch.Tensor] = None
    keys: Optional[torch.Tensor] = None


def attention_forward(attn: nn.Module, x: torch.Tensor, *, size: Optional[torch.Tensor] = None,
                      attn_mask: Optional[torch.Tensor] = None, need: Iterable[str] = (),
                      prop_attn_impl: str = "auto") -> AttentionOutput:
    """Run a timm ``Attention`` module with proportional attention, returning the requested extras.

    Same computation as ``timm.layers.Attention.forward`` (``qkv`` -> ``q_norm``/``k_norm`` ->
    attention -> ``norm`` -> ``gate`` -> ``proj`` -> ``proj_drop``), plus ToMe's proportional
    attention (Bolya et al., ICLR 2023): ``+log(size_j)`` on every key's logit when ``size`` is given.
    With the module's ``fused_attn`` on, attention is ``F.scaled_dot_product_attention`` (with
    ``size=None`` the very call timm makes; with ``size``, see
    :func:`fastprune.attention.proportional_attention`); with it off, timm's explicit softmax path.

    Args:
        attn: a ``timm.layers.Attention`` module.
        x: normalised tokens ``[B, N, C]``.
        size: ``[B, N]`` float token sizes for proportional attention, or None (no bias).
        attn_mask: extra mask for the attention (bool, True = attend, or additive float),
            broadcastable to ``[B, H, N, N]``; None for none.
        need: subset of :data:`NEEDS` to compute besides the output (class attention from the class
            query at position 0 only, ``O(N C)``).
        prop_attn_impl: ``"auto"``, ``"column"``, ``"mask"`` (fused path; see
            :func:`~fastprune.attention.proportional_attention`).

    Returns:
        :class:`AttentionOutput`.

    Raises:
        ValueError: unknown entries in ``need``.
    """
    need = frozenset(need)
    if not need <= NEEDS:
        raise ValueError(f"need must be a subset of {sorted(NEEDS)}, got {sorted(need)}")
    B, N, _ = x.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    gate_layer = getattr(attn, "gate", None)
    gate = gate_layer(x).sigmoid() if gate_layer is not None else None
    qkv = attn.qkv(x).reshape(B, N, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    dropout_p = attn.attn_drop.p if attn.training else 0.0

    if attn.fused_attn:
        out = proportional_attention(q, k, v, size, attn_mask=attn_mask, dropout_p=dropout_p,
                                     impl=prop_attn_impl)
    else:  # timm's explicit path: (q * scale) @ k^T, + bias, softmax, attn_drop, @ v
        a = (q * attn.scale) @ k.transpose(-2, -1)
        if size is not None:
            a = a + size.float().log().to(a.dtype)[:, None, None, :]
        if attn_mask is not None:
            a = a.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else a + attn_mask
        a = attn.attn_drop(a.softmax(dim=-1))
        out = a @ v

    out = out.transpose(1, 2).reshape(B, N, heads * head_dim)
    out = attn.norm(out)
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
    )


# --------------------------------------------------------------------------------------------------
# Method registry
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ReductionContext:
    """What a reducer (or a method's block forward) is told about the block it runs in.

    Attributes:
        block: the patched timm ``Block`` module (its ``attn``, ``norm1``, ``ls1``, ``mlp``... are there).
        block_index: 0-based index of the block.
        r: tokens this block must remove (from the schedule or the method's ``block_r``, already
            clipped to the method's ``max_r``); for a method registered with ``removes_tokens=False``
            (IdleViT) the tokens this block leaves idle.
        num_prefix_tokens: ``p``, leading tokens never reduced (class, distillation, register tokens).
        size: ``[B, N]`` float32 token sizes entering the block (ones until something was merged).
        size_is_ones: True while nothing has been reduced in this forward (``size`` is all ones);
            proportional attention is skipped then, ``log 1 = 0``.
        options: the method's options (a dict; do not modify), including ``prop_attn`` and
            ``prop_attn_impl``.
        cls_attn, cls_attn_logits, keys: what the method asked for in ``needs`` (see :data:`NEEDS`),
            from this block's attention; None otherwise (and always None in a block forward, which
            calls :func:`attention_forward` itself).
        state: the model's :class:`PatchState`.
    """

    block: nn.Module
    block_index: int
    r: int
    num_prefix_tokens: int
    size: torch.Tensor
    size_is_ones: bool
    options: Mapping[str, Any]
    state: "PatchState"
    cls_attn: Optional[torch.Tensor] = None
    cls_attn_logits: Optional[torch.Tensor] = None
    keys: Optional[torch.Tensor] = None

    @property
    def attn_size(self) -> Optional[torch.Tensor]:
        """The sizes proportional attention should use: None when it is off or all sizes are one."""
        return None if self.size_is_ones or not self.options["prop_attn"] else self.size


#: ``reducer(x [B, N, C], ctx) -> (x [B, N - r, C], size [B, N - r] float32, index [B, N] int64)``;
#: ``index[b, i]`` is the output position input token ``i`` went into.
Reducer = Callable[[torch.Tensor, ReductionContext], tuple]
#: ``block_forward(block, x [B, N, C], ctx) -> (x [B, N', C], size [B, N'] or None, index [B, N] or None)``;
#: None for ``index`` means the tokens kept their positions (no token removed or moved), None for
#: ``size`` means the sizes did not change.
BlockForward = Callable[[nn.Module, torch.Tensor, ReductionContext], tuple]


@dataclass(frozen=True)
class ScheduleContext:
    """What a method's ``block_r`` hook (see :func:`register_method`) is told about one block.

    The same object is built by the patched forward (before the block runs) and by
    :func:`reduction_schedule` (which simulates the forward without running it), so a method's
    per-block ``r`` and the schedule it reports always agree.

    Attributes:
        r: the patch's ``r`` as validated (int, float keep rate or tuple of ints), after the method's
            ``schedule`` rewrite.
        block_index: 0-based index of the block.
        depth: number of blocks.
        num_tokens: ``N_l``, tokens entering this block (prefix tokens included).
        num_patches: ``N_0 - p``, the non-prefix tokens entering the first block (196 for a /16 ViT
            at 224 px), whatever earlier blocks removed.
        num_prefix_tokens: ``p``.
        options: the method's resolved options (do not modify).
    """

    r: Any
    block_index: int
    depth: int
    num_tokens: int
    num_patches: int
    num_prefix_tokens: int
    options: Mapping[str, Any]

    @property
    def generic_r(self) -> int:
        """The generic schedule's ``r`` for this block (not yet clipped to ``max_r``): ``r`` for an int,
        ``r[l]`` for a list, ``n - ceil(rho * n)`` with ``n = N_l - p`` for a keep rate ``rho``."""
        if isinstance(self.r, float):
            n = self.num_tokens - self.num_prefix_tokens
            return n - _keep_count(self.r, n)
        if isinstance(self.r, tuple):
            return self.r[self.block_index]
        return int(self.r)


#: ``block_r(ScheduleContext) -> int``: a method's own number of tokens block ``l`` removes (or idles).
BlockR = Callable[[ScheduleContext], int]


def _default_max_r(num_tokens: int, num_prefix_tokens: int) -> int:
    """At least one non-prefix token stays."""
    return max(num_tokens - num_prefix_tokens - 1, 0)


@dataclass(frozen=True)
class Method:
    """A registered token-reduction method (see :func:`register_method`)."""

    name: str
    reducer: Optional[Reducer]
    block_forward: Optional[BlockForward]
    needs: Union[frozenset, Callable[[Mapping[str, Any]], Iterable[str]]]
    defaults: Mapping[str, Any]
    validate: Optional[Callable[[Mapping[str, Any]], None]]
    max_r: Callable[[int, int], int]
    schedule: Optional[Callable[[Any, int, Mapping[str, Any]], Any]] = None
    block_r: Optional[BlockR] = None
    removes_tokens: bool = True

    def __copy__(self) -> "Method":  # registry entries are singletons: copies of a model share them
        return self

    def __deepcopy__(self, memo) -> "Method":
        return self

    def needs_for(self, options: Mapping[str, Any]) -> frozenset:
        """The :data:`NEEDS` entries this method wants with these options."""
        needs = frozenset(self.needs(options) if callable(self.needs) else self.needs)
        if not needs <= NEEDS:
            raise ValueError(f"method {self.name!r} asks for {sorted(needs - NEEDS)}, not in {sorted(NEEDS)}")
        return needs


_METHODS: dict[str, Method] = {}


def register_method(name: str, reducer: Optional[Reducer] = None, *,
                    needs: Union[Iterable[str], Callable[[Mapping[str, Any]], Iterable[str]]] = (),
                    block_forward: Optional[BlockForward] = None, defaults: Optional[Mapping[str, Any]] = None,
                    validate: Optional[Callable[[Mapping[str, Any]], None]] = None,
                    max_r: Optional[Callable[[int, int], int]] = None,
                    schedule: Optional[Callable[[Any, int, Mapping[str, Any]], Any]] = None,
                    block_r: Optional[BlockR] = None, removes_tokens: bool = True,
                    replace: bool = False) -> Method:
    """Register a token-reduction method for :func:`timm`, without touching the block code.

    The interface:

    * ``reducer(x, ctx) -> (x, size, index)`` runs in every block whose ``r > 0``, between the
      attention residual and the MLP. ``x`` is ``[B, N, C]``; ``ctx`` a :class:`ReductionContext`
      with the block index, ``r``, ``num_prefix_tokens``, the token ``size`` and what ``needs`` asked
      for. It must return ``N - r`` tokens ``[B, N - r, C]``, their sizes ``[B, N - r]`` (float32)
      and ``index [B, N]`` (int64), the output position each input token went into (prefix tokens
      to themselves). Blocks with ``r == 0`` skip the reducer and the extras.
    * ``block_forward(block, x, ctx) -> (x, size or None, index or None)`` replaces the whole block
      forward (e.g. IdleViT: only the selected tokens go through the block, idle tokens pass through).
      It runs in every block, whatever ``r``; it computes attention with :func:`attention_forward`
      (honouring ``ctx.attn_size`` and ``ctx.options["prop_attn_impl"]``) and may call ``reducer``.
      ``index=None`` means no token moved; ``size=None`` that sizes did not change.
    * ``needs``: subset of :data:`NEEDS`, or a function of the options returning one (e.g. the keys
      only when ``metric="keys"``).
    * ``defaults``: the method's own options and their defaults; any other keyword given to
      :func:`timm` (besides :data:`COMMON_OPTIONS`) is an error. ``defaults`` may also set the
      common options (``prop_attn``, ``prop_attn_impl``) to this method's own default, e.g. EViT's
      ``prop_attn=False``; the user's keywords still override them. ``validate(options)`` raises
      ``ValueError``/``TypeError`` for bad values.
    * ``max_r(num_tokens, num_prefix_tokens)``: the largest ``r`` a block may remove (schedules are
      clipped to it); default ``num_tokens - num_prefix_tokens - 1`` (one non-prefix token stays).
      ToMe-style bipartite matching would pass ``(N - p) // 2``.
    * ``schedule(r, depth, options) -> r``: rewrites the validated ``r`` given to :func:`timm` once, at
      patch time, into another ``r`` form (e.g. ToMe's ``schedule="decreasing"`` option turns an int
      into a per-block list); the result is validated again. None: ``r`` is used as given.
    * ``block_r(sctx) -> int``: the method's own per-block ``r``, for schedules the generic forms
      cannot express (EViT/BAT: a keep rate at a few layers only, with the method's own output token
      count; MSTM's ``schedule="paper"``; IdleViT's ``N0 * rho^stage``). ``sctx`` is a
      :class:`ScheduleContext` (the patch's ``r``, the block index, depth, the tokens entering the
      block, the first block's patch count, ``p`` and the options); the result is clipped to
      ``[0, max_r]`` and is what the block's reducer or block forward gets as ``ctx.r``, what
      :attr:`PatchState.r_applied` records and what :func:`reduction_schedule` reports.
      ``sctx.generic_r`` is the generic rule, for hooks that change only some cases. None: the
      generic rule (see :func:`timm`).
    * ``removes_tokens``: False for methods that never change the token count (IdleViT idles
      tokens): ``r`` is then the number of tokens a block leaves idle, and :func:`reduction_schedule`
      does not subtract it from the tokens the next block sees.

    Args:
        name: method name used in ``fastprune.patch.timm(model, method=name)``.
        replace: allow replacing an already registered method of that name.

    Returns:
        The registered :class:`Method`.

    Raises:
        TypeError: ``name`` not a str, ``reducer``/``block_forward``/``validate``/``max_r``/``schedule``/
            ``block_r`` not callable, ``removes_tokens`` not a bool.
        ValueError: neither ``reducer`` nor ``block_forward`` given, ``name`` already registered and
            ``replace`` is False, unknown ``needs`` entries, a bad ``prop_attn_impl`` default
            (TypeError for a ``prop_attn`` default that is not a bool).
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty str, got {name!r}")
    if name in _METHODS and not replace:
        raise ValueError(f"method {name!r} is already registered (pass replace=True to replace it)")
    if reducer is None and block_forward is None:
        raise ValueError("register_method needs a reducer, a block_forward, or both")
    for arg, value in (("reducer", reducer), ("block_forward", block_forward), ("validate", validate),
                       ("max_r", max_r), ("schedule", schedule), ("block_r", block_r)):
        if value is not None and not callable(value):
            raise TypeError(f"{arg} must be callable, got {type(value).__name__}")
    if not isinstance(removes_tokens, bool):
        raise TypeError(f"removes_tokens must be a bool, got {type(removes_tokens).__name__}")
    if not callable(needs):
        needs = frozenset(needs)
        if not needs <= NEEDS:
            raise ValueError(f"needs must be a subset of {sorted(NEEDS)}, got {sorted(needs)}")
    defaults = dict(defaults or {})
    _check_common_options({**COMMON_OPTIONS, **defaults}, where=f"method {name!r}'s defaults: ")
    method = Method(name, reducer, block_forward, needs, MappingProxyType(defaults), validate,
                    max_r or _default_max_r, schedule, block_r, removes_tokens)
    _METHODS[name] = method
    return method


def available_methods() -> tuple[str, ...]:
    """Names of the registered methods."""
    return tuple(sorted(_METHODS))


def _get_method(method) -> Method:
    if isinstance(method, Method):
        return method
    if not isinstance(method, str):
        raise TypeError(f"method must be a str, got {type(method).__name__}")
    if method not in _METHODS:
        raise ValueError(f"unknown method {method!r}; registered: {available_methods()}")
    return _METHODS[method]


def _check_common_options(options: Mapping[str, Any], where: str = "") -> None:
    """The values of :data:`COMMON_OPTIONS` in ``options``: ``prop_attn`` a bool, ``prop_attn_impl`` known."""
    if not isinstance(options["prop_attn"], bool):
        raise TypeError(f"{where}prop_attn must be a bool, got {options['prop_attn']!r}")
    if options["prop_attn_impl"] not in PROP_ATTN_IMPLS:
        raise ValueError(f"{where}prop_attn_impl must be one of {PROP_ATTN_IMPLS}, got {options['prop_attn_impl']!r}")


def _resolve_options(method: Method, options: Mapping[str, Any]) -> Mapping[str, Any]:
    unknown = set(options) - set(COMMON_OPTIONS) - set(method.defaults)
    if unknown:
        raise TypeError(f"unexpected option(s) {sorted(unknown)} for method {method.name!r}; "
                        f"accepted: {sorted(set(COMMON_OPTIONS) | set(method.defaults))}")
    resolved = {**COMMON_OPTIONS, **method.defaults, **options}
    _check_common_options(resolved)
    if method.validate is not None:
        method.validate(resolved)
    return resolved


# ---- MSTM merging ---------------------------------------------------------------------------------

MERGE_METRICS = ("keys", "x")
MERGE_WEIGHTS = ("size", "size_attn")
#: ``schedule`` option of ``method="merge"``: None (``r`` as given: an int, a per-block list or a keep
#: rate in every block) or ``"paper"`` (:data:`MSTM_PAPER_LAYERS` with a keep rate).
MERGE_SCHEDULES = (None, "paper")
#: Blocks (0-based) that merge with ``schedule="paper"`` -- a choice: the MSTM paper does not state its
#: layers in METHODS.md; these are EViT's and BAT's, the methods it compares against.
MSTM_PAPER_LAYERS = (3, 6, 9)
#: Keep rate of ``schedule="paper"`` when ``r`` is left at 0.
MSTM_PAPER_KEEP_RATE = 0.7


def _merge_validate(options: Mapping[str, Any]) -> None:
    _checks.check_choice(options["metric"], "metric", MERGE_METRICS)
    _checks.check_choice(options["weight"], "weight", MERGE_WEIGHTS)
    _checks.check_choice(options["backend"], "backend", MERGE_BACKENDS)
    _checks.check_choice(options["schedule"], "schedule", MERGE_SCHEDULES)


def _merge_schedule(r: RSpec, depth: int, options: Mapping[str, Any]) -> RSpec:
    """``schedule="paper"``: ``r`` must be a float keep rate (0, timm's default, means
    :data:`MSTM_PAPER_KEEP_RATE`) and the model deep enough for :data:`MSTM_PAPER_LAYERS`."""
    if options["schedule"] != "paper":
        return r
    if isinstance(r, int) and r == 0:
        r = MSTM_PAPER_KEEP_RATE
    if not isinstance(r, float):
        raise TypeError(f"schedule='paper' takes r = a float keep rate in (0, 1] (default "
                        f"{MSTM_PAPER_KEEP_RATE}), got {r!r}")
    if depth <= max(MSTM_PAPER_LAYERS):
        raise ValueError(f"schedule='paper' merges at blocks {MSTM_PAPER_LAYERS}; the model has {depth} blocks")
    return r


def _merge_block_r(sctx: ScheduleContext) -> int:
    """``schedule="paper"``: at :data:`MSTM_PAPER_LAYERS`, leave EViT's token count ``p + K + 1``
    (``K = ceil(rho (N - p))``); elsewhere, and with ``schedule=None``, the generic rule."""
    if sctx.options["schedule"] != "paper":
        return sctx.generic_r
    if sctx.block_index not in MSTM_PAPER_LAYERS:
        return 0
    n = sctx.num_tokens - sctx.num_prefix_tokens
    return max(0, n - _evit_kept_count(sctx.num_tokens, sctx.num_prefix_tokens, sctx.r) - 1)


def _merge_needs(options: Mapping[str, Any]) -> frozenset:
    return frozenset({"cls_attn", "keys"}) if options["metric"] == "keys" else frozenset({"cls_attn"})


def _merge_reducer(x: torch.Tensor, ctx: ReductionContext) -> tuple:
    """MSTM (Bian et al., 2023): merge the ``r`` least class-attended tokens into their most similar
    kept token; see :func:`fastprune.merge_tokens`."""
    metric = ctx.keys if ctx.options["metric"] == "keys" else x
    merged = merge_tokens(x, ctx.cls_attn, ctx.r, size=ctx.size, metric=metric,
                          num_prefix_tokens=ctx.num_prefix_tokens, weight=ctx.options["weight"],
                          backend=ctx.options["backend"])
    return merged.x, merged.size, merged.index


# Defaults tuned on the 500-image sample (README): the tokens as metric, size x class-attention weights.
register_method("merge", _merge_reducer, needs=_merge_needs,
                defaults={"metric": "x", "weight": "size_attn", "backend": "auto", "schedule": None},
                validate=_merge_validate, schedule=_merge_schedule, block_r=_merge_block_r)


# --------------------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------------------

RSpec = Union[int, float, Sequence[int]]


def _keep_count(keep_rate: float, n: int) -> int:
    """``ceil(keep_rate * n)``, robust to float error (0.7 * 10 must give 7, not 8)."""
    return min(n, math.ceil(round(keep_rate * n, 9)))


def _check_r(r, depth: int) -> RSpec:
    """Validate an ``r`` schedule: int >= 0, float keep rate in (0, 1], or a list of depth ints >= 0."""
    if isinstance(r, bool):
        raise TypeError("r must be an int, a float keep rate in (0, 1] or a list of ints, got a bool")
    if isinstance(r, numbers.Integral):
        if r < 0:
            raise ValueError(f"r must be >= 0, got {r}")
        return int(r)
    if isinstance(r, numbers.Real):
        if not (0.0 < r <= 1.0) or math.isnan(r):
            raise ValueError(f"a float r is a keep rate and must satisfy 0 < r <= 1, got {r} "
                             "(pass an int to remove that many tokens per block)")
        return float(r)
    if isinstance(r, torch.Tensor):
        raise TypeError("r must be an int, a float or a list of ints, not a tensor")
    if isinstance(r, Sequence) and not isinstance(r, str):
        if len(r) != depth:
            raise ValueError(f"a per-block r list must have one entry per block (depth={depth}), got {len(r)}")
        out = []
        for i, ri in enumerate(r):
            if isinstance(ri, bool) or not isinstance(ri, numbers.Integral):
                raise TypeError(f"r[{i}] must be an int, got {type(ri).__name__} ({ri!r})")
            if ri < 0:
                raise ValueError(f"r[{i}] must be >= 0, got {ri}")
            out.append(int(ri))
        return tuple(out)
    raise TypeError(f"r must be an int, a float keep rate in (0, 1] or a list of ints, got {type(r).__name__}")


def _block_r(method: Method, sctx: ScheduleContext) -> int:
    """The number of tokens block ``sctx.block_index`` removes (or idles): the method's ``block_r``
    or the generic rule, clipped to ``[0, max_r]``."""
    want = method.block_r(sctx) if method.block_r is not None else sctx.generic_r
    if isinstance(want, bool) or not isinstance(want, numbers.Integral):
        raise TypeError(f"method {method.name!r}: block_r must return an int, got {type(want).__name__}")
    return max(0, min(int(want), method.max_r(sctx.num_tokens, sctx.num_prefix_tokens)))


def reduction_schedule(model: nn.Module, r: Optional[RSpec] = None, *, num_tokens: Optional[int] = None,
                       method: Optional[str] = None, **options) -> list[int]:
    """The number of tokens each block removes, ``[r_0, ..., r_{depth-1}]``.

    Simulates the schedule the patched forward applies, with the method's own schedule rules (its
    ``schedule`` rewrite and ``block_r`` hook, see :func:`register_method`): block ``l`` sees ``N_l``
    tokens (``N_0 = num_tokens``, ``N_{l+1} = N_l - r_l``) and removes ``r_l``; see :func:`timm` for
    the forms of ``r``. ``sum(r_l)`` is the total removed. For a method that never removes tokens
    (``removes_tokens=False``: ``"idle"``) ``r_l`` is the number of tokens block ``l`` leaves idle
    and every block sees ``N_0`` tokens (IdleViT at ``r = 0.7``, 196 patches:
    ``[0, 0, 0, 59, 59, 59, 100, 100, 100, 129, 129, 129]``).

    Args:
        model: a timm ``VisionTransformer`` (patched or not).
        r: the schedule; the patched model's own if None (then ``method`` and ``options`` must be left
            out too: the patched configuration is used).
        num_tokens: tokens entering the first block (patches + prefix tokens); the model's default
            image size if None.
        method: the method whose rules give the schedule; the patched model's (or ``"merge"``).
        **options: the method's options, as for :func:`timm`; the patched model's own when it is
            patched with this method and none are given, else the method's defaults.

    Returns:
        list of ``depth`` ints, as :attr:`PatchState.r_applied` records them in a forward.

    Raises:
        TypeError/ValueError: as :func:`timm` for a bad ``r``, ``method``, option or ``num_tokens``;
            ValueError when ``r`` is None and the model is not patched.
    """
    _check_model(model)
    st = getattr(model, "_fastprune", None)
    depth = len(model.blocks)
    m = _get_method(method) if method is not None else (st.method if st is not None else _get_method("merge"))
    if r is None:
        if st is None:
            raise ValueError("r is required for a model that is not patched")
        if m is not st.method or options:
            raise ValueError("give r together with method or options (the patched model's r belongs to its "
                             "own method and options)")
        r, resolved = st.r, st.options  # already rewritten by the method's schedule at patch time
    else:
        r = _check_r(r, depth)
        resolved = st.options if (st is not None and m is st.method and not options) else _resolve_options(m, options)
        if m.schedule is not None:
            r = _check_r(m.schedule(r, depth, resolved), depth)
    p = model.num_prefix_tokens
    if num_tokens is None:
        num_tokens = model.patch_embed.num_patches + p
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, numbers.Integral) or num_tokens <= p:
        raise ValueError(f"num_tokens must be an int > num_prefix_tokens={p}, got {num_tokens!r}")
    out, n = [], int(num_tokens)
    for i in range(depth):
        ri = _block_r(m, ScheduleContext(r=r, block_index=i, depth=depth, num_tokens=n,
                                         num_patches=int(num_tokens) - p, num_prefix_tokens=p, options=resolved))
        out.append(ri)
        if m.removes_tokens:
            n -= ri
    return out


# --------------------------------------------------------------------------------------------------
# Per-model state
# --------------------------------------------------------------------------------------------------

@dataclass(eq=False)
class PatchState:
    """Configuration and per-forward state of a patched model (``model._fastprune``).

    Configuration: ``method`` (:class:`Method`), ``r`` (the schedule as validated: int, float keep
    rate or tuple), ``options`` (dict, includes ``prop_attn``), ``num_prefix_tokens``.

    Per forward (reset by every model forward; valid after it):

    * :attr:`num_tokens` -- ``list[int]``, the token count each block saw (length ``depth``).
    * :attr:`r_applied` -- ``list[int]``, the tokens each block was asked to remove (to leave idle,
      for a method that never removes tokens: ``"idle"``); equal to :func:`reduction_schedule`.
    * :attr:`size` -- ``[B, N_L]`` float32, patches per final token (ones if nothing was merged).
    * :attr:`index` -- ``[B, N_0]`` int64, for every token entering the first block (prefix tokens
      and patches), the position of the final token it ended up in; prefix tokens map to themselves.
      Composed block by block with ``gather``.
    * :meth:`size_at` / :meth:`index_at` -- the same entering block ``l`` (``l = depth`` is the end).
    """

    method: Method
    r: RSpec
    options: Mapping[str, Any]
    num_prefix_tokens: int
    depth: int
    original_model_class: type
    original_block_classes: list = field(default_factory=list)
    # per-forward: entry l = entering block l, entry depth = after the last block
    _sizes: list = field(default_factory=list, repr=False)
    _indices: list = field(default_factory=list, repr=False)
    _tokens: list = field(default_factory=list, repr=False)
    _r: list = field(default_factory=list, repr=False)

    def reset(self) -> None:
        """Forget the last forward's per-forward state."""
        self._sizes = [None] * (self.depth + 1)
        self._indices = [None] * (self.depth + 1)
        self._tokens = [None] * (self.depth + 1)
        self._r = [None] * self.depth

    # --- read access ---
    @property
    def num_tokens(self) -> list:
        """Token count entering each block in the last forward (``depth`` ints)."""
        return list(self._tokens[: self.depth])

    @property
    def r_applied(self) -> list:
        """Tokens each block was asked to remove (or, ``removes_tokens=False``, to leave idle) in the
        last forward (``depth`` ints)."""
        return list(self._r)

    def _last(self) -> int:
        for i in range(self.depth, -1, -1):
            if self._indices[i] is not None:
                return i
        raise RuntimeError("no forward has run since the model was patched or state was reset")

    def size_at(self, block_index: int) -> torch.Tensor:
        """``[B, N_l]`` float32 sizes entering block ``block_index`` (``depth``: after the last)."""
        index = self._indices[block_index]
        if index is None:
            raise RuntimeError(f"block {block_index} has not run in this forward")
        size = self._sizes[block_index]
        if size is None:
            n = self._tokens[block_index]
            return torch.ones(index.shape[0], n, dtype=torch.float32, device=index.device)
        return size

    def index_at(self, block_index: int) -> torch.Tensor:
        """``[B, N_0]`` int64 map from first-block positions to positions entering ``block_index``."""
        index = self._indices[block_index]
        if index is None:
            raise RuntimeError(f"block {block_index} has not run in this forward")
        return index

    @property
    def size(self) -> torch.Tensor:
        """``[B, N]`` float32 sizes of the tokens after the last block that ran."""
        return self.size_at(self._last())

    @property
    def index(self) -> torch.Tensor:
        """``[B, N_0]`` int64 composed position map after the last block that ran."""
        return self.index_at(self._last())

    # --- written by the patched blocks ---
    def _begin(self, x: torch.Tensor) -> None:
        B, N, _ = x.shape
        self._sizes[0] = None
        self._indices[0] = torch.arange(N, device=x.device).expand(B, N)
        self._tokens[0] = N

    def _record(self, block_index: int, r: int, x_out: torch.Tensor, size: Optional[torch.Tensor],
                index: Optional[torch.Tensor]) -> None:
        self._r[block_index] = r
        prev = self._indices[block_index]
        self._indices[block_index + 1] = prev if index is None else index.gather(1, prev)
        self._sizes[block_index + 1] = self._sizes[block_index] if size is None else size
        self._tokens[block_index + 1] = x_out.shape[1]


def _block_forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False,
                   **kwargs) -> torch.Tensor:
    st: PatchState = self._fastprune
    i: int = self._fastprune_block_index
    if attn_mask is not None or is_causal or kwargs:
        raise NotImplementedError("a model patched by fastprune does not support attn_mask/is_causal "
                                  "(token reduction changes the token count the mask refers to)")
    if i == 0:
        st._begin(x)
    elif st._indices[i] is None or st._tokens[i] != x.shape[1]:
        raise RuntimeError(f"fastprune: block {i} ran before the blocks in front of it in this forward "
                           "(patched blocks must run in order, from block 0)")
    N = x.shape[1]
    p = st.num_prefix_tokens
    method = st.method
    r = _block_r(method, ScheduleContext(r=st.r, block_index=i, depth=st.depth, num_tokens=N,
                                         num_patches=st._tokens[0] - p, num_prefix_tokens=p, options=st.options))
    size_is_ones = st._sizes[i] is None
    size = torch.ones(x.shape[0], N, dtype=torch.float32, device=x.device) if size_is_ones else st._sizes[i]
    ctx = ReductionContext(block=self, block_index=i, r=r, num_prefix_tokens=p, size=size,
                           size_is_ones=size_is_ones, options=st.options, state=st)
    if method.block_forward is not None:
        x, size_out, index = method.block_forward(self, x, ctx)
    else:
        x, size_out, index = _reduce_block(self, x, ctx, method)
    st._record(i, r, x, size_out, index)
    return x


def _reduce_block(block: nn.Module, x: torch.Tensor, ctx: ReductionContext, method: Method) -> tuple:
    """The block forward for reducer methods: attention residual, reducer (if r > 0), MLP residual."""
    needs = method.needs_for(ctx.options) if ctx.r > 0 else frozenset()
    out = attention_forward(block.attn, block.norm1(x), size=ctx.attn_size, need=needs,
                            prop_attn_impl=ctx.options["prop_attn_impl"])
    x = x + block.drop_path1(block.ls1(out.x))
    size, index = None, None
    if ctx.r > 0:
        B, N, C = x.shape
        ctx = _dc_replace(ctx, cls_attn=out.cls_attn, cls_attn_logits=out.cls_attn_logits, keys=out.keys)
        x, size, index = method.reducer(x, ctx)
        if x.shape != (B, N - ctx.r, C) or size.shape != (B, N - ctx.r) or index.shape != (B, N):
            raise RuntimeError(f"method {method.name!r}: the reducer must return x [B, N - r, C], size [B, N - r] "
                               f"and index [B, N] (B={B}, N={N}, r={ctx.r}, C={C}), got {tuple(x.shape)}, "
                               f"{tuple(size.shape)}, {tuple(index.shape)}")
    x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
    return x, size, index


class _PatchedBlock:
    """Mixin put in front of a timm ``Block`` class: the reducing block forward."""

    forward = _block_forward


class _PatchedVisionTransformer:
    """Mixin put in front of a timm ``VisionTransformer`` class: state reset, size-weighted pooling."""

    def forward_features(self, x, *args, **kwargs):
        self._fastprune.reset()
        return super().forward_features(x, *args, **kwargs)

    def forward_intermediates(self, x, *args, **kwargs):
        self._fastprune.reset()
        return super().forward_intermediates(x, *args, **kwargs)

    def pool(self, x: torch.Tensor, pool_type: Optional[str] = None) -> torch.Tensor:
        """timm's pooling, with ``avg`` / ``avgmax`` weighted by token size (prefix tokens excluded
        unless ``pool_include_prefix``), so a merged token counts for the patches it stands for."""
        pool_type = self.global_pool if pool_type is None else pool_type
        st: PatchState = self._fastprune
        if self.attn_pool is not None or pool_type not in ("avg", "avgmax"):
            return super().pool(x, pool_type)
        last = st._last() if any(i is not None for i in st._indices) else None
        if last is None or st._sizes[last] is None or st._sizes[last].shape != x.shape[:2]:
            return super().pool(x, pool_type)  # nothing merged (or not this forward's tokens): plain mean
        p = 0 if getattr(self, "pool_include_prefix", False) else self.num_prefix_tokens
        tokens, w = x[:, p:], st._sizes[last][:, p:]
        mean = ((tokens.float() * w[..., None]).sum(dim=1) / w.sum(dim=1, keepdim=True)).to(x.dtype)
        if pool_type == "avgmax":
            return 0.5 * (tokens.amax(dim=1) + mean)
        return mean


_CLASS_CACHE: dict = {}


def _patched_class(cls: type, mixin: type) -> type:
    key = (cls, mixin)
    if key not in _CLASS_CACHE:
        _CLASS_CACHE[key] = type(f"Fastprune{cls.__name__}", (mixin, cls), {"__module__": __name__})
    return _CLASS_CACHE[key]


# --------------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------------

def _timm_version() -> tuple:
    """timm's version as ints, ``"1.0.31.dev0"`` -> ``(1, 0, 31)``."""
    return tuple(int(re.match(r"\d*", piece).group() or 0) for piece in _timm_lib.__version__.split(".")[:3])


def _check_model(model) -> None:
    if _timm_version() < MIN_TIMM_VERSION:
        raise RuntimeError(f"fastprune.patch needs timm >= {'.'.join(map(str, MIN_TIMM_VERSION))}, "
                           f"found {_timm_lib.__version__}")
    if not isinstance(model, _TimmVisionTransformer):
        raise TypeError(f"model must be a timm VisionTransformer (timm.models.vision_transformer), "
                        f"got {type(model).__name__}")
    if getattr(model, "attn_pool", None) is not None:
        raise ValueError(f"global_pool={model.global_pool!r} (attention pooling) is not supported: the pooling "
                         "attends over all tokens with weights fastprune does not adjust for token size")
    if model.global_pool not in SUPPORTED_POOLS:
        raise ValueError(f"global_pool={model.global_pool!r} is not supported; supported: {SUPPORTED_POOLS}")
    for i, blk in enumerate(model.blocks):
        if not isinstance(blk, _TimmBlock):
            raise ValueError(f"block {i} is a {type(blk).__name__}; fastprune patches timm's pre-norm "
                             "vision_transformer.Block only (not ResPostBlock, ParallelScalingBlock, ...)")
        if not isinstance(blk.attn, _TimmAttention):
            raise ValueError(f"block {i}'s attention is a {type(blk.attn).__name__}; fastprune supports "
                             "timm.layers.Attention only (not DiffAttention, ...)")


def is_patched(model: nn.Module) -> bool:
    """True if ``model`` is currently patched by :func:`timm`."""
    return isinstance(model, _PatchedVisionTransformer)


def state(model: nn.Module) -> PatchState:
    """The :class:`PatchState` of a patched model (configuration and last forward's sizes, position
    map and token counts). Raises ``ValueError`` if the model is not patched."""
    if not is_patched(model):
        raise ValueError("model is not patched by fastprune.patch.timm")
    return model._fastprune


def timm(model: nn.Module, method: str = "merge", r: RSpec = 0, **options) -> nn.Module:
    """Patch a timm ``VisionTransformer`` in place for token reduction; return the same model.

    Every block runs ``x += drop_path1(ls1(attn(norm1(x))))``, then the method's reduction (when
    the block's ``r > 0``), then ``x += drop_path2(ls2(mlp(norm2(x))))``, with LayerScale, q/k norm,
    the attention ``norm``/``gate``, prefix tokens (class, distillation, register tokens), fused
    attention (``F.scaled_dot_product_attention``, kept on; timm's explicit path when ``fused_attn``
    is False) and proportional attention (ToMe, Bolya et al., ICLR 2023: ``+log(size)`` on every key).
    With ``global_pool="avg"``/``"avgmax"`` pooling is size-weighted (prefix tokens excluded as timm
    does); ``"token"`` is unchanged. No weights are changed; :func:`revert` undoes the patch.
    Patching a patched model re-configures it (method, ``r``, options), it never stacks.

    Schedules, ``r``:

    * ``int``: every block removes ``r`` tokens, clipped so that at least one non-prefix token stays
      (and to the method's ``max_r``).
    * ``list``/``tuple`` of ``depth`` ints: block ``l`` removes ``r[l]`` (clipped the same way).
    * ``float`` keep rate ``rho`` in ``(0, 1]``: block ``l`` keeps ``ceil(rho * (N_l - p))`` of its
      ``N_l - p`` non-prefix tokens, i.e. removes the rest (``rho = 1``: nothing).

    A method may read ``r`` its own way (the ``schedule`` and ``block_r`` hooks of
    :func:`register_method`): ``"evit"``/``"bat"`` apply a float keep rate at their ``layers`` only,
    ``"merge"`` with ``schedule="paper"`` at blocks 3, 6, 9, ``"idle"`` idles ``N0 - int(N0 rho^stage)``
    tokens per block, ``"tome"`` with ``schedule="decreasing"`` ramps an int ``r``.
    :func:`reduction_schedule` returns the resulting per-block list for a token count.

    Methods (:func:`available_methods`; add more with :func:`register_method`):

    * ``"merge"``: MSTM (Bian et al., 2023) -- the ``r`` tokens with the least class attention (softmax
      form, with the ``log size`` bias when ``prop_attn``) are merged into their most cosine-similar
      kept token (:func:`fastprune.merge_tokens`; Triton on CUDA, C++ or the PyTorch reference on CPU).
      Options: ``metric="x"`` (default: the tokens themselves) or ``"keys"`` (head-mean of the keys,
      ToMe's choice); ``weight="size_attn"`` (default: size x class attention, MSTM's importance
      weighting) or ``"size"`` (size-weighted average). The defaults were chosen on the 500-image
      sample (off the shelf, ViT-Ti and DeiT-Ti, see the README): with the recommended schedule
      ``[0, 0, 21, 20, ..., 12]`` they were the only combination within 1 top-1 point of the
      unreduced model on both models; ``backend="auto"`` (see
      :func:`fastprune.merge_tokens`); ``schedule=None`` (``r`` as above) or ``"paper"``: merge
      only at blocks 3, 6 and 9 (0-based) with ``r`` a float keep rate ``rho`` (``r=0``, the
      default, means ``rho = 0.7``), leaving EViT's token count ``p + ceil(rho (N - p)) + 1`` there
      (MSTM keeps one more crucial token where EViT adds its fused token), so FLOPs compare with
      EViT/BAT at the same ``rho``: 197 -> 140 -> 100 -> 72 tokens at ``rho = 0.7``, 224 px.
      **(choice)**: METHODS.md does not state MSTM's layers; these are the EViT/BAT layers the MSTM
      paper compares against.

    Options for every method: ``prop_attn`` (proportional attention; on by default, as for
    off-the-shelf models, except for methods whose defaults turn it off: ``"evit"``),
    ``prop_attn_impl="auto"`` (``"column"``/``"mask"``, see
    :func:`fastprune.attention.proportional_attention`).

    Per-forward state: :func:`state` (``model._fastprune``), a :class:`PatchState` with ``size``,
    ``index`` and ``num_tokens``. The ``state_dict`` is unchanged by patching; to pickle a whole
    model object, :func:`revert` it first (the patched classes are created at run time).

    Args:
        model: a timm ``VisionTransformer`` (timm >= 1.0.16) with pre-norm ``Block`` s and
            ``timm.layers.Attention``; a class token is needed by methods that use class attention.
        method: registered method name.
        r: the schedule, see above.
        **options: the method's options.

    Returns:
        ``model``, patched.

    Raises:
        TypeError: ``model`` not a ``VisionTransformer``; ``method``/``r``/option of the wrong type;
            unknown option.
        ValueError: unsupported model (attention pooling ``'map'``/``'prr'``, other block or attention
            types, no class token for a class-attention method); unknown method; ``r`` out of range
            (negative int, keep rate outside ``(0, 1]``, list of the wrong length); bad option values.
    """
    _check_model(model)
    m = _get_method(method)
    r = _check_r(r, len(model.blocks))
    resolved = _resolve_options(m, options)
    if m.schedule is not None:  # the method's own schedule forms (e.g. ToMe's "decreasing")
        r = _check_r(m.schedule(r, len(model.blocks), resolved), len(model.blocks))
    if m.block_forward is None and m.needs_for(resolved) & {"cls_attn", "cls_attn_logits"} \
            and getattr(model, "cls_token", None) is None:
        raise ValueError(f"method {m.name!r} ranks tokens by class attention but the model has no class token")

    if is_patched(model):  # re-configure
        st = model._fastprune
        st.method, st.r, st.options = m, r, resolved
        st.reset()
        return model

    st = PatchState(method=m, r=r, options=resolved, num_prefix_tokens=int(model.num_prefix_tokens),
                    depth=len(model.blocks), original_model_class=type(model))
    st.reset()
    for i, blk in enumerate(model.blocks):
        st.original_block_classes.append(type(blk))
        blk.__class__ = _patched_class(type(blk), _PatchedBlock)
        blk._fastprune = st
        blk._fastprune_block_index = i
    model._fastprune = st
    model.__class__ = _patched_class(type(model), _PatchedVisionTransformer)
    return model


def revert(model: nn.Module) -> nn.Module:
    """Undo :func:`timm`: restore the original classes and remove fastprune's state; return ``model``.

    The reverted model computes exactly what it computed before patching (its parameters were never
    changed). Reverting a model that is not patched raises ``ValueError``.
    """
    st = state(model)
    for blk, cls in zip(model.blocks, st.original_block_classes):
        blk.__class__ = cls
        del blk._fastprune
        del blk._fastprune_block_index
    model.__class__ = st.original_model_class
    del model._fastprune
    return model


# --------------------------------------------------------------------------------------------------
# Built-in methods living in their own modules
# --------------------------------------------------------------------------------------------------

def _register_builtin_methods() -> None:
    """Register ``"tome"``, ``"evit"``, ``"bat"`` and ``"idle"`` (each module's ``register_with_patch``).

    Done here, when this module is first imported, rather than when ``fastprune`` or the method
    modules are imported: those stay free of timm, which only this module needs.
    """
    from . import bat, evit, idle, tome

    for module in (tome, evit, bat, idle):
        module.register_with_patch()


_register_builtin_methods()
