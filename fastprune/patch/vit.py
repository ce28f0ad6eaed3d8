"""timm drop-in: the patched ``VisionTransformer`` and ``Block`` classes, per-model state, entry points.

The model's class and every block's class are swapped for thin subclasses (swapped back by
:func:`revert`); no parameter or buffer is touched. Written against timm 1.0.31's
``vision_transformer.py`` and ``layers/attention.py``.
"""
from __future__ import annotations

import inspect
import numbers
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import timm as _timm_lib  # the package; this module's :func:`timm` is the patch function
import torch
import torch.nn as nn
from timm.layers import Attention as _TimmAttention
from timm.layers import AttentionPoolLatent as _AttentionPoolLatent
from timm.models.vision_transformer import Block as _TimmBlock
from timm.models.vision_transformer import VisionTransformer as _TimmVisionTransformer

from .. import schedules
from ..attention import attention_forward
from ..schedules import RSpec
from .registry import (Method, ReductionContext, ScheduleContext, attention_needs, block_r, get_method,
                       resolve_options, run_reducer)

__all__ = ["timm", "revert", "state", "is_patched", "reduction_schedule", "PatchState", "MIN_TIMM_VERSION",
           "SUPPORTED_POOLS"]

#: Oldest timm whose ``VisionTransformer``/``Block``/``Attention`` layout this module follows.
MIN_TIMM_VERSION = (1, 0, 16)

#: ``global_pool`` values a patched model supports ('avg' and 'avgmax' become size-weighted).
SUPPORTED_POOLS = ("", "token", "avg", "avgmax", "max")


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
    m = get_method(method) if method is not None else (st.method if st is not None else get_method("merge"))
    if r is None:
        if st is None:
            raise ValueError("r is required for a model that is not patched")
        if m is not st.method or options:
            raise ValueError("give r together with method or options (the patched model's r belongs to its "
                             "own method and options)")
        r, resolved = st.r, st.options  # already rewritten by the method's schedule at patch time
    else:
        r = schedules.check_r(r, depth)
        resolved = st.options if (st is not None and m is st.method and not options) else resolve_options(m, options)
        if m.schedule is not None:
            r = schedules.check_r(m.schedule(r, depth, resolved), depth)
    p = model.num_prefix_tokens
    if num_tokens is None:
        num_tokens = model.patch_embed.num_patches + p
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, numbers.Integral) or num_tokens <= p:
        raise ValueError(f"num_tokens must be an int > num_prefix_tokens={p}, got {num_tokens!r}")
    out, n = [], int(num_tokens)
    for i in range(depth):
        ri = block_r(m, ScheduleContext(r=r, block_index=i, depth=depth, num_tokens=n,
                                         num_patches=int(num_tokens) - p, num_prefix_tokens=p, options=resolved))
        out.append(ri)
        if m.removes_tokens:
            n -= ri
    return out




