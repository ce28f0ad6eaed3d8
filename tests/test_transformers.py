"""fastprune.patch.transformers: Hugging Face ViT-family models, each built from a small random config
(no download, no network), against the unpatched model, the schedule, the timm patch and revert."""
import copy
import functools

import pytest
import torch
import torch.nn as nn

transformers = pytest.importorskip("transformers")

import fastprune.patch  # noqa: E402
from fastprune.patch import hf  # noqa: E402

IMAGE, PATCH, DEPTH = 32, 4, 4  # 64 patches, 4 layers
COMMON = dict(hidden_size=32, num_hidden_layers=DEPTH, num_attention_heads=2, image_size=IMAGE, patch_size=PATCH)
#: the methods that apply to a model with a class token, with an r and options that reduce in every case
METHODS = {"tome": (4, {}), "merge": (4, {}), "evit": (0.7, {"layers": (1, 2)}), "bat": (0.7, {"layers": (1, 2)})}


def _build(name: str, attn_implementation: str = "sdpa") -> nn.Module:
    t = transformers
    kw = dict(COMMON, attn_implementation=attn_implementation)
    models = {
        "vit": lambda: t.ViTModel(t.ViTConfig(intermediate_size=64, layer_norm_eps=1e-6, **kw)),
        "vit_cls": lambda: t.ViTForImageClassification(t.ViTConfig(intermediate_size=64, num_labels=5, **kw)),
        "deit": lambda: t.DeiTModel(t.DeiTConfig(intermediate_size=64, layer_norm_eps=1e-6, **kw)),
        "deit_teacher": lambda: t.DeiTForImageClassificationWithTeacher(
            t.DeiTConfig(intermediate_size=64, num_labels=5, **kw)),
        "dinov2": lambda: t.Dinov2Model(t.Dinov2Config(mlp_ratio=2, layerscale_value=0.5, **kw)),
        "dinov2_reg": lambda: t.Dinov2WithRegistersModel(
            t.Dinov2WithRegistersConfig(mlp_ratio=2, layerscale_value=0.5, num_register_tokens=2, **kw)),
        "clip": lambda: t.CLIPVisionModel(t.CLIPVisionConfig(intermediate_size=64, **kw)),
        "siglip": lambda: t.SiglipVisionModel(t.SiglipVisionConfig(intermediate_size=64, **kw)),
        # heads that mean-pool the tokens
        "dinov2_cls": lambda: t.Dinov2ForImageClassification(t.Dinov2Config(mlp_ratio=2, num_labels=5, **kw)),
        "dinov2_reg_cls": lambda: t.Dinov2WithRegistersForImageClassification(
            t.Dinov2WithRegistersConfig(mlp_ratio=2, num_register_tokens=2, num_labels=5, **kw)),
        "clip_cls": lambda: t.CLIPForImageClassification(
            t.CLIPConfig(vision_config=dict(kw, intermediate_size=64), num_labels=5)),
        "siglip_cls": lambda: t.SiglipForImageClassification(
            t.SiglipConfig(vision_config=dict(kw, intermediate_size=64), num_labels=5)),
    }
    torch.manual_seed(0)
    model = models[name]().eval()
    with torch.no_grad():  # random, not near-zero, positions and special tokens: matching has real choices
        for pname, param in model.named_parameters():
            if any(k in pname for k in ("position", "cls_token", "distillation", "register", "class_embedding")):
                param.normal_()
    return model


PREFIX = {"vit": 1, "vit_cls": 1, "deit": 2, "deit_teacher": 2, "dinov2": 1, "dinov2_reg": 3, "clip": 1, "siglip": 0}
MODELS = tuple(PREFIX)
#: mean-pooling classification models: their base model's attribute and ``p``
GRID_MODELS = {"dinov2_cls": ("dinov2", 1), "dinov2_reg_cls": ("dinov2_with_registers", 3),
               "clip_cls": ("vision_model", 1), "siglip_cls": ("vision_model", 0)}


#: every method that applies, IdleViT included (it idles tokens instead of removing them)
ALL_METHODS = dict(METHODS, idle=(0.5, {}))


def _cases(methods=METHODS):
    for name in MODELS:
        for method in methods:
            if PREFIX[name] or method != "idle":  # no class token: "idle" is refused, the others rank by
                yield name, method                  # the attention each token receives


def _images(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))


