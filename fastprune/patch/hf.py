"""Hugging Face transformers drop-in: token reduction inside transformers' ViT-family vision models.

    from transformers import ViTForImageClassification
    import fastprune.patch
    model = ViTForImageClassification.from_pretrained("google/vit-base-patch16-224")
    fastprune.patch.transformers(model, method="tome", r=13)   # ToMe, 13 tokens fewer per layer
    logits = model(pixel_values).logits
    fastprune.patch.hf.state(model).num_tokens                 # tokens each layer saw in that forward
    fastprune.patch.hf.revert(model)                           # the original model again, bit for bit

The same methods, options and schedules as :func:`fastprune.patch.timm` (the registry of
:mod:`fastprune.patch.registry`; per-forward state is a :class:`~fastprune.patch.vit.PatchState`). Every
encoder layer's class is swapped for a thin subclass (and SigLIP's pooling head's, and the base model's
of a mean-pooling classifier); no parameter or buffer is touched. Written against
transformers 5.24 (``q_proj``/``k_proj``/``v_proj`` attention, ``config._attn_implementation``);
transformers is imported only when a model is patched.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace as _dc_replace
from typing import Optional

import torch
import torch.nn as nn

from .. import schedules
from ..attention import AttentionOutput, cls_attention, proportional_attention, received_attention
from ..functional import unmerge
from ..schedules import RSpec
from .registry import ScheduleContext, attention_needs, block_r, get_method, resolve_options, run_reducer
from .vit import PatchState, enter_block, patched_class  # shared with the timm patch

__all__ = ["transformers", "revert", "state", "is_patched", "reduction_schedule", "HFPatchState",
           "SUPPORTED_MODELS", "MASK_IMPLEMENTATIONS"]

#: ``config._attn_implementation`` values whose attention function takes an additive float mask: the
#: ``log size`` bias goes in as ``attention_mask``. Any other (``flash_attention_2``, ``flex_attention``,
#: ...) runs as it is while sizes are all one, and falls back to SDPA with the bias
#: (:func:`fastprune.attention.proportional_attention`) in the layers where they are not.
MASK_IMPLEMENTATIONS = ("eager", "sdpa")


@dataclass(frozen=True)
class _Layout:
    """Attribute names of one family of transformers encoder layers and their attention."""

    norm1: str
    attn: str
    norm2: str
    mlp: str
    post_attn: tuple  # applied in order to the attention output before the residual add
    post_mlp: tuple
    out_proj: str
    scale: str
    dropout: str


_VIT = _Layout("layernorm_before", "attention", "layernorm_after", "mlp", ("dropout",), ("dropout",),
               "o_proj", "scaling", "attention_dropout")
_DINOV2 = _Layout("norm1", "attention", "norm2", "mlp", ("layer_scale1", "drop_path"), ("layer_scale2", "drop_path"),
                  "o_proj", "scaling", "attention_dropout")
_CLIP = _Layout("layer_norm1", "self_attn", "layer_norm2", "mlp", (), (), "out_proj", "scale", "dropout")

#: base model class -> (attribute path of its layer list, layout, prefix tokens from its config)
_BASES = {
    "ViTModel": ("layers", _VIT, lambda c: 1),
    "DeiTModel": ("layers", _VIT, lambda c: 2),  # class and distillation token
    "Dinov2Model": ("encoder.layer", _DINOV2, lambda c: 1),
    "Dinov2WithRegistersModel": ("encoder.layer", _DINOV2, lambda c: 1 + c.num_register_tokens),
    "CLIPVisionModel": ("encoder.layers", _CLIP, lambda c: 1),
    "SiglipVisionModel": ("encoder.layers", _CLIP, lambda c: 0),  # no class token; attention-pooling head
}
#: wrapper class -> attribute holding its base model (heads that read prefix tokens or the pooled output only)
_WRAPPERS = {
    "ViTForImageClassification": "vit", "DeiTForImageClassification": "deit",
    "DeiTForImageClassificationWithTeacher": "deit", "CLIPVisionModelWithProjection": "vision_model",
    "CLIPModel": "vision_model", "SiglipModel": "vision_model",
}
#: wrapper class -> attribute holding its base model, for heads that mean-pool the last hidden state: the
#: base model's ``last_hidden_state`` comes back on the full token grid (:func:`fastprune.unmerge`), so
#: that plain mean over positions is the size-weighted mean over the reduced tokens
_GRID_WRAPPERS = {
    "Dinov2ForImageClassification": "dinov2", "Dinov2WithRegistersForImageClassification": "dinov2_with_registers",
    "CLIPForImageClassification": "vision_model", "SiglipForImageClassification": "vision_model",
}
#: The model classes :func:`transformers` accepts (where the installed transformers has them).
SUPPORTED_MODELS = tuple(_BASES) + tuple(_WRAPPERS) + tuple(_GRID_WRAPPERS)


def _hf():
    try:
        import transformers as hf_lib
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("fastprune.patch.transformers needs the transformers package "
                          "(pip install 'fastprune[hf]' or 'transformers>=5.24,<5.25')") from e
    return hf_lib


def _classes(names) -> dict:
    hf_lib = _hf()
    return {name: cls for name in names if (cls := getattr(hf_lib, name, None)) is not None}


@dataclass(eq=False)
class HFPatchState(PatchState):
    """:class:`~fastprune.patch.vit.PatchState` of a patched transformers model (``model._fastprune``).

    Besides the timm state: ``layers`` (the patched layer modules), ``head`` (SigLIP's attention-pooling
    head, or None) and the classes they had."""

    layers: list = field(default_factory=list, repr=False)
    grid_base: Optional[nn.Module] = field(default=None, repr=False)  # base model whose output is unmerged
    original_grid_class: Optional[type] = None
    views: list = field(default_factory=list, repr=False)  # a _TimmBlockView per layer, for block forwards
    head: Optional[nn.Module] = field(default=None, repr=False)
    original_head_class: Optional[type] = None

    def record(self, method: str):
        """The record ``method`` keeps of the last forward (``model.fastprune_record``, as for timm)."""
        if self.method.name != method:
            raise ValueError(f"model is patched with method {self.method.name!r}, not {method!r}")
        return self.records.get(method)


def _attention(attn: nn.Module, layout: _Layout, h: torch.Tensor, size: Optional[torch.Tensor],
               need: frozenset, prop_attn_impl: str) -> AttentionOutput:
    """The layer's self-attention on normalised tokens ``h [B, N, C]``, with ``+log size_j`` on every key.

    q, k, v come from the module's own projections; the attention runs through the model's attention
    function (``config._attn_implementation``) with the bias as its additive ``attention_mask`` when that
    function takes one (:data:`MASK_IMPLEMENTATIONS`) and ``prop_attn_impl`` is ``"auto"``, otherwise through
    :func:`fastprune.attention.proportional_attention` (SDPA) with ``impl=prop_attn_impl``."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    B, N, _ = h.shape
    shape = (B, N, -1, attn.head_dim)
    q = attn.q_proj(h).view(shape).transpose(1, 2)
    k = attn.k_proj(h).view(shape).transpose(1, 2)
    v = attn.v_proj(h).view(shape).transpose(1, 2)
    scale = float(getattr(attn, layout.scale))
    dropout = float(getattr(attn, layout.dropout)) if attn.training else 0.0
    impl = attn.config._attn_implementation
    if size is None or (impl in MASK_IMPLEMENTATIONS and prop_attn_impl == "auto"):
        mask = None if size is None else size.float().log().to(q.dtype)[:, None, None, :]
        eager = sys.modules[type(attn).__module__].eager_attention_forward  # the model's own eager attention
        interface = ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager)
        out, _ = interface(attn, q, k, v, mask, dropout=dropout, scaling=scale)  # [B, N, H, d]
    else:
        out = proportional_attention(q, k, v, size, scale=scale, dropout_p=dropout, impl=prop_attn_impl).transpose(1, 2)
    out = getattr(attn, layout.out_proj)(out.reshape(B, N, -1).contiguous())
    return AttentionOutput(
        x=out,
        cls_attn=cls_attention(q[:, :, :1], k, scale=scale, size=size) if "cls_attn" in need else None,
        cls_attn_logits=(cls_attention(q[:, :, :1], k, scale=scale, size=size, form="logit")
                         if "cls_attn_logits" in need else None),
        keys=k.mean(dim=1) if "keys" in need else None,
        received_attn=received_attention(q, k, scale=scale, size=size) if "received_attn" in need else None,
    )


