"""The built-in methods of the timm integration: each method module's functions, adapted to the registry.

* ``"merge"``: MSTM (Bian et al., 2023), :func:`fastprune.merge_tokens`. Options: ``metric="x"``
  (the tokens) or ``"keys"`` (head-mean of the keys); ``weight="size_attn"`` (size x class attention)
  or ``"size"``; ``backend`` (see :data:`fastprune.backends.BACKENDS`); ``schedule=None`` or
  ``"paper"``: merge only at :data:`~fastprune.schedules.MSTM_PAPER_LAYERS` with ``r`` a keep rate
  (``r=0`` means :data:`~fastprune.schedules.MSTM_PAPER_KEEP_RATE`), leaving EViT's token count
  ``p + ceil(rho (N - p)) + 1`` there.
* ``"tome"``: ToMe (Bolya et al., ICLR 2023), :func:`fastprune.tome.tome_merge_tokens`, every block.
  Options: ``schedule="constant"`` or ``"decreasing"`` (:func:`~fastprune.schedules.tome_schedule`),
  ``metric="keys"`` or ``"x"``, ``backend``. ``r`` is clipped to ``(N - p) // 2``.
* ``"evit"``: EViT (Liang et al., ICLR 2022), :func:`fastprune.evit.evit_tokens`; ``r`` a keep rate
  (or 0) at ``layers=(3, 6, 9)``. Options: ``layers``, ``normalize=False``, ``backend``; ``prop_attn``
  is **off** by default for EViT (the paper has no proportional attention).
* ``"bat"``: BAT (Long et al., CVPR 2023), :func:`fastprune.bat.bat_tokens`; ``r`` a keep rate (or 0)
  at ``layers``. Options: ``layers``, ``num_clusters=10``, ``num_pairs=None``, ``k=5``,
  ``metric="keys"`` or ``"x"``, ``backend``.
* ``"idle"``: IdleViT (Xu et al., 2023), :func:`fastprune.idle.idle_block` as the block forward; ``r``
  as :func:`~fastprune.schedules.idle_schedule` reads it (a block's ``r`` is the tokens it idles).
  Options: ``form="auto"`` (mask form in training mode, gather form in eval) / ``"gather"`` /
  ``"mask"``; ``cut_loss=True`` (mask-form forwards record the token cut loss,
  :func:`fastprune.idle.cut_loss`); ``reselect=True`` (the paper's rule; ``False``: an idle token
  stays idle); ``backend``.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn as nn

from .. import _checks, backends, bat, evit, idle, schedules, tome
from ..functional import merge_tokens
from ..reference import MERGE_WEIGHTS
from .registry import ReductionContext, ScheduleContext, available_methods, register_method

__all__ = ["MERGE_DEFAULTS", "TOME_DEFAULTS", "EVIT_DEFAULTS", "BAT_DEFAULTS", "IDLE_DEFAULTS",
           "register_builtin_methods"]

METRICS = ("keys", "x")
#: ``schedule`` option of ``method="merge"``.
MERGE_SCHEDULES = (None, "paper")
IDLE_OPTION_FORMS = ("auto",) + idle.IDLE_FORMS

#: Defaults of every built-in method's options. MSTM's ``metric="x", weight="size_attn"`` were
#: chosen on the 500-image sample (README).
MERGE_DEFAULTS = {"metric": "x", "weight": "size_attn", "backend": "auto", "schedule": None}
TOME_DEFAULTS = {"metric": "keys", "schedule": "constant", "backend": "auto"}
EVIT_DEFAULTS = {"layers": schedules.DEFAULT_LAYERS, "normalize": False, "backend": "auto", "prop_attn": False}
BAT_DEFAULTS = {"layers": schedules.DEFAULT_LAYERS, "num_clusters": bat.DEFAULT_NUM_CLUSTERS, "num_pairs": None,
                "k": bat.DEFAULT_KNN, "metric": "keys", "backend": "auto"}
IDLE_DEFAULTS = {"form": "auto", "cut_loss": True, "reselect": True, "backend": "auto"}


def _metric(x: torch.Tensor, ctx: ReductionContext) -> torch.Tensor:
    return ctx.keys if ctx.options["metric"] == "keys" else x


def _needs_with_keys(base: frozenset):
    """``needs`` of a method whose ``metric`` option may be the keys."""
    return lambda options: base | {"keys"} if options["metric"] == "keys" else base


# ---- MSTM ------------------------------------------------------------------------------------------

def _merge_validate(options: Mapping[str, Any]) -> None:
    _checks.check_choice(options["metric"], "metric", METRICS)
    _checks.check_choice(options["weight"], "weight", MERGE_WEIGHTS)
    _checks.check_choice(options["backend"], "backend", backends.BACKENDS)
    _checks.check_choice(options["schedule"], "schedule", MERGE_SCHEDULES)


def _merge_schedule(r, depth: int, options: Mapping[str, Any]):
    """``schedule="paper"``: ``r`` a float keep rate (0 means the paper's default), the model deep enough."""
    if options["schedule"] != "paper":
        return r
    if isinstance(r, int) and r == 0:
        r = schedules.MSTM_PAPER_KEEP_RATE
    if not isinstance(r, float):
        raise TypeError(f"schedule='paper' takes r = a float keep rate in (0, 1] (default "
                        f"{schedules.MSTM_PAPER_KEEP_RATE}), got {r!r}")
    if depth <= max(schedules.MSTM_PAPER_LAYERS):
        raise ValueError(f"schedule='paper' merges at blocks {schedules.MSTM_PAPER_LAYERS}; "
                         f"the model has {depth} blocks")
    return r


def _merge_block_r(sctx: ScheduleContext) -> int:
    """``schedule="paper"``: leave ``p + K + 1`` tokens at the paper layers; else the generic rule."""
    if sctx.options["schedule"] != "paper":
        return sctx.generic_r
    if sctx.block_index not in schedules.MSTM_PAPER_LAYERS:
        return 0
    n = sctx.num_tokens - sctx.num_prefix_tokens
    return max(0, n - schedules.kept_count(sctx.num_tokens, sctx.num_prefix_tokens, sctx.r) - 1)


def _merge_reducer(x: torch.Tensor, ctx: ReductionContext) -> tuple:
    merged = merge_tokens(x, ctx.cls_attn, ctx.r, size=ctx.size, metric=_metric(x, ctx),
                          num_prefix_tokens=ctx.num_prefix_tokens, weight=ctx.options["weight"],
                          backend=ctx.options["backend"])
    return merged.x, merged.size, merged.index


# ---- ToMe ------------------------------------------------------------------------------------------

def _tome_validate(options) -> None:
    _checks.check_choice(options["metric"], "metric", METRICS)
    _checks.check_choice(options["schedule"], "schedule", schedules.TOME_SCHEDULES)
    _checks.check_choice(options["backend"], "backend", tome.BACKENDS)


def _tome_schedule(r, depth: int, options):
    """``schedule="decreasing"`` turns an int ``r`` into :func:`~fastprune.schedules.tome_schedule`'s ramp."""
    if options["schedule"] == "constant":
        return r
    if isinstance(r, bool) or not isinstance(r, int):
        raise ValueError(f"schedule={options['schedule']!r} needs an int r (tokens per block on average), "
                         f"got {r!r}")
    return schedules.tome_schedule(r, depth, options["schedule"])


def _tome_max_r(num_tokens: int, num_prefix_tokens: int) -> int:
    return max(0, (num_tokens - num_prefix_tokens) // 2)


def _tome_reducer(x: torch.Tensor, ctx: ReductionContext) -> tuple:
    merged = tome.tome_merge_tokens(x, ctx.r, metric=_metric(x, ctx), size=None if ctx.size_is_ones else ctx.size,
                                    num_prefix_tokens=ctx.num_prefix_tokens, backend=ctx.options["backend"])
    return merged.x, merged.size, merged.index


# ---- EViT and BAT: a keep rate at the blocks of ``layers`` -----------------------------------------

def _layer_schedule(method: str):
    def schedule(r, depth: int, options):
        """Validate ``r`` (keep rate or 0) and ``layers`` against the model's depth, once at patch time."""
        schedules.layer_keep_rate(r, method)
        schedules.parse_layers(options["layers"], depth)
        return r

    return schedule


def _layer_block_r(method: str, output_tokens):
    """``block_r`` of EViT/BAT: at a block of ``layers``, ``N - output_tokens(N, p, rho, options)``
    tokens go (none if the method would leave all ``N``); elsewhere, and with ``r = 0``, none."""
    def block_r(sctx: ScheduleContext) -> int:
        keep_rate = schedules.layer_keep_rate(sctx.r, method)
        if keep_rate is None or sctx.block_index not in schedules.parse_layers(sctx.options["layers"]):
            return 0
        N = sctx.num_tokens
        return max(0, N - output_tokens(N, sctx.num_prefix_tokens, keep_rate, sctx.options))

    return block_r


def _layer_validate(options, backends_: tuple) -> None:
    schedules.parse_layers(options["layers"])
    _checks.check_choice(options["backend"], "backend", backends_)


def _evit_output_tokens(N: int, p: int, keep_rate: float, options) -> int:
    K = schedules.kept_count(N, p, keep_rate)
    return N if K == N - p else p + K + 1


def _evit_reducer(x: torch.Tensor, ctx: ReductionContext) -> tuple:
    out = evit.evit_tokens(x, ctx.cls_attn, ctx.state.r, size=ctx.size, num_prefix_tokens=ctx.num_prefix_tokens,
                           normalize=ctx.options["normalize"], backend=ctx.options["backend"])
    return out.x, out.size, out.index


def _evit_validate(options) -> None:
    _layer_validate(options, evit.BACKENDS)
    if not isinstance(options["normalize"], bool):
        raise TypeError(f"normalize must be a bool, got {options['normalize']!r}")


def _bat_output_tokens(N: int, p: int, keep_rate: float, options) -> int:
    return bat.bat_plan(N, p, keep_rate, options["num_clusters"], options["num_pairs"],
                        options["k"]).output_tokens(p)


def _bat_reducer(x: torch.Tensor, ctx: ReductionContext) -> tuple:
    options = ctx.options
    out = bat.bat_tokens(x, ctx.cls_attn, ctx.state.r, size=ctx.size, metric=_metric(x, ctx),
                         num_prefix_tokens=ctx.num_prefix_tokens, num_clusters=options["num_clusters"],
                         num_pairs=options["num_pairs"], k=options["k"], backend=options["backend"])
    return out.x, out.size, out.index


def _bat_validate(options) -> None:
    _layer_validate(options, bat.BACKENDS)
    _checks.check_choice(options["metric"], "metric", METRICS)
    _checks.check_int(options["num_clusters"], "num_clusters", 1, 2 ** 31 - 1)
    _checks.check_int(options["k"], "k", 1, 2 ** 31 - 1)
    if options["num_pairs"] is not None:
        _checks.check_int(options["num_pairs"], "num_pairs", 0, 2 ** 31 - 1)


# ---- IdleViT ---------------------------------------------------------------------------------------

def _idle_validate(options) -> None:
    _checks.check_choice(options["form"], "form", IDLE_OPTION_FORMS)
    if not isinstance(options["cut_loss"], bool):
        raise TypeError(f"cut_loss must be a bool, got {options['cut_loss']!r}")
    if not isinstance(options["reselect"], bool):
        raise TypeError(f"reselect must be a bool, got {options['reselect']!r}")
    _checks.check_choice(options["backend"], "backend", idle.BACKENDS)


def _idle_block_r(sctx: ScheduleContext) -> int:
    """The tokens block ``l`` leaves idle, ``N0 - K_l`` (:func:`~fastprune.schedules.idle_schedule`)."""
    return sctx.num_patches - schedules.idle_schedule(sctx.r, sctx.depth, sctx.num_patches)[sctx.block_index]


def _idle_block_forward(block: nn.Module, x: torch.Tensor, ctx: ReductionContext) -> tuple:
    st = ctx.state
    p = ctx.num_prefix_tokens
    if p < 1:
        raise ValueError("method 'idle' ranks tokens by the class token's attention: the model needs a class token")
    if ctx.block_index == 0 or "idle" not in st.records:
        st.records["idle"] = idle.CutLossRecord()
    record = st.records["idle"]
    options = ctx.options
    form = options["form"]
    if form == "auto":
        form = "mask" if block.training else "gather"
    want_loss = options["cut_loss"] and form == "mask"
    candidates = None if options["reselect"] or record.selected is None else record.selected
    out = idle.idle_block(block, x, x.shape[1] - p - ctx.r, num_prefix_tokens=p, form=form, cut_loss=want_loss,
                          candidates=candidates, backend=options["backend"])
    record.computed |= want_loss
    if out.cut_loss is not None:
        record.losses[ctx.block_index] = out.cut_loss
    if out.selection is not None:
        record.selected = out.selection.keep
    return out.x, None, None


def register_builtin_methods() -> None:
    """Register ``"merge"``, ``"tome"``, ``"evit"``, ``"bat"`` and ``"idle"`` (once)."""
    if "merge" in available_methods():
        return
    register_method("merge", _merge_reducer, needs=_needs_with_keys(frozenset({"cls_attn"})),
                    defaults=MERGE_DEFAULTS, validate=_merge_validate, schedule=_merge_schedule,
                    block_r=_merge_block_r)
    register_method("tome", _tome_reducer, needs=_needs_with_keys(frozenset()), defaults=TOME_DEFAULTS,
                    validate=_tome_validate, max_r=_tome_max_r, schedule=_tome_schedule)
    register_method("evit", _evit_reducer, needs={"cls_attn"}, defaults=EVIT_DEFAULTS, validate=_evit_validate,
                    schedule=_layer_schedule("evit"), block_r=_layer_block_r("evit", _evit_output_tokens))
    register_method("bat", _bat_reducer, needs=_needs_with_keys(frozenset({"cls_attn"})), defaults=BAT_DEFAULTS,
                    validate=_bat_validate, schedule=_layer_schedule("bat"),
                    block_r=_layer_block_r("bat", _bat_output_tokens))
    register_method("idle", block_forward=_idle_block_forward, needs={"cls_attn_logits"}, defaults=IDLE_DEFAULTS,
                    validate=_idle_validate, block_r=_idle_block_r, removes_tokens=False)
