"""The method registry of the timm integration: what a method is, and what it is told per block.

A method is a *reducer* (tokens after the attention residual and a :class:`ReductionContext` ->
``(x, size, index)``) or a whole *block forward* (IdleViT), with its options, validation and
schedule hooks (:func:`register_method`). The method modules (:mod:`fastprune.tome`, ...) do not know
this registry; :mod:`fastprune.patch.methods` adapts them to it.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping, Optional, Union

import torch
import torch.nn as nn

from .. import _checks, schedules
from ..attention import NEEDS, PROP_ATTN_IMPLS

__all__ = ["ReductionContext", "ScheduleContext", "Method", "register_method", "available_methods", "get_method",
           "resolve_options", "block_r", "attention_needs", "run_reducer", "COMMON_OPTIONS", "NEEDS"]

#: Options every method accepts, with their defaults (a method's ``defaults`` may change the default
#: for that method, see :func:`register_method`).
COMMON_OPTIONS = MappingProxyType({"prop_attn": True, "prop_attn_impl": "auto"})


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
        return schedules.generic_r(self.r, self.block_index, self.num_tokens, self.num_prefix_tokens)


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
    check_common_options({**COMMON_OPTIONS, **defaults}, where=f"method {name!r}'s defaults: ")
    method = Method(name, reducer, block_forward, needs, MappingProxyType(defaults), validate,
                    max_r or _default_max_r, schedule, block_r, removes_tokens)
    _METHODS[name] = method
    return method


def available_methods() -> tuple[str, ...]:
    """Names of the registered methods."""
    return tuple(sorted(_METHODS))


def get_method(method) -> Method:
    if isinstance(method, Method):
        return method
    if not isinstance(method, str):
        raise TypeError(f"method must be a str, got {type(method).__name__}")
    if method not in _METHODS:
        raise ValueError(f"unknown method {method!r}; registered: {available_methods()}")
    return _METHODS[method]


def check_common_options(options: Mapping[str, Any], where: str = "") -> None:
    """The values of :data:`COMMON_OPTIONS` in ``options``: ``prop_attn`` a bool, ``prop_attn_impl`` known."""
    if not isinstance(options["prop_attn"], bool):
        raise TypeError(f"{where}prop_attn must be a bool, got {options['prop_attn']!r}")
    if options["prop_attn_impl"] not in PROP_ATTN_IMPLS:
        raise ValueError(f"{where}prop_attn_impl must be one of {PROP_ATTN_IMPLS}, got {options['prop_attn_impl']!r}")


def resolve_options(method: Method, options: Mapping[str, Any]) -> Mapping[str, Any]:
    unknown = set(options) - set(COMMON_OPTIONS) - set(method.defaults)
    if unknown:
        raise TypeError(f"unexpected option(s) {sorted(unknown)} for method {method.name!r}; "
                        f"accepted: {sorted(set(COMMON_OPTIONS) | set(method.defaults))}")
    resolved = {**COMMON_OPTIONS, **method.defaults, **options}
    check_common_options(resolved)
    if method.validate is not None:
        method.validate(resolved)
    return resolved



def block_r(method: Method, sctx: ScheduleContext) -> int:
    """The number of tokens block ``sctx.block_index`` removes (or idles): the method's ``block_r``
    or the generic rule, clipped to ``[0, max_r]``."""
    want = method.block_r(sctx) if method.block_r is not None else sctx.generic_r
    if isinstance(want, bool) or not isinstance(want, numbers.Integral):
        raise TypeError(f"method {method.name!r}: block_r must return an int, got {type(want).__name__}")
    return max(0, min(int(want), method.max_r(sctx.num_tokens, sctx.num_prefix_tokens)))



def attention_needs(method: Method, ctx: ReductionContext, class_token: bool) -> tuple[frozenset, bool]:
    """``(need, stand_in)``: what a block's attention must compute for ``method`` (nothing when
    ``ctx.r == 0``), and whether the attention each token receives stands in for class attention
    (a model without a class token: ``"cls_attn"`` becomes ``"received_attn"``)."""
    need = method.needs_for(ctx.options) if ctx.r > 0 else frozenset()
    stand_in = "cls_attn" in need and not class_token
    return ((need - {"cls_attn"}) | {"received_attn"} if stand_in else need), stand_in


def run_reducer(method: Method, x: torch.Tensor, ctx: ReductionContext, attn_out, stand_in: bool) -> tuple:
    """``method.reducer(x, ctx)`` with the attention's extras in ``ctx`` (``attn_out``: an
    :class:`~fastprune.attention.AttentionOutput`); checks the shapes it returns.

    Raises:
        RuntimeError: the reducer returned other shapes than ``x [B, N - r, C]``, ``size [B, N - r]``,
            ``index [B, N]``.
    """
    B, N, C = x.shape
    ctx = replace(ctx, cls_attn=attn_out.received_attn if stand_in else attn_out.cls_attn,
                  cls_attn_logits=attn_out.cls_attn_logits, keys=attn_out.keys)
    _checks.LIBRARY_SIZES.depth += 1  # ctx.size is the library's own: no per-block value check
    try:
        x, size, index = method.reducer(x, ctx)
    finally:
        _checks.LIBRARY_SIZES.depth -= 1
    if x.shape != (B, N - ctx.r, C) or size.shape != (B, N - ctx.r) or index.shape != (B, N):
        raise RuntimeError(f"method {method.name!r}: the reducer must return x [B, N - r, C], size [B, N - r] "
                           f"and index [B, N] (B={B}, N={N}, r={ctx.r}, C={C}), got {tuple(x.shape)}, "
                           f"{tuple(size.shape)}, {tuple(index.shape)}")
    return x, size, index
