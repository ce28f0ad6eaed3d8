"""fastprune.patch: the timm drop-in on small random-init ViTs (CPU, fast).

The test model has LayerScale, q/k norm and 4 register tokens (5 prefix tokens) and 16 patches, so
21 tokens enter the first block.
"""
import copy
import subprocess
import sys

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

import fastprune.patch as fpatch

IMG, PATCH, DEPTH, PREFIX = 32, 8, 3, 5
N0 = (IMG // PATCH) ** 2 + PREFIX  # 21


def make_vit(global_pool="token", fused=True, **kwargs) -> VisionTransformer:
    args = dict(img_size=IMG, patch_size=PATCH, embed_dim=32, depth=DEPTH, num_heads=2, num_classes=7,
                init_values=0.5, qk_norm=True, reg_tokens=4, global_pool=global_pool)
    args.update(kwargs)
    model = VisionTransformer(**args).eval()
    for blk in model.blocks:
        blk.attn.fused_attn = fused
    return model


@pytest.fixture
def images():
    return torch.randn(2, 3, IMG, IMG)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("global_pool", ["token", "avg"])
def test_r0_matches_the_original_model(images, global_pool, fused):
    model = make_vit(global_pool, fused, scale_attn_norm=True)
    model.blocks[1].attn.gate = nn.Linear(32, 32)  # timm's gated attention, on one block
    with torch.no_grad():
        expected = model(images)
        fpatch.timm(model, r=0)
        got = model(images)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    assert fpatch.state(model).num_tokens == [N0] * DEPTH


@pytest.mark.parametrize("global_pool", ["token", "avg"])
def test_explicit_path_matches_fused_path_with_merging(images, global_pool):
    # With r > 0 the sizes differ from one, so this checks proportional attention, the class
    # attention and the size-weighted pooling on both attention paths.
    fused, explicit = make_vit(global_pool, True), make_vit(global_pool, False)
    explicit.load_state_dict(fused.state_dict())
    with torch.no_grad():
        for model in (fused, explicit):
            fpatch.timm(model, r=4)
        a, b = fused(images), explicit(images)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert torch.equal(fpatch.state(fused).index, fpatch.state(explicit).index)


@pytest.mark.parametrize("r,counts", [
    (4, [21, 17, 13]),
    ([0, 3, 6], [21, 21, 18]),
    (0.5, [21, 13, 9]),      # keep ceil(0.5 * 16) = 8 of 16, then 4 of 8
    (0.7, [21, 17, 14]),     # keep ceil(0.7 * 16) = 12, ceil(0.7 * 12) = 9 (not 10: float error)
    (100, [21, 6, 6]),       # clipped: one non-prefix token stays
    (1.0, [21, 21, 21]),
])
def test_token_counts_follow_the_schedule(images, r, counts):
    model = fpatch.timm(make_vit(), r=r)
    with torch.no_grad():
        model(images)
    st = fpatch.state(model)
    assert st.num_tokens == counts
    removed = [a - b for a, b in zip(counts, counts[1:])]
    expected_r = fpatch.reduction_schedule(model, num_tokens=N0)
    assert expected_r[:-1] == removed and st.r_applied == expected_r
    assert st.size.shape == (2, counts[-1] - expected_r[-1])
    assert fpatch.reduction_schedule(model, r) == expected_r  # default token count = 21


def test_index_map_is_consistent(images):
    model = fpatch.timm(make_vit(), r=5)
    with torch.no_grad():
        model(images)
    st = fpatch.state(model)
    index, size = st.index, st.size
    n_final = N0 - sum(st.r_applied)
    assert index.shape == (2, N0) and index.dtype == torch.int64
    assert index.min() >= 0 and index.max() < n_final
    assert torch.equal(index[:, :PREFIX], torch.arange(PREFIX).expand(2, PREFIX))
    for b in range(2):  # every input position lands in one final token; sizes count them
        counts = torch.bincount(index[b], minlength=n_final).float()
        torch.testing.assert_close(counts, size[b])
    # per-block maps compose: the map after block 1 gathered through block 2's own step
    assert st.index_at(0).shape == (2, N0) and torch.equal(st.index_at(DEPTH), index)


def test_fused_attention_stays_on(images, monkeypatch):
    calls = []
    sdpa = F.scaled_dot_product_attention

    def counting_sdpa(*args, **kwargs):
        calls.append(kwargs.get("attn_mask"))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting_sdpa)
    model = make_vit()
    for impl, masked in (("column", False), ("mask", True)):
        fpatch.timm(model, r=4, prop_attn_impl=impl)
        calls.clear()
        with torch.no_grad():
            model(images)
        assert len(calls) == DEPTH
        # block 0 sees sizes of one: no bias at all; later blocks carry log(size) as configured
        assert calls[0] is None
        assert all((m is not None) == masked for m in calls[1:])