def _outputs(model: nn.Module, x: torch.Tensor) -> list:
    out = model(x)
    return [v for v in (getattr(out, k, None) for k in ("last_hidden_state", "pooler_output", "logits",
                                                        "cls_logits", "distillation_logits")) if v is not None]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", MODELS + tuple(GRID_MODELS))
def test_r0_equals_unpatched(name, attn):
    model = _build(name, attn)
    x = _images()
    p = PREFIX[name] if name in PREFIX else GRID_MODELS[name][1]
    with torch.no_grad():
        ref = _outputs(model, x)
        for method in ("tome", "merge") if p else ("tome",):
            fastprune.patch.transformers(model, method=method, r=0)
            for a, b in zip(_outputs(model, x), ref, strict=True):
                torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
            assert hf.state(model).num_tokens == [IMAGE ** 2 // PATCH ** 2 + p] * DEPTH


@pytest.mark.parametrize("name", GRID_MODELS)
def test_mean_pooling_heads_are_size_weighted(name):
    """The head's plain mean over the full grid is the size-weighted mean over the reduced tokens."""
    model = _build(name)
    attr, p = GRID_MODELS[name]
    plain = copy.deepcopy(getattr(model, attr))
    x = _images()
    method = "merge" if p else "tome"
    fastprune.patch.transformers(model, method=method, r=4)
    fastprune.patch.transformers(plain, method=method, r=4)
    with torch.no_grad():
        logits = model(x).logits
        seq, size = plain(x).last_hidden_state, hf.state(plain).size
        assert seq.shape[1] == 64 + p - 4 * DEPTH and torch.equal(hf.state(model).size, size)
        w = size[:, p:, None]
        pooled = (seq[:, p:] * w).sum(dim=1) / w.sum(dim=1)
        if "dinov2" in name:
            pooled = torch.cat([seq[:, 0], pooled], dim=1)
        torch.testing.assert_close(logits, model.classifier(pooled), atol=1e-5, rtol=1e-5)
        base_out = getattr(model, attr)(x).last_hidden_state  # the base model's output on the full grid
        torch.testing.assert_close(base_out, fastprune.unmerge(seq, hf.state(model).index), atol=0, rtol=0)
    model(x).logits.pow(2).mean().backward()  # gradients flow through the grid
    grads = [p.grad for n, p in model.named_parameters() if "patch_embedding" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    hf.revert(model)
    assert type(getattr(model, attr)) is type(plain) and not hasattr(getattr(model, attr), "_fastprune_grid")


@pytest.mark.parametrize("name,method", list(_cases()))
def test_token_counts_follow_schedule(name, method):
    model = _build(name)
    r, options = METHODS[method]
    fastprune.patch.transformers(model, method=method, r=r, **options)
    with torch.no_grad():
        out = model(_images(), output_hidden_states=True)
    st = hf.state(model)
    schedule = hf.reduction_schedule(model)
    n0 = IMAGE ** 2 // PATCH ** 2 + PREFIX[name]
    assert st.r_applied == schedule and sum(schedule) > 0
    assert st.num_tokens == [n0 - sum(schedule[:i]) for i in range(DEPTH)]
    assert [h.shape[1] for h in out.hidden_states] == st.num_tokens + [n0 - sum(schedule)]  # the model's own record
    assert st.size.shape[1] == n0 - sum(schedule)
    assert torch.equal(st.size.sum(dim=1), torch.full((2,), float(n0)))  # every token accounted for
    if method == "tome":
        assert schedule == [4] * DEPTH
    if method == "evit":  # a keep rate at layers 1 and 2: p + ceil(0.7 (N - p)) + 1 tokens after them
        p = PREFIX[name]
        after1 = p + -(-7 * (n0 - p) // 10) + 1
        assert st.num_tokens[2] == after1 and schedule[0] == 0 == schedule[3]


@pytest.mark.parametrize("name,method", list(_cases(ALL_METHODS)))
def test_reduced_forward_backward(name, method):
    model = _build(name).train()
    r, options = ALL_METHODS[method]
    fastprune.patch.transformers(model, method=method, r=r, **options)
    x = _images().requires_grad_()
    loss = sum(v.float().pow(2).mean() for v in _outputs(model, x))
    loss.backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for pname, param in model.named_parameters():
        if param.requires_grad and "layers.0." in pname.replace("layer.0.", "layers.0.") and "q_proj.weight" in pname:
            assert param.grad is not None and param.grad.abs().sum() > 0, pname
    assert sum(hf.state(model).r_applied) > 0


@pytest.mark.parametrize("name", ["vit", "dinov2_reg", "siglip"])
def test_revert_restores_bit_for_bit(name):
    model = _build(name)
    x = _images()
    classes = [type(m) for m in model.modules()]
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = _outputs(model, x)
        fastprune.patch.transformers(model, method="tome", r=6)
        reduced = _outputs(model, x)
        assert reduced[0].shape[1] < ref[0].shape[1]
        assert hf.revert(model) is model
        for a, b in zip(_outputs(model, x), ref, strict=True):
            assert torch.equal(a, b)
    assert [type(m) for m in model.modules()] == classes
    assert not any(hasattr(m, "_fastprune") for m in model.modules()) and not hf.is_patched(model)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="not patched"):
        hf.revert(model)


def test_eager_sdpa_and_fallback_attention_agree():
    """Proportional attention through eager's and SDPA's additive mask, and through fastprune's own
    proportional_attention (the path of flash-attention-2 and of an explicit prop_attn_impl)."""
    x = _images()
    outs = []
    for attn, impl in (("sdpa", "auto"), ("eager", "auto"), ("sdpa", "column"), ("sdpa", "explicit")):
        model = _build("vit", attn)
        fastprune.patch.transformers(model, method="tome", r=6, prop_attn_impl=impl)
        with torch.no_grad():
            outs.append(model(x).last_hidden_state)
    for other in outs[1:]:
        torch.testing.assert_close(other, outs[0], atol=2e-5, rtol=1e-5)


def test_maskless_attention_falls_back_to_sdpa_with_the_bias():
    """An attention function that cannot take the bias (as flash-attention-2) runs while sizes are one,
    fastprune's SDPA with the bias where they are not; the outputs are those of the SDPA model."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    calls = []

    def no_mask(module, q, k, v, attention_mask, **kwargs):
        assert attention_mask is None
        calls.append(q.shape[2])
        return sdpa_attention_forward(module, q, k, v, None, **kwargs)

    transformers.AttentionInterface.register("fastprune_test_no_mask", no_mask)
    x = _images()
    for prop_attn, expect in ((True, [65]), (False, [65, 61, 57, 53])):
        calls.clear()
        ref = fastprune.patch.transformers(_build("vit"), method="tome", r=4, prop_attn=prop_attn)
        model = fastprune.patch.transformers(_build("vit", "fastprune_test_no_mask"), method="tome", r=4,
                                             prop_attn=prop_attn)
        with torch.no_grad():
            torch.testing.assert_close(model(x).last_hidden_state, ref(x).last_hidden_state, atol=2e-5, rtol=1e-5)
        assert calls == expect


def test_siglip_attention_pooling_is_size_weighted():
    """The pool's attention over merged tokens with sizes equals it over the tokens repeated size times."""
    model = _build("siglip")
    fastprune.patch.transformers(model, method="tome", r=6)
    with torch.no_grad():
        out = model(_images())
        size = hf.state(model).size
        assert torch.equal(size, size.round()) and size.max() > 1
        tokens = out.last_hidden_state  # post-layernorm, what the head reads
        expanded = torch.stack([t.repeat_interleave(s.long(), dim=0) for t, s in zip(tokens, size)])
        head_cls = hf.state(model).original_head_class
        torch.testing.assert_close(out.pooler_output, head_cls.forward(model.head, expanded), atol=1e-5, rtol=1e-5)


def test_wrappers_patch_their_vision_tower():
    t = transformers
    cfg = t.CLIPConfig(vision_config=dict(COMMON, intermediate_size=64),
                       text_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                        intermediate_size=64, vocab_size=99))
    torch.manual_seed(0)
    model = t.CLIPModel(cfg).eval()
    x, ids = _images(), torch.randint(0, 99, (2, 7))
    with torch.no_grad():
        ref = model(input_ids=ids, pixel_values=x)
        fastprune.patch.transformers(model, method="merge", r=4)
        out = model(input_ids=ids, pixel_values=x)
    assert hf.state(model).num_tokens == [65, 61, 57, 53]
    torch.testing.assert_close(out.text_embeds, ref.text_embeds, atol=0, rtol=0)  # the text tower is untouched
    assert out.image_embeds.shape == ref.image_embeds.shape
    with pytest.raises(ValueError, match="already patched"):
        fastprune.patch.transformers(model.vision_model, method="tome", r=2)

    torch.manual_seed(0)
    text = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=99)
    siglip = t.SiglipModel(t.SiglipConfig(vision_config=dict(COMMON, intermediate_size=64), text_config=text)).eval()
    fastprune.patch.transformers(siglip, method="tome", r=4)
    with torch.no_grad():
        assert siglip.get_image_features(x).pooler_output.shape == (2, 32)
    assert hf.state(siglip).num_tokens == [64, 60, 56, 52] and hf.state(siglip).head is siglip.vision_model.head

    clip = t.CLIPVisionModelWithProjection(t.CLIPVisionConfig(intermediate_size=64, projection_dim=8, **COMMON))
    fastprune.patch.transformers(clip.eval(), method="evit", r=0.5, layers=(1,))
    with torch.no_grad():
        assert clip(x).image_embeds.shape == (2, 8)
    assert hf.state(clip).num_tokens == [65, 65, 34, 34]