def _apply(layer: nn.Module, names: tuple, x: torch.Tensor) -> torch.Tensor:
    for name in names:
        x = getattr(layer, name)(x)
    return x


class _FusedQKV(nn.Module):
    """The layer's three projections as timm's fused ``qkv``: ``[B, N, 3 C]``, ``weight``/``bias``
    concatenated (what IdleViT's class-query fold reads)."""

    def __init__(self, attn: nn.Module):
        super().__init__()
        self.projs = nn.ModuleList([attn.q_proj, attn.k_proj, attn.v_proj])
        self.in_features = attn.q_proj.in_features

    @property
    def weight(self) -> torch.Tensor:
        return torch.cat([proj.weight for proj in self.projs])

    @property
    def bias(self) -> Optional[torch.Tensor]:
        biases = [proj.bias for proj in self.projs]
        return None if any(b is None for b in biases) else torch.cat(biases)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([proj(x) for proj in self.projs], dim=-1)


class _TimmAttentionView(nn.Module):
    """A transformers attention seen as a ``timm.layers.Attention`` (no q/k norm); calling it runs
    :func:`_attention` (the model's own attention function)."""

    def __init__(self, attn: nn.Module, layout: _Layout):
        super().__init__()
        self.hf, self.layout = attn, layout
        self.qkv = _FusedQKV(attn)
        self.head_dim = attn.head_dim
        self.num_heads = attn.q_proj.out_features // attn.head_dim
        self.scale = float(getattr(attn, layout.scale))
        self.q_norm, self.k_norm, self.norm, self.proj_drop = nn.Identity(), nn.Identity(), nn.Identity(), nn.Identity()
        self.attn_drop = nn.Dropout(float(getattr(attn, layout.dropout)))
        self.proj = getattr(attn, layout.out_proj)
        self.fused_attn = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _attention(self.hf, self.layout, x, None, frozenset(), "auto").x