def test_revert_restores_the_original_bit_for_bit(images):
    model = make_vit("avg")
    with torch.no_grad():
        before = model(images)
        fpatch.timm(model, r=4)
        fpatch.timm(model, r=0.5, metric="x")  # re-configure, not stack
        assert type(model.blocks[0]).__mro__.count(fpatch._PatchedBlock) == 1
        assert fpatch.state(model).r == 0.5 and fpatch.state(model).options["metric"] == "x"
        patched = model(images)
        fpatch.revert(model)
        after = model(images)
    assert not torch.equal(before, patched)
    assert torch.equal(before, after)
    assert type(model) is VisionTransformer and all(type(b) is timm.models.vision_transformer.Block
                                                     for b in model.blocks)
    assert not hasattr(model, "_fastprune") and not hasattr(model.blocks[0], "_fastprune")
    assert not fpatch.is_patched(model)


@pytest.mark.parametrize("options", [dict(), dict(metric="x", weight="size_attn", prop_attn=False)])
def test_forward_and_backward_with_merging(images, options):
    model = fpatch.timm(make_vit("avg", drop_path_rate=0.1).train(), r=4, **options)
    model(images).logsumexp(dim=1).sum().backward()
    assert fpatch.state(model).num_tokens == [21, 17, 13]
    for name, p in model.named_parameters():
        assert p.grad is not None, name
    for blk in model.blocks:
        assert blk.attn.qkv.weight.grad.abs().sum() > 0
        assert blk.mlp.fc2.weight.grad.abs().sum() > 0
    assert model.patch_embed.proj.weight.grad.abs().sum() > 0


def test_gradient_checkpointing_matches(images):
    model = fpatch.timm(make_vit().train(), r=4)
    ref = copy.deepcopy(model)
    model.set_grad_checkpointing(True)
    outs, grads = [], []
    for m in (ref, model):
        out = m(images)
        out.square().sum().backward()
        outs.append(out.detach())
        grads.append(m.blocks[0].attn.qkv.weight.grad)
    torch.testing.assert_close(outs[0], outs[1])
    torch.testing.assert_close(grads[0], grads[1])
    assert fpatch.state(model).num_tokens == [21, 17, 13]


def test_size_weighted_average_pooling(images):
    model = fpatch.timm(make_vit("avg"), r=6)
    with torch.no_grad():
        feats = model.forward_features(images)
        size = fpatch.state(model).size
        tokens, w = feats[:, PREFIX:], size[:, PREFIX:]
        expected = (tokens * w[..., None]).sum(1) / w.sum(1, keepdim=True)
        torch.testing.assert_close(model.pool(feats), expected)
        assert (w > 1).any()  # merged tokens weigh more
        torch.testing.assert_close(model.pool(feats, "avgmax"), 0.5 * (tokens.amax(1) + expected))
        torch.testing.assert_close(model.pool(feats, "token"), feats[:, 0])


def test_distillation_token_and_half_precision(images):
    model = timm.models.deit.VisionTransformerDistilled(
        img_size=IMG, patch_size=PATCH, embed_dim=32, depth=2, num_heads=2, num_classes=5).eval()
    fpatch.timm(model, r=3)
    with torch.no_grad():
        out = model(images)
        assert out.shape == (2, 5) and fpatch.state(model).num_tokens == [18, 15]
        assert torch.equal(fpatch.state(model).index[:, :2], torch.arange(2).expand(2, 2))
        half = model.to(torch.bfloat16)(images.to(torch.bfloat16))
    assert half.dtype == torch.bfloat16 and torch.isfinite(half).all()