def test_reconfigure():
    model = _build("vit_cls")
    fastprune.patch.transformers(model, method="tome", r=4)
    fastprune.patch.transformers(model, method="evit", r=0.5, layers=(1,))
    with torch.no_grad():
        model(_images())
    st = hf.state(model)
    assert st.method.name == "evit" and st.r_applied == [0, 31, 0, 0]


def test_deepcopy_has_its_own_state():
    model = fastprune.patch.transformers(_build("dinov2"), method="idle", r=0.5)
    twin = copy.deepcopy(model)
    x = _images()
    with torch.no_grad():
        assert torch.equal(twin(x).last_hidden_state, model(x).last_hidden_state)
    st = hf.state(twin)
    assert st is not hf.state(model) and st.layers[0] is twin.encoder.layer[0]
    assert st.views[0].norm1 is twin.encoder.layer[0].norm1 and twin.fastprune_record.__self__ is st
    hf.revert(twin)
    assert hf.is_patched(model) and not hf.is_patched(twin)


def test_refused_with_clear_errors():
    t = transformers
    with pytest.raises(ValueError, match="class token"):
        fastprune.patch.transformers(_build("siglip"), method="idle", r=0.5)
    with pytest.raises(TypeError, match="Dinov2Backbone is not supported"):
        fastprune.patch.transformers(t.Dinov2Backbone(t.Dinov2Config(mlp_ratio=2, **COMMON)))
    with pytest.raises(TypeError, match="ViTForMaskedImageModeling is not supported"):
        fastprune.patch.transformers(t.ViTForMaskedImageModeling(t.ViTConfig(intermediate_size=64, **COMMON)))
    with pytest.raises(TypeError, match="Linear is not supported"):
        fastprune.patch.transformers(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="unexpected option"):
        fastprune.patch.transformers(_build("vit"), method="tome", r=2, keep_rate=0.5)
    model = fastprune.patch.transformers(_build("vit"), method="tome", r=2)
    mask = torch.ones(2, 65, dtype=torch.bool)
    mask[:, -1] = False
    with pytest.raises(NotImplementedError, match="attention_mask"):
        model(_images(), attention_mask=mask)
    with pytest.raises(NotImplementedError, match="output_attentions"):
        model(_images(), output_attentions=True)
    model.activation_checkpointing_enable()
    model.train()
    with pytest.raises(NotImplementedError, match="gradient checkpointing"):
        model(_images().requires_grad_())