class _TimmBlockView(nn.Module):
    """A transformers encoder layer seen as a timm pre-norm ``Block`` (``ls1``/``ls2``: the layer's
    LayerScale and dropout or drop path), so that a method's block forward written for timm (IdleViT's
    :func:`fastprune.idle.idle_block`) runs on it unchanged. Shares the layer's modules; is not part of
    the model (no parameter of its own)."""

    def __init__(self, layer: nn.Module, layout: _Layout):
        super().__init__()
        self.norm1, self.norm2 = getattr(layer, layout.norm1), getattr(layer, layout.norm2)
        self.attn = _TimmAttentionView(getattr(layer, layout.attn), layout)
        self.mlp = getattr(layer, layout.mlp)
        self.ls1 = nn.Sequential(*[getattr(layer, n) for n in layout.post_attn])
        self.ls2 = nn.Sequential(*[getattr(layer, n) for n in layout.post_mlp])
        self.drop_path1, self.drop_path2 = nn.Identity(), nn.Identity()


def _layer_forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                   *args, **kwargs) -> torch.Tensor:
    """A patched encoder layer: attention residual, the method's reducer when ``r > 0``, MLP residual."""
    st: HFPatchState = self._fastprune
    i: int = self._fastprune_block_index
    layout: _Layout = self._fastprune_layout
    if attention_mask is not None:
        raise NotImplementedError("a model patched by fastprune does not support attention_mask (token "
                                  "reduction changes the token count the mask refers to)")
    if kwargs.get("output_attentions"):
        raise NotImplementedError("a model patched by fastprune does not return attention maps "
                                  "(output_attentions): its attention runs without forming them")
    if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
        raise NotImplementedError("a model patched by fastprune does not support gradient checkpointing (the "
                                  "recomputed forward would record the token reduction twice)")
    x = hidden_states
    if i == 0:
        st.reset()
    ctx = enter_block(st, self, i, x)
    method, r = st.method, ctx.r
    if method.block_forward is not None:  # e.g. IdleViT: on the timm view of this layer
        view = st.views[i].train(self.training)
        x, size_out, index = method.block_forward(view, x, _dc_replace(ctx, block=view))
        st._record(i, r, x, size_out, index)
        return x
    need, stand_in = attention_needs(method, ctx, st.class_token)
    out = _attention(getattr(self, layout.attn), layout, getattr(self, layout.norm1)(x), ctx.attn_size, need,
                     st.options["prop_attn_impl"])
    x = x + _apply(self, layout.post_attn, out.x)
    size_out, index = None, None
    if r > 0:
        x, size_out, index = run_reducer(method, x, ctx, out, stand_in)
    x = x + _apply(self, layout.post_mlp, getattr(self, layout.mlp)(getattr(self, layout.norm2)(x)))
    st._record(i, r, x, size_out, index)
    return x