def test_register_a_method_with_a_reducer_and_with_a_block_forward(images):
    seen = []

    def drop_least_attended(x, ctx):  # EViT-style pruning without the fused token
        seen.append((ctx.block_index, ctx.r, ctx.cls_attn.shape, ctx.keys, ctx.num_prefix_tokens))
        p, keep = ctx.num_prefix_tokens, x.shape[1] - ctx.num_prefix_tokens - ctx.r
        order = ctx.cls_attn[:, p:].argsort(dim=1, descending=True)[:, :keep].sort(dim=1).values + p
        rows = torch.cat([torch.arange(p).expand(x.shape[0], p), order], dim=1)
        index = torch.full(x.shape[:2], -1, dtype=torch.long)
        index.scatter_(1, rows, torch.arange(rows.shape[1]).expand_as(rows))
        index = torch.where(index < 0, torch.zeros_like(index), index)  # dropped -> class token slot
        return x.gather(1, rows[..., None].expand(-1, -1, x.shape[2])), ctx.size.gather(1, rows), index

    def skip_mlp(block, x, ctx):  # a whole block forward: attention only
        out = fpatch.attention_forward(block.attn, block.norm1(x), size=ctx.attn_size)
        return x + block.ls1(out.x), None, None

    try:
        fpatch.register_method("test_prune", drop_least_attended, needs={"cls_attn"})
        fpatch.register_method("test_skip", block_forward=skip_mlp)
        with pytest.raises(ValueError, match="already registered"):
            fpatch.register_method("test_skip", block_forward=skip_mlp)
        model = fpatch.timm(make_vit(), method="test_prune", r=[2, 0, 3])
        with torch.no_grad():
            model(images)
        assert fpatch.state(model).num_tokens == [21, 19, 19]
        assert [s[:2] for s in seen] == [(0, 2), (2, 3)] and seen[0][2] == (2, 21) and seen[0][3] is None
        fpatch.timm(model, method="test_skip", r=0)
        with torch.no_grad():
            model(images)
        assert fpatch.state(model).num_tokens == [21] * DEPTH
        assert "test_prune" in fpatch.available_methods()
    finally:
        fpatch._METHODS.pop("test_prune", None)
        fpatch._METHODS.pop("test_skip", None)


def test_a_method_may_set_its_own_default_for_the_common_options(images):
    calls = []

    def record_sizes(block, x, ctx):  # the block forward sees the resolved options
        calls.append((ctx.options["prop_attn"], ctx.options["prop_attn_impl"]))
        return x, None, None

    try:
        fpatch.register_method("test_no_prop", block_forward=record_sizes,
                               defaults={"prop_attn": False, "prop_attn_impl": "mask"})
        model = fpatch.timm(make_vit(), method="test_no_prop")
        assert fpatch.state(model).options["prop_attn"] is False
        with torch.no_grad():
            model(images)
        assert calls == [(False, "mask")] * DEPTH
        fpatch.timm(model, method="test_no_prop", prop_attn=True, prop_attn_impl="column")  # the user's word wins
        assert fpatch.state(model).options["prop_attn"] is True
        fpatch.timm(model, method="merge", r=1)  # other methods keep the global default
        assert fpatch.state(model).options["prop_attn"] is True
        with pytest.raises(TypeError, match="prop_attn must be a bool"):
            fpatch.register_method("test_bad_default", block_forward=record_sizes, defaults={"prop_attn": 1})
        with pytest.raises(ValueError, match="prop_attn_impl"):
            fpatch.register_method("test_bad_default", block_forward=record_sizes,
                                   defaults={"prop_attn_impl": "flash"})
        assert "test_bad_default" not in fpatch.available_methods()
    finally:
        fpatch._METHODS.pop("test_no_prop", None)
        fpatch._METHODS.pop("test_bad_default", None)