# ---- the same weights in timm give the same reduced outputs ------------------------------------------

#: HF layer attribute -> timm block attribute, per family (the attention's q/k/v become the fused qkv)
_VIT_NAMES = {"layernorm_before": "norm1", "layernorm_after": "norm2", "attention.o_proj": "attn.proj",
              "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
_DINOV2_NAMES = {"norm1": "norm1", "norm2": "norm2", "attention.o_proj": "attn.proj", "mlp.fc1": "mlp.fc1",
                 "mlp.fc2": "mlp.fc2"}


def _timm_from_hf(model: nn.Module) -> nn.Module:
    """A timm ``VisionTransformer`` (``VisionTransformerDistilled`` for DeiT; LayerScale for DINOv2) holding
    the HF model's weights."""
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import VisionTransformer

    distilled, dinov2 = isinstance(model, transformers.DeiTModel), isinstance(model, transformers.Dinov2Model)
    cfg = model.config
    cls = VisionTransformerDistilled if distilled else VisionTransformer
    mlp_ratio = cfg.mlp_ratio if dinov2 else cfg.intermediate_size / cfg.hidden_size
    vit = cls(img_size=IMAGE, patch_size=PATCH, embed_dim=cfg.hidden_size, depth=cfg.num_hidden_layers,
              num_heads=cfg.num_attention_heads, mlp_ratio=mlp_ratio, qkv_bias=True, num_classes=0,
              init_values=cfg.layerscale_value if dinov2 else None,
              norm_layer=functools.partial(nn.LayerNorm, eps=cfg.layer_norm_eps)).eval()
    emb = model.embeddings
    sd = {"cls_token": emb.cls_token, "pos_embed": emb.position_embeddings,
          "patch_embed.proj.weight": emb.patch_embeddings.projection.weight,
          "patch_embed.proj.bias": emb.patch_embeddings.projection.bias,
          "norm.weight": model.layernorm.weight, "norm.bias": model.layernorm.bias}
    if distilled:
        sd["dist_token"] = emb.distillation_token
    layers, names = (model.encoder.layer, _DINOV2_NAMES) if dinov2 else (model.layers, _VIT_NAMES)
    for i, layer in enumerate(layers):
        a, b = layer.attention, f"blocks.{i}."
        if dinov2:
            sd[b + "ls1.gamma"], sd[b + "ls2.gamma"] = layer.layer_scale1.lambda1, layer.layer_scale2.lambda1
        for part in ("weight", "bias"):
            sd[b + f"attn.qkv.{part}"] = torch.cat([getattr(p, part) for p in (a.q_proj, a.k_proj, a.v_proj)])
            for ours, theirs in names.items():
                sd[b + f"{theirs}.{part}"] = getattr(layer.get_submodule(ours), part)
    vit.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, strict=True)
    return vit