class _PatchedLayer:
    """Mixin put in front of a transformers encoder layer class: the reducing layer forward."""

    forward = _layer_forward


class _PatchedPoolingHead:
    """Mixin put in front of SigLIP's ``SiglipMultiheadAttentionPoolingHead``: the probe's attention takes
    the ``log size`` bias of the final tokens (size-weighted attention pooling), whatever ``prop_attn``."""

    def forward(self, hidden_state: torch.Tensor) -> torch.Tensor:
        st: HFPatchState = self._fastprune
        last = st._last() if any(index is not None for index in st._indices) else None
        size = None if last is None else st._sizes[last]
        if size is None or size.shape != hidden_state.shape[:2]:
            return super().forward(hidden_state)  # nothing merged (or not this forward's tokens)
        B, heads = hidden_state.shape[0], self.attention.num_heads
        probe = self.probe.repeat(B, 1, 1)
        bias = size.float().log().to(hidden_state.dtype)[:, None, :].repeat_interleave(heads, dim=0)  # [B*H, 1, N]
        hidden_state = self.attention(probe, hidden_state, hidden_state, attn_mask=bias)[0]
        residual = hidden_state
        hidden_state = residual + self.mlp(self.layernorm(hidden_state))
        return hidden_state[:, 0]


class _PatchedGridOutput:
    """Mixin put in front of the base model of a mean-pooling classification model: ``last_hidden_state``
    on the full token grid, every position holding the token it went into (:func:`fastprune.unmerge`)."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        index = self._fastprune_grid.index
        if isinstance(out, tuple):
            return (unmerge(out[0], index),) + tuple(out[1:])
        out.last_hidden_state = unmerge(out.last_hidden_state, index)
        return out


@dataclass(frozen=True)
class _Found:
    base: nn.Module
    layers: nn.ModuleList
    layout: _Layout
    num_prefix_tokens: int
    grid_output: bool


def _find(model: nn.Module) -> _Found:
    """The base model, its layers, their layout and ``p`` of a supported model; errors name what is not."""
    base, grid = model, False
    for wrappers in (_WRAPPERS, _GRID_WRAPPERS):
        for name, cls in _classes(wrappers).items():
            if isinstance(model, cls):
                base, grid = getattr(model, wrappers[name]), wrappers is _GRID_WRAPPERS
    for name, cls in _classes(_BASES).items():
        if isinstance(base, cls):
            path, layout, prefix = _BASES[name]
            break
    else:
        raise TypeError(f"{type(model).__name__} is not supported by fastprune.patch.transformers; supported: "
                        f"{', '.join(SUPPORTED_MODELS)} (not the masked-image-modeling or backbone classes: they "
                        "reshape the tokens back to the patch grid)")
    layers = base
    for attr in path.split("."):
        layers = getattr(layers, attr)
    for i, layer in enumerate(layers):
        missing = [n for n in (layout.norm1, layout.attn, layout.norm2, layout.mlp) + layout.post_attn
                   + layout.post_mlp if not hasattr(layer, n)]
        attn = getattr(layer, layout.attn, None)
        missing += [f"{layout.attn}.{n}" for n in ("q_proj", "k_proj", "v_proj", "head_dim", "config", layout.out_proj,
                                                   layout.scale, layout.dropout) if not hasattr(attn, n)]
        if missing:
            raise ValueError(f"layer {i} ({type(layer).__name__}) has no {missing}: this transformers "
                             f"({_hf().__version__}) lays out {type(base).__name__} differently from the 5.24 "
                             "layout fastprune follows")
        if not hasattr(sys.modules[type(attn).__module__], "eager_attention_forward"):
            raise ValueError(f"{type(attn).__module__} has no eager_attention_forward (transformers layout changed)")
    return _Found(base, layers, layout, int(prefix(base.config)), grid)


def _num_patches(config) -> int:
    pair = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v)  # noqa: E731
    (h, w), (ph, pw) = pair(config.image_size), pair(config.patch_size)
    return (h // ph) * (w // pw)


def is_patched(model: nn.Module) -> bool:
    """True if ``model`` is currently patched by :func:`transformers`."""
    return isinstance(getattr(model, "_fastprune", None), HFPatchState)


def state(model: nn.Module) -> HFPatchState:
    """The :class:`HFPatchState` of a patched model (configuration and last forward's sizes, position map
    and token counts, as for timm). Raises ``ValueError`` if the model is not patched."""
    if not is_patched(model):
        raise ValueError("model is not patched by fastprune.patch.transformers")
    return model._fastprune


def reduction_schedule(model: nn.Module, num_tokens: Optional[int] = None) -> list:
    """The tokens each layer of a patched model removes (leaves idle, ``removes_tokens=False``),
    ``[r_0, ..., r_{depth-1}]``, as :attr:`PatchState.r_applied` records them; ``num_tokens`` (patches +
    prefix tokens entering layer 0) defaults to the config's image size."""
    st = state(model)
    p = st.num_prefix_tokens
    n0 = _num_patches(_find(model).base.config) + p if num_tokens is None else int(num_tokens)
    out, n = [], n0
    for i in range(st.depth):
        out.append(block_r(st.method, ScheduleContext(r=st.r, block_index=i, depth=st.depth, num_tokens=n,
                                                        num_patches=n0 - p, num_prefix_tokens=p, options=st.options)))
        n -= out[-1] if st.method.removes_tokens else 0
    return out