def test_block_r_hook_sets_each_blocks_r_and_the_reported_schedule(images):
    seen = []

    def every_other_block(sctx):  # the generic rule, but only in even blocks
        seen.append((sctx.block_index, sctx.depth, sctx.num_tokens, sctx.num_patches, sctx.num_prefix_tokens,
                     sctx.options["weight"]))
        return sctx.generic_r if sctx.block_index % 2 == 0 else 0

    merge = fpatch._METHODS["merge"]
    try:
        fpatch.register_method("test_even", merge.reducer, needs=merge.needs, defaults=merge.defaults,
                               validate=merge.validate, block_r=every_other_block)
        model = fpatch.timm(make_vit(), method="test_even", r=4)
        with torch.no_grad():
            model(images)
        st = fpatch.state(model)
        assert st.num_tokens == [21, 17, 17] and st.r_applied == [4, 0, 4]
        assert seen == [(0, DEPTH, 21, 16, PREFIX, "size_attn"), (1, DEPTH, 17, 16, PREFIX, "size_attn"),
                        (2, DEPTH, 17, 16, PREFIX, "size_attn")]
        assert fpatch.reduction_schedule(model) == [4, 0, 4]
        assert fpatch.reduction_schedule(model, 0.5) == [8, 0, 4]  # keep rate: 8 of 16, then 4 of 8
        assert fpatch.reduction_schedule(model, 100, weight="size") == [15, 0, 0]  # clipped to max_r
        assert seen[-1][-1] == "size"
        with pytest.raises(ValueError, match="give r together"):
            fpatch.reduction_schedule(model, method="merge")

        fpatch.register_method("test_even", merge.reducer, needs=merge.needs, defaults=merge.defaults,
                               block_r=lambda sctx: 2.0, replace=True)
        with pytest.raises(TypeError, match="block_r must return an int"):
            fpatch.reduction_schedule(model, 1, method="test_even")
        with pytest.raises(TypeError, match="block_r must be callable"):
            fpatch.register_method("test_even", merge.reducer, block_r=3, replace=True)
        with pytest.raises(TypeError, match="removes_tokens"):
            fpatch.register_method("test_even", merge.reducer, removes_tokens="no", replace=True)
    finally:
        fpatch._METHODS.pop("test_even", None)


def test_merge_paper_schedule_merges_at_blocks_3_6_9_with_evits_counts():
    torch.manual_seed(0)
    model = VisionTransformer(img_size=224, patch_size=16, embed_dim=24, depth=12, num_heads=2, num_classes=5).eval()
    fpatch.timm(model, method="merge", r=0.7, schedule="paper")
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    st = fpatch.state(model)
    assert st.num_tokens == [197] * 4 + [140] * 3 + [100] * 3 + [72] * 2
    assert st.r_applied == fpatch.reduction_schedule(model) == [0, 0, 0, 57, 0, 0, 40, 0, 0, 28, 0, 0]
    assert st.size.sum().item() == 197 and st.index.max().item() == 71  # every patch merged somewhere
    fpatch.timm(model, method="merge", schedule="paper")  # r left at 0: the default keep rate 0.7
    assert fpatch.state(model).r == 0.7
    assert fpatch.reduction_schedule(model) == [0, 0, 0, 57, 0, 0, 40, 0, 0, 28, 0, 0]
    assert fpatch.reduction_schedule(model, 0.5) == [0, 0, 0, 97, 0, 0, 48, 0, 0, 24, 0, 0]  # 99, 51, 27 left
    assert fpatch.reduction_schedule(model, 1.0) == [0] * 12
    assert fpatch.reduction_schedule(model, 0.7, method="merge") == [0, 0, 0, 57, 0, 0, 40, 0, 0, 28, 0, 0]
    assert fpatch.reduction_schedule(model, 0.7, method="merge", schedule=None)[:3] == [58, 41, 29]  # every block
    with pytest.raises(TypeError, match="float keep rate"):
        fpatch.timm(model, method="merge", r=13, schedule="paper")
    with pytest.raises(TypeError, match="float keep rate"):
        fpatch.timm(model, method="merge", r=[1] * 12, schedule="paper")
    with pytest.raises(ValueError, match="schedule must be"):
        fpatch.timm(model, method="merge", r=0.7, schedule="evit")
    with pytest.raises(ValueError, match="blocks"):
        fpatch.timm(make_vit(), method="merge", r=0.7, schedule="paper")  # 3 blocks