@dataclass(eq=False)
class PatchState:
    """Configuration and per-forward state of a patched model (``model._fastprune``).

    Configuration: ``method`` (:class:`Method`), ``r`` (the schedule as validated: int, float keep
    rate or tuple), ``options`` (dict, includes ``prop_attn``), ``num_prefix_tokens``,
    ``class_token`` (False: a method's ``cls_attn`` is the mean attention each token receives,
    :func:`fastprune.attention.received_attention`).

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
    class_token: bool = True
    original_block_classes: list = field(default_factory=list)
    # per-forward: entry l = entering block l, entry depth = after the last block
    _sizes: list = field(default_factory=list, repr=False)
    _indices: list = field(default_factory=list, repr=False)
    _tokens: list = field(default_factory=list, repr=False)
    _r: list = field(default_factory=list, repr=False)
    #: a method's own records of the last forward (e.g. IdleViT's cut losses), by method name
    records: dict = field(default_factory=dict, repr=False)

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
    if attn_mask is not None or is_causal or kwargs:
        raise NotImplementedError("a model patched by fastprune does not support attn_mask/is_causal "
                                  "(token reduction changes the token count the mask refers to)")
    ctx = enter_block(st, self, self._fastprune_block_index, x)
    if st.method.block_forward is not None:
        x, size_out, index = st.method.block_forward(self, x, ctx)
    else:
        x, size_out, index = _reduce_block(self, x, ctx, st.method)
    st._record(ctx.block_index, ctx.r, x, size_out, index)
    return x


def enter_block(st: PatchState, block: nn.Module, i: int, x: torch.Tensor) -> ReductionContext:
    """Start block ``i`` of a forward: check the blocks run in order, and return its context (its
    ``r`` from the method's schedule, the sizes entering it). Shared by the timm and transformers patches.

    Raises:
        RuntimeError: block ``i`` runs before the blocks in front of it in this forward.
    """
    if i == 0:
        st._begin(x)
    elif st._indices[i] is None or st._tokens[i] != x.shape[1]:
        raise RuntimeError(f"fastprune: block {i} ran before the blocks in front of it in this forward "
                           "(patched blocks must run in order, from block 0)")
    N, p = x.shape[1], st.num_prefix_tokens
    r = block_r(st.method, ScheduleContext(r=st.r, block_index=i, depth=st.depth, num_tokens=N,
                                           num_patches=st._tokens[0] - p, num_prefix_tokens=p, options=st.options))
    size_is_ones = st._sizes[i] is None
    size = torch.ones(x.shape[0], N, dtype=torch.float32, device=x.device) if size_is_ones else st._sizes[i]
    return ReductionContext(block=block, block_index=i, r=r, num_prefix_tokens=p, size=size,
                            size_is_ones=size_is_ones, options=st.options, state=st)


def _reduce_block(block: nn.Module, x: torch.Tensor, ctx: ReductionContext, method: Method) -> tuple:
    """The block forward for reducer methods: attention residual, reducer (if r > 0), MLP residual."""
    need, stand_in = attention_needs(method, ctx, ctx.state.class_token)
    out = attention_forward(block.attn, block.norm1(x), size=ctx.attn_size, need=need,
                            prop_attn_impl=ctx.options["prop_attn_impl"])
    x = x + block.drop_path1(block.ls1(out.x))
    size, index = None, None
    if ctx.r > 0:
        x, size, index = run_reducer(method, x, ctx, out, stand_in)
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

    def fastprune_record(self, method: str):
        """The record ``method`` keeps of the last forward (None before the first one).

        Raises ``ValueError`` if the model is patched with another method."""
        st: PatchState = self._fastprune
        if st.method.name != method:
            raise ValueError(f"model is patched with method {st.method.name!r}, not {method!r}")
        return st.records.get(method)

    def pool(self, x: torch.Tensor, pool_type: Optional[str] = None) -> torch.Tensor:
        """timm's pooling, weighted by token size so a merged token counts for the patches it stands
        for: ``avg`` / ``avgmax`` as a size-weighted mean (prefix tokens excluded unless
        ``pool_include_prefix``), attention pooling (``map``) with ``+log(size)`` on its keys."""
        pool_type = self.global_pool if pool_type is None else pool_type
        st: PatchState = self._fastprune
        if self.attn_pool is None and pool_type not in ("avg", "avgmax"):
            return super().pool(x, pool_type)
        last = st._last() if any(i is not None for i in st._indices) else None
        if last is None or st._sizes[last] is None or st._sizes[last].shape != x.shape[:2]:
            return super().pool(x, pool_type)  # nothing merged (or not this forward's tokens): plain pooling
        p = 0 if getattr(self, "pool_include_prefix", False) else self.num_prefix_tokens
        tokens, w = x[:, p:], st._sizes[last][:, p:]
        if self.attn_pool is not None:  # proportional attention in the pool: log-size bias on every key
            return self.attn_pool(tokens, attn_mask=w.log()[:, None, None, :].to(tokens.dtype))
        mean = ((tokens.float() * w[..., None]).sum(dim=1) / w.sum(dim=1, keepdim=True)).to(x.dtype)
        if pool_type == "avgmax":
            return 0.5 * (tokens.amax(dim=1) + mean)
        return mean


_CLASS_CACHE: dict = {}


def patched_class(cls: type, mixin: type) -> type:
    """The class ``Fastprune<cls>`` with ``mixin`` in front of ``cls``, one per pair (cached)."""
    key = (cls, mixin)
    if key not in _CLASS_CACHE:
        _CLASS_CACHE[key] = type(f"Fastprune{cls.__name__}", (mixin, cls), {"__module__": __name__})
    return _CLASS_CACHE[key]



def _timm_version() -> tuple:
    """timm's version as ints, ``"1.0.31.dev0"`` -> ``(1, 0, 31)``."""
    return tuple(int(re.match(r"\d*", piece).group() or 0) for piece in _timm_lib.__version__.split(".")[:3])


#: Why timm's other ViT families are refused.
_UNSUPPORTED_FAMILIES = {
    "Eva": "EVA/EVA-02 and the RoPE ViTs rotate q and k by each token's grid position inside attention; "
           "a merged token has no single position, and fastprune does not define one yet",
    "Beit": "BEiT adds a relative position bias indexed by pairs of grid positions, which merged tokens no "
            "longer have",
}


def _check_model(model) -> None:
    if _timm_version() < MIN_TIMM_VERSION:
        raise RuntimeError(f"fastprune.patch needs timm >= {'.'.join(map(str, MIN_TIMM_VERSION))}, "
                           f"found {_timm_lib.__version__}")
    if not isinstance(model, _TimmVisionTransformer):
        why = _UNSUPPORTED_FAMILIES.get(type(model).__name__, "")
        raise TypeError(f"model must be a timm VisionTransformer (timm.models.vision_transformer), "
                        f"got {type(model).__name__}{': ' + why if why else ''}")
    pool = getattr(model, "attn_pool", None)
    if pool is not None:
        if not isinstance(pool, _AttentionPoolLatent) or getattr(pool, "pos_embed", None) is not None \
                or "attn_mask" not in inspect.signature(pool.forward).parameters:
            raise ValueError(f"global_pool={model.global_pool!r}: attention pooling is supported as timm's "
                             "AttentionPoolLatent without a position embedding, whose forward takes attn_mask "
                             f"(got {type(pool).__name__}; the pool must take the log-size bias of merged tokens)")
    elif model.global_pool not in SUPPORTED_POOLS:
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


def timm(model: nn.Module, method: Optional[str] = None, r: Optional[RSpec] = None, **options) -> nn.Module:
    """Patch a timm ``VisionTransformer`` in place for token reduction; return the same model.

    ``timm(model)`` with no other argument applies the recommended setting: ``method="merge"`` (MSTM)
    with ``r=``:func:`fastprune.schedules.recommended_r` (``0*2,23,21..13`` for 12 blocks and 196
    patches, 40% fewer FLOPs on ViT-Ti/DeiT-Ti; the README gives its accuracy). Otherwise
    ``method`` defaults to ``"merge"`` and ``r`` to 0 (a no-op).

    Every block runs ``x += drop_path1(ls1(attn(norm1(x))))`` (timm's attention with proportional
    attention, :func:`fastprune.attention.attention_forward`), then the method's reduction when the
    block's ``r > 0``, then ``x += drop_path2(ls2(mlp(norm2(x))))``. Fused attention stays on; with
    ``global_pool="avg"``/``"avgmax"``/``"map"`` pooling is size-weighted (``map``: ``+log size`` on the pool's
    keys). On a model without a class token (``class_token=False``: ``*_gap_*``, SigLIP), methods that
    rank by class attention (``"merge"``, ``"evit"``, ``"bat"``) rank by the mean attention each token
    receives instead (:func:`fastprune.attention.received_attention`). No weights change; :func:`revert`
    undoes the patch; patching a patched model re-configures it.

    ``r``: an int (every block removes ``r``), a list of ``depth`` ints, or a float keep rate ``rho``
    (block ``l`` keeps ``ceil(rho (N_l - p))`` of its non-prefix tokens); clipped so that one
    non-prefix token stays and to the method's ``max_r``. A method may read ``r`` its own way
    (``"evit"``/``"bat"``: a keep rate at their ``layers``; ``"merge"`` with ``schedule="paper"``;
    ``"idle"``: IdleViT's stage schedule; ``"tome"`` with ``schedule="decreasing"``), see
    :func:`reduction_schedule` and :mod:`fastprune.patch.methods` for every method's options.
    Common options: ``prop_attn`` (on, except for ``"evit"``), ``prop_attn_impl="auto"``.

    Args:
        model: a timm ``VisionTransformer`` (timm >= 1.0.16) with pre-norm ``Block`` s and
            ``timm.layers.Attention``.
        method: a registered method name (:func:`available_methods`).
        r: the schedule, see above.
        **options: the method's options.

    Raises:
        TypeError: ``model`` not a ``VisionTransformer``; ``method``/``r``/option of the wrong type;
            unknown option.
        ValueError: unsupported model (attention pooling other than timm's ``AttentionPoolLatent``,
            other block or attention types, no class token for ``"idle"``); unknown method; ``r`` out
            of range; bad option values.
    """
    _check_model(model)
    if method is None and r is None and not options:
        r = schedules.recommended_r(len(model.blocks), int(model.patch_embed.num_patches))
    method = "merge" if method is None else method
    r = 0 if r is None else r
    m = get_method(method)
    r = schedules.check_r(r, len(model.blocks))
    resolved = resolve_options(m, options)
    if m.schedule is not None:  # the method's own schedule forms (e.g. ToMe's "decreasing")
        r = schedules.check_r(m.schedule(r, len(model.blocks), resolved), len(model.blocks))
    class_token = getattr(model, "cls_token", None) is not None
    if "cls_attn_logits" in m.needs_for(resolved) and not class_token:
        raise ValueError(f"method {m.name!r} ranks tokens by the class token's attention logits, and the model has "
                         "no class token (methods that rank by class attention use the attention each token "
                         "receives instead; this one has no such stand-in)")

    if is_patched(model):  # re-configure
        st = model._fastprune
        st.method, st.r, st.options, st.class_token = m, r, resolved, class_token
        st.reset()
        return model

    st = PatchState(method=m, r=r, options=resolved, num_prefix_tokens=int(model.num_prefix_tokens),
                    depth=len(model.blocks), original_model_class=type(model), class_token=class_token)
    st.reset()
    for i, blk in enumerate(model.blocks):
        st.original_block_classes.append(type(blk))
        blk.__class__ = patched_class(type(blk), _PatchedBlock)
        blk._fastprune = st
        blk._fastprune_block_index = i
    model._fastprune = st
    model.__class__ = patched_class(type(model), _PatchedVisionTransformer)
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
