"""timm drop-in: token reduction inside a timm ``VisionTransformer``, patched in place and revertible.

    import timm, fastprune.patch
    model = timm.create_model("deit_small_patch16_224", pretrained=True)
    fastprune.patch.timm(model, method="merge", r=13)   # MSTM merging, 13 tokens fewer per block
    logits = model(images)
    fastprune.patch.state(model).num_tokens             # tokens each block saw in that forward
    fastprune.patch.revert(model)                        # the original model again, bit for bit

A patched block runs ``x += drop_path1(ls1(attn(norm1(x))))`` (timm's attention with proportional
attention, :func:`fastprune.attention.attention_forward`), then the method's reducer when its ``r >
0``, then the MLP residual. Per-forward state is a :class:`PatchState` (:func:`state`).

* :mod:`fastprune.patch.registry` -- the method registry (:func:`register_method`);
* :mod:`fastprune.patch.vit` -- the patched classes, :func:`timm`, :func:`revert`, :func:`state`,
  :func:`reduction_schedule`;
* :mod:`fastprune.patch.methods` -- the built-in methods ``"merge"`` (MSTM), ``"tome"``, ``"evit"``,
  ``"bat"``, ``"idle"`` and their options, registered when this package is imported.
"""
from ..attention import NEEDS, AttentionOutput, attention_forward
from ..reference import MERGE_WEIGHTS
from ..schedules import MSTM_PAPER_KEEP_RATE, MSTM_PAPER_LAYERS, RSpec
from .methods import MERGE_SCHEDULES, METRICS as MERGE_METRICS, register_builtin_methods as _register_builtin_methods
from .registry import (_METHODS, COMMON_OPTIONS, BlockForward, BlockR, Method, Reducer, ReductionContext,
                       ScheduleContext, available_methods, register_method)
from . import hf
from .hf import transformers
from .vit import (MIN_TIMM_VERSION, SUPPORTED_POOLS, PatchState, _PatchedBlock, _PatchedVisionTransformer,
                  is_patched, reduction_schedule, revert, state, timm)

__all__ = [
    "timm", "revert", "state", "is_patched", "reduction_schedule", "register_method", "available_methods",
    "attention_forward", "AttentionOutput", "ReductionContext", "ScheduleContext", "Method", "PatchState",
    "NEEDS", "COMMON_OPTIONS", "RSpec",
    "transformers", "hf",
]

_register_builtin_methods()