def test_import_fastprune_is_lazy_and_patch_registers_every_method():
    code = ("import sys, fastprune\n"
            "import fastprune.tome, fastprune.evit, fastprune.bat, fastprune.idle\n"
            "assert 'timm' not in sys.modules and 'fastprune.patch' not in sys.modules, 'eager'\n"
            "assert fastprune.idle.__name__ == 'fastprune.idle'\n"
            "print(','.join(fastprune.patch.available_methods()))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["bat,evit,idle,merge,tome"]


def test_bad_arguments_raise(images):
    model = make_vit()
    with pytest.raises(TypeError, match="VisionTransformer"):
        fpatch.timm(nn.Linear(3, 3), r=1)
    with pytest.raises(ValueError, match="class token"):
        fpatch.timm(make_vit("avg", class_token=False), method="idle", r=0.7)
    with pytest.raises(ValueError, match="unknown method"):
        fpatch.timm(model, method="tome!", r=1)
    with pytest.raises(ValueError, match="r must be >= 0"):
        fpatch.timm(model, r=-1)
    for bad in (0.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="keep rate"):
            fpatch.timm(model, r=bad)
    with pytest.raises(TypeError, match="bool"):
        fpatch.timm(model, r=True)
    with pytest.raises(TypeError, match="r must be"):
        fpatch.timm(model, r="4")
    with pytest.raises(ValueError, match="depth=3"):
        fpatch.timm(model, r=[1, 2])
    with pytest.raises(ValueError, match=r"r\[1\]"):
        fpatch.timm(model, r=[1, -2, 0])
    with pytest.raises(TypeError, match=r"r\[2\]"):
        fpatch.timm(model, r=[1, 2, 0.5])
    with pytest.raises(TypeError, match="unexpected option"):
        fpatch.timm(model, r=1, merics="x")
    with pytest.raises(ValueError, match="metric"):
        fpatch.timm(model, r=1, metric="q")
    with pytest.raises(ValueError, match="weight"):
        fpatch.timm(model, r=1, weight="attn")
    with pytest.raises(TypeError, match="prop_attn"):
        fpatch.timm(model, r=1, prop_attn="yes")
    with pytest.raises(ValueError, match="prop_attn_impl"):
        fpatch.timm(model, r=1, prop_attn_impl="flash")
    assert not fpatch.is_patched(model)  # nothing half-patched by the failures above
    with pytest.raises(ValueError, match="not patched"):
        fpatch.revert(model)
    with pytest.raises(ValueError, match="r is required"):
        fpatch.reduction_schedule(model)
    fpatch.timm(model, r=2)
    with pytest.raises(NotImplementedError, match="attn_mask"):
        model(images, attn_mask=torch.ones(1, 1, N0, N0, dtype=torch.bool))
    with pytest.raises(ValueError, match="num_tokens"):
        fpatch.reduction_schedule(model, num_tokens=3)
    with pytest.raises(ValueError, match="needs"):
        fpatch.register_method("test_bad", lambda x, ctx: x, needs={"queries"})


def test_recommended_schedule_is_the_documented_setting_and_scales_with_the_model():
    from fastprune.evaluation.settings import RECOMMENDED_SETTING, parse_setting
    from fastprune.patch.methods import MERGE_DEFAULTS
    from fastprune.schedules import recommended_r
    setting = parse_setting(RECOMMENDED_SETTING)  # the evaluation's recommended setting is the patch default
    assert setting.method == "merge" and list(setting.r) == recommended_r(12, 196)
    assert recommended_r(12, 196) == [0, 0, 23] + list(range(21, 12, -1))
    assert all(MERGE_DEFAULTS[k] == v for k, v in setting.options.items())
    deep = recommended_r(24, 576)  # ViT-L/16 at 384 px: the same share of tokens, spread over 24 blocks
    assert deep[:3] == [0, 0, 0] and min(deep) >= 0
    assert abs(sum(deep) / 576 - sum(recommended_r(12, 196)) / 196) < 0.02
    assert recommended_r(1, 16) == [0]
    with pytest.raises(ValueError, match="depth"):
        recommended_r(0, 196)


def test_patch_with_no_arguments_applies_the_recommended_setting(images):
    from fastprune.schedules import recommended_r
    model = fpatch.timm(make_vit(depth=12))
    st = fpatch.state(model)
    assert st.method.name == "merge" and list(st.r) == recommended_r(12, 16)
    with torch.no_grad():
        model(images)
    assert st.num_tokens[-1] < N0  # it reduces
    fpatch.timm(model, r=0)  # explicit r=0 stays a no-op, as does a method without r
    with torch.no_grad():
        model(images)
    assert fpatch.state(model).num_tokens == [N0] * 12
    fpatch.timm(model, method="tome")
    assert fpatch.state(model).r == 0


def _gap_vit(global_pool="avg", **kwargs):
    torch.manual_seed(0)
    return make_vit(global_pool, class_token=False, reg_tokens=kwargs.pop("reg_tokens", 0), **kwargs)


@pytest.mark.parametrize("global_pool", ["avg", "map"])
def test_class_token_free_models_r0_exact_and_every_ranking_method_runs(images, global_pool):
    ref = _gap_vit(global_pool)
    model = fpatch.timm(copy.deepcopy(ref), method="merge", r=0)
    with torch.no_grad():
        torch.testing.assert_close(model(images), ref(images), atol=0, rtol=0)
    for method, r in (("merge", 3), ("evit", 0.5), ("bat", 0.5), ("tome", 3)):
        model = fpatch.timm(copy.deepcopy(ref), method=method, r=r, **({"layers": (1,)} if method in ("evit", "bat")
                                                                       else {}))
        out = model(images)
        out.sum().backward()
        assert torch.isfinite(out).all() and fpatch.state(model).num_tokens[-1] < 16, method


def test_received_attention_is_the_mean_column_of_the_full_map():
    from fastprune.attention import received_attention
    q, k = torch.randn(2, 3, 10, 4, dtype=torch.float64), torch.randn(2, 3, 10, 4, dtype=torch.float64)
    size = torch.rand(2, 10, dtype=torch.float64) * 3 + 1
    probs = ((q @ k.transpose(-1, -2)) * 0.5 + size.log()[:, None, None, :]).softmax(-1)  # [B, H, N, N]
    want = (probs * (size / size.sum(1, keepdim=True))[:, None, :, None]).sum(2).mean(1)
    got = received_attention(q.float(), k.float(), scale=0.5, size=size.float(), chunk=3)
    torch.testing.assert_close(got, want.float(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got.sum(1), torch.ones(2))
    plain = (q @ k.transpose(-1, -2) * 0.5).softmax(-1).mean(2).mean(1)
    torch.testing.assert_close(received_attention(q, k, scale=0.5), plain.float())
    with pytest.raises(ValueError, match="chunk"):
        received_attention(q, k, chunk=0)


def test_merge_ranks_by_received_attention_without_a_class_token(images, monkeypatch):
    """The reducer's cls_attn is the received attention of that block (computed from the same q, k)."""
    import fastprune.attention as fattn
    seen = []
    real = fattn.received_attention
    monkeypatch.setattr(fattn, "received_attention", lambda *a, **k: seen.append(1) or real(*a, **k))
    model = fpatch.timm(_gap_vit(), method="merge", r=2)
    with torch.no_grad():
        model(images)
    assert len(seen) == DEPTH


def test_attention_pool_is_size_weighted_like_duplicated_tokens():
    """A token of size s in the map pool weighs like s copies of it: the log-size bias is exact."""
    model = fpatch.timm(_gap_vit("map"), method="merge", r=2)
    st = fpatch.state(model)
    tokens = torch.randn(2, 5, 32)
    size = torch.tensor([[1.0, 2.0, 3.0, 1.0, 1.0], [4.0, 1.0, 1.0, 1.0, 1.0]])
    st.reset()
    st._indices[DEPTH], st._sizes[DEPTH] = torch.zeros(2, 1, dtype=torch.long), size  # as if a forward had run
    pooled = model.pool(tokens)
    for b in range(2):
        dup = tokens[b].repeat_interleave(size[b].long(), dim=0)[None]
        torch.testing.assert_close(pooled[b], model.attn_pool(dup)[0], atol=1e-5, rtol=1e-5)


def test_eva_and_beit_are_refused_with_the_reason():
    eva = timm.create_model("vit_small_patch16_rope_224", pretrained=False, depth=1, embed_dim=32, num_heads=2,
                            img_size=32)
    with pytest.raises(TypeError, match="position"):
        fpatch.timm(eva, r=1)