@pytest.mark.parametrize("name", ["vit", "deit", "dinov2"])
def test_timm_port_gives_the_same_outputs(name):
    model = _build(name)
    vit = _timm_from_hf(model)
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(vit.forward_features(x), model(x).last_hidden_state, atol=1e-5, rtol=1e-5)
        for method, (r, options) in METHODS.items():
            fastprune.patch.transformers(model, method=method, r=r, **options)
            fastprune.patch.timm(vit, method=method, r=r, **options)
            ours, theirs = model(x).last_hidden_state, vit.forward_features(x)
            assert hf.state(model).num_tokens == fastprune.patch.state(vit).num_tokens
            assert hf.reduction_schedule(model) == fastprune.patch.reduction_schedule(vit)
            torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(hf.state(model).index, fastprune.patch.state(vit).index, atol=0, rtol=0)


@pytest.mark.parametrize("train", [False, True])
def test_timm_port_idle(train):
    """IdleViT (a block forward written for timm blocks) on the timm view of the HF layers: the same tokens
    as the timm model, gather form in eval, mask form and cut loss in training."""
    from fastprune.idle import cut_loss

    model = _build("deit").train(train)
    vit = _timm_from_hf(model).train(train)
    x = _images()
    fastprune.patch.transformers(model, method="idle", r=0.5)
    fastprune.patch.timm(vit, method="idle", r=0.5)
    ours, theirs = model(x).last_hidden_state, vit.forward_features(x)
    assert hf.state(model).r_applied == fastprune.patch.state(vit).r_applied == hf.reduction_schedule(model)
    assert sum(hf.state(model).r_applied) > 0 and hf.state(model).num_tokens == [66] * DEPTH
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    if train:
        loss = cut_loss(model)
        torch.testing.assert_close(loss, cut_loss(vit), atol=1e-5, rtol=1e-5)
        (ours.pow(2).mean() + loss).backward()
        assert model.layers[DEPTH - 1].attention.q_proj.weight.grad.abs().sum() > 0
    else:
        with pytest.raises(RuntimeError, match="mask form"):
            cut_loss(model)


def test_patch_state_and_revert_serve_both_integrations():
    model = fastprune.patch.transformers(_build("vit"), method="tome", r=2)
    assert fastprune.patch.is_patched(model) and fastprune.patch.state(model) is hf.state(model)
    fastprune.patch.revert(model)
    assert not fastprune.patch.is_patched(model)
