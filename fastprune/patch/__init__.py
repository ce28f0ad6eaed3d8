"""Drop-in token reduction inside timm ``VisionTransformer`` s and Hugging Face ViT-family models,
patched in place and revertible (:func:`timm`, :func:`transformers`; :func:`state`, :func:`revert`
for both).

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
* :mod:`fastprune.patch.hf` -- :func:`transformers`, the same for Hugging Face models;
* :mod:`fastprune.patch.methods` -- the built-in methods ``"merge"`` (MSTM), ``"tome"``, ``"evit"``,
  ``"bat"``, ``"idle"`` and their options, registered when this package is imported.
"""
from ..attention import NEEDS, AttentionOutput, attention_forward
from ..reference import MERGE_WEIGHTS
from ..schedules import MSTM_PAPER_KEEP_RATE, MSTM_PAPER_LAYERS, RSpec
from .methods import MERGE_SCHEDULES, METRICS as MERGE_METRICS, register_builtin_methods as _register_builtin_methods
from .registry import (_METHODS, COMMON_OPTIONS, BlockForward, BlockR, Method, Reducer, ReductionContext,
                       ScheduleContext, available_methods, register_method)
from . import hf, vit as _vit
from .hf import transformers
from .vit import (MIN_TIMM_VERSION, SUPPORTED_POOLS, PatchState, _PatchedBlock, _PatchedVisionTransformer,
                  reduction_schedule, timm)

__all__ = [
    "timm", "revert", "state", "is_patched", "reduction_schedule", "register_method", "available_methods",
    "attention_forward", "AttentionOutput", "ReductionContext", "ScheduleContext", "Method", "PatchState",
    "NEEDS", "COMMON_OPTIONS", "RSpec",
    "transformers", "hf",
]



def is_patched(model) -> bool:
    """True if ``model`` is patched by :func:`timm` or :func:`transformers`."""
    return _vit.is_patched(model) or hf.is_patched(model)


def state(model) -> PatchState:
    """The :class:`PatchState` of a model patched by :func:`timm` or :func:`transformers`.

    Raises ``ValueError`` if it is not patched."""
    return hf.state(model) if hf.is_patched(model) else _vit.state(model)


def revert(model):
    """Undo :func:`timm` or :func:`transformers`; return ``model``. Raises ``ValueError`` if not patched."""
    return hf.revert(model) if hf.is_patched(model) else _vit.revert(model)


_register_builtin_methods()