def transformers(model: nn.Module, method: Optional[str] = None, r: Optional[RSpec] = None,
                 **options) -> nn.Module:
    """Patch a transformers ViT-family vision model in place for token reduction; return the same model.

    Supported: ``ViTModel``, ``ViTForImageClassification``, ``DeiTModel``, ``DeiTForImageClassification``
    (``WithTeacher``), ``Dinov2Model`` (LayerScale), ``Dinov2WithRegistersModel``, ``CLIPVisionModel``
    (``WithProjection``, and ``CLIPModel``'s vision tower), ``SiglipVisionModel`` (and ``SiglipModel``'s
    vision tower), and the heads that mean-pool the tokens (``Dinov2ForImageClassification`` and its
    registers variant, ``CLIPForImageClassification``, ``SiglipForImageClassification``): for them the
    base model's ``last_hidden_state`` comes back on the full token grid (:func:`fastprune.unmerge`), so
    the head's mean is size-weighted. Prefix tokens: class (+ distillation for DeiT, + registers for
    DINOv2). On SigLIP (no class token) ``"merge"``, ``"evit"`` and ``"bat"`` rank by the attention each
    token receives (:func:`fastprune.attention.received_attention`), as in the timm patch. Refused with
    an error that says why: masked-image-modeling and backbone classes, ``"idle"`` on SigLIP (it ranks
    by class-token logits); at forward time ``attention_mask`` inputs, ``output_attentions`` and
    gradient checkpointing.

    Methods, ``r`` and options are exactly those of :func:`fastprune.patch.timm` (``timm(model)``'s
    recommended setting aside: ``method`` defaults to ``"merge"``, ``r`` to 0). Each layer runs its
    attention residual (the model's own ``q/k/v`` projections and attention function, with proportional
    attention's ``log size`` bias), the method's reducer when the layer's ``r > 0``, then its MLP residual
    (LayerScale and drop path as the layer has them). A method with its own block forward (``"idle"``)
    runs it on a timm view of the layer (:class:`_TimmBlockView`): IdleViT's gather form (eval) attends
    through the model's own attention function, its mask form (training) through
    :func:`fastprune.attention.attention_forward`; :func:`fastprune.idle.cut_loss` reads the model.

    Attention implementations (``config._attn_implementation``): ``"sdpa"`` and ``"eager"`` take the
    bias as their additive ``attention_mask`` (``prop_attn_impl="auto"``; another ``prop_attn_impl``
    runs :func:`fastprune.attention.proportional_attention` instead). ``"flash_attention_2"`` and the
    other implementations cannot take a bias: they run unchanged while all sizes are one (and always
    with ``prop_attn=False``), and layers with merged tokens fall back to SDPA with the bias
    (:func:`~fastprune.attention.proportional_attention`). SigLIP's attention-pooling head attends with
    the same bias (size-weighted pooling). Patching a patched model re-configures it.

    Raises:
        TypeError: unsupported model class; ``method``/``r``/option of the wrong type; unknown option.
        ValueError: refused model or method (see above); unknown method; ``r`` out of range; bad options.
        ImportError: transformers is not installed.
    """
    found = _find(model)
    m = get_method("merge" if method is None else method)
    depth = len(found.layers)
    r = schedules.check_r(0 if r is None else r, depth)
    resolved = resolve_options(m, options)
    if m.schedule is not None:  # the method's own schedule forms (e.g. ToMe's "decreasing")
        r = schedules.check_r(m.schedule(r, depth, resolved), depth)
    class_token = found.num_prefix_tokens > 0  # every supported model with prefix tokens has a class token
    if "cls_attn_logits" in m.needs_for(resolved) and not class_token:
        raise ValueError(f"method {m.name!r} ranks tokens by the class token's attention logits, and "
                         f"{type(found.base).__name__} has no class token")

    if is_patched(model):  # re-configure
        st = model._fastprune
        st.method, st.r, st.options, st.class_token = m, r, resolved, class_token
        st.reset()
        return model
    for i, layer in enumerate(found.layers):
        if hasattr(layer, "_fastprune"):
            raise ValueError(f"layer {i} is already patched by fastprune (as part of another model): revert that first")

    st = HFPatchState(method=m, r=r, options=resolved, num_prefix_tokens=found.num_prefix_tokens, depth=depth,
                      original_model_class=type(model), class_token=class_token)
    st.reset()
    for i, layer in enumerate(found.layers):
        st.layers.append(layer)
        st.original_block_classes.append(type(layer))
        layer.__class__ = patched_class(type(layer), _PatchedLayer)
        layer._fastprune, layer._fastprune_block_index, layer._fastprune_layout = st, i, found.layout
        st.views.append(_TimmBlockView(layer, found.layout))
    head = getattr(found.base, "head", None) if getattr(found.base, "use_head", False) else None
    if head is not None:
        st.head, st.original_head_class = head, type(head)
        head.__class__ = patched_class(type(head), _PatchedPoolingHead)
        head._fastprune = st
    if found.grid_output:
        st.grid_base, st.original_grid_class = found.base, type(found.base)
        found.base.__class__ = patched_class(type(found.base), _PatchedGridOutput)
        found.base._fastprune_grid = st
    model._fastprune = st
    model.fastprune_record = st.record  # what fastprune.idle.cut_loss(model) reads
    return model


def revert(model: nn.Module) -> nn.Module:
    """Undo :func:`transformers`: restore the original classes and remove fastprune's state; return
    ``model``. Reverting a model that is not patched raises ``ValueError``."""
    st = state(model)
    for layer, cls in zip(st.layers, st.original_block_classes):
        layer.__class__ = cls
        del layer._fastprune, layer._fastprune_block_index, layer._fastprune_layout
    if st.head is not None:
        st.head.__class__ = st.original_head_class
        del st.head._fastprune
    if st.grid_base is not None:
        st.grid_base.__class__ = st.original_grid_class
        del st.grid_base._fastprune_grid
    del model._fastprune, model.fastprune_record
    return model
