"""IdleViT (Xu et al., 2023): schedule, ranking, selection, gather/scatter, both block forms, the token
cut loss, the Triton kernels against the PyTorch reference (interpreter on CPU), and ``method="idle"``
of the timm patch, including one training step."""
import math

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block, VisionTransformer

import fastprune
import fastprune.idle as idle
import fastprune.patch as patch
from fastprune.kernels import aot

from conftest import DEVICE


def make_block(C=48, H=3, qkv_bias=True, qk_norm=False, init_values=None, dtype=torch.float32):
    blk = Block(C, H, qkv_bias=qkv_bias, qk_norm=qk_norm, init_values=init_values)
    with torch.no_grad():  # non-trivial LayerNorm affine and biases, so that the fold is really tested
        for name, p in blk.named_parameters():
            shift = 1.0 if name.endswith("norm1.weight") else 0.0
            p.copy_(torch.randn_like(p) * (0.3 if p.dim() > 1 else 0.5) + shift)
    return blk.to(DEVICE, dtype).eval()


@pytest.fixture(autouse=True)
def one_thread():
    """These tests run many tiny ops: one intra-op thread avoids OpenMP hand-offs, which dominate
    (10-100x) on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_vit(depth=4, drop=0.0):
    torch.manual_seed(1)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=depth, num_heads=3, num_classes=10,
                             drop_rate=drop).to(DEVICE)


# --------------------------------------------------------------------------------------------------
# schedule
# --------------------------------------------------------------------------------------------------

def test_schedule_matches_the_paper_for_12_blocks():
    # layers 3-11 keep int(196 * rho^stage), stages 1,1,1,2,2,2,3,3,3
    assert idle.idle_schedule(0.7, 12, 196) == [196] * 3 + [137] * 3 + [96] * 3 + [67] * 3
    assert idle.idle_schedule(0.5, 12, 196) == [196] * 3 + [98] * 3 + [49] * 3 + [24] * 3
    assert [idle.idle_stage(layer, 12) for layer in range(12)] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert idle.idle_schedule(1.0, 12, 196) == [196] * 12  # keep rate 1: nothing idles
    assert idle.idle_schedule(0.01, 12, 196)[3:] == [1] * 9  # never fewer than one token
    assert idle.idle_schedule(0.9, 12, 100)[3] == 90  # 100 * 0.9 = 90.00000000000001 or 89.999...: 90


def test_schedule_other_forms_and_depths():
    assert idle.idle_schedule(0.5, 4, 16) == [16, 8, 4, 2]
    assert idle.idle_schedule(0.5, 24, 196) == [196] * 6 + [98] * 6 + [49] * 6 + [24] * 6
    assert idle.idle_schedule(5, 3, 16) == [11, 11, 11]  # int: tokens idled per block
    assert idle.idle_schedule(40, 2, 16) == [1, 1]
    assert idle.idle_schedule([0, 3, 15], 3, 16) == [16, 13, 1]


@pytest.mark.parametrize("r,exc", [(0.0, ValueError), (1.5, ValueError), (float("nan"), ValueError), (-1, ValueError),
                                   (True, TypeError), ("0.5", TypeError), ([1, 2], ValueError),
                                   ([1, 2.0, 3], TypeError)])
def test_schedule_bad_keep_rate(r, exc):
    with pytest.raises(exc, match="r"):
        idle.idle_schedule(r, 3, 16)


# --------------------------------------------------------------------------------------------------
# ranking and selection
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["ln", "no_bias", "qk_norm"])
def test_cls_logits_fold_matches_the_keys(kind):
    blk = make_block(qkv_bias=kind != "no_bias", qk_norm=kind == "qk_norm")
    x = torch.randn(2, 19, 48, device=DEVICE) * 2 + 1
    ref = idle.cls_logits_reference(x, blk)
    for backend in ("reference", "triton"):
        got = idle.cls_logits(x, blk, backend=backend)
        assert got.dtype == torch.float32 and got.shape == (2, 19)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_cls_logits_half_input_matches_float32():
    blk = make_block()
    x = torch.randn(2, 19, 48, device=DEVICE) * 30  # large residual stream: fp16 products would be rough
    ref = idle.cls_logits(x, blk, backend="reference")
    got = idle.cls_logits(x.half(), blk, backend="triton")
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2)


def brute_force_selection(scores, k, p):
    N = len(scores)
    order = sorted(range(p, N), key=lambda j: (-float(scores[j]) if not math.isnan(scores[j]) else math.inf, j))
    return sorted(list(range(p)) + order[:k])


@pytest.mark.parametrize("B,N,p,k", [(1, 7, 1, 3), (2, 70, 1, 33), (3, 20, 2, 1), (2, 9, 0, 4), (1, 5, 1, 4),
                                     (2, 6, 1, 0)])
def test_selection_kernel_matches_reference(B, N, p, k):
    scores = torch.randn(B, N, device=DEVICE).round(decimals=1)  # plenty of ties
    scores[0, -1] = float("nan")
    ref = idle.select_tokens(scores, k, p, backend="reference")
    got = idle.select_tokens(scores, k, p, backend="triton")
    for b in range(B):
        assert ref.index[b].tolist() == brute_force_selection(scores[b].tolist(), k, p)
    assert torch.equal(got.keep, ref.keep) and torch.equal(got.index, ref.index) and torch.equal(got.slot, ref.slot)
    assert (ref.slot[ref.keep] == torch.arange(p + k, device=DEVICE).repeat(B)).all()
    assert (ref.slot[~ref.keep] == -1).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gather_scatter_kernels_bit_exact_with_gradients(dtype):
    B, N, C = 2, 13, 40
    x = torch.randn(B, N, C, device=DEVICE).to(dtype)
    sel = idle.select_tokens(torch.randn(B, N, device=DEVICE), 5, 1)
    y = torch.randn(B, 6, C, device=DEVICE).to(dtype)
    g = torch.randn(B, N, C, device=DEVICE).to(dtype)
    outs = {}
    for backend in ("reference", "triton"):
        xi, yi = x.clone().requires_grad_(), y.clone().requires_grad_()
        xs = idle.idle_gather(xi, sel, backend=backend)
        out = idle.idle_scatter(xi, yi + 2 * xs, sel, backend=backend)
        out.backward(g)
        outs[backend] = (xs, out, xi.grad, yi.grad)
        assert torch.equal(out[~sel.keep], x[~sel.keep])  # idle tokens bit-identical
        assert torch.equal(xs, x[sel.keep].view(B, 6, C))
    for a, b in zip(outs["reference"], outs["triton"]):
        assert a.dtype == b.dtype == dtype
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------------
# token cut loss
# --------------------------------------------------------------------------------------------------

def brute_force_cut_loss(S, m):
    """Loop-by-loop statement of the token cut loss for [B, N, N] head-mean logits, float64."""
    B, N, _ = S.shape
    total_inter = total_intra = 0.0
    for b in range(B):
        for i in range(N):
            row = [math.exp(float(S[b, i, j])) for j in range(N)]
            z = sum(row)
            inter = sum(abs(float(m[b, i] - m[b, j])) * row[j] / z for j in range(1, N))
            intra = sum(float(m[b, i] * m[b, j]) * row[j] / z for j in range(N))
            total_inter += inter ** 2
            total_intra += (intra - float(m[b, i])) ** 2
    return (total_inter + total_intra) / (B * N)


def test_cut_loss_reference_matches_brute_force():
    S = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    m = torch.rand(2, 7) > 0.5
    m[:, 0] = True
    got = idle.token_cut_loss_reference(S, m)
    assert got.item() == pytest.approx(brute_force_cut_loss(S.mean(1), m.double()), rel=1e-12)
    # a perfect cut has zero loss: selected tokens attend only to selected ones, idle tokens only to
    # idle ones and to the class token (column 0 is not part of the cut)
    keep = torch.tensor([[True, True, False, False]])
    S = torch.full((1, 4, 4), -1e4, dtype=torch.float64)
    S[0, :2, :2] = 0.0
    S[0, 2:, 2:] = 0.0
    S[0, 2:, 0] = 3.0
    assert idle.token_cut_loss_reference(S, keep).item() == pytest.approx(0.0, abs=1e-12)
    # uniform attention (W = 1/4) mixes the groups: inter = 1/2 for the selected tokens and 1/4 for the
    # idle ones (column 0 excluded), intra = 1/2 for the selected tokens (target 1), 0 for the idle ones
    uniform = idle.token_cut_loss_reference(torch.zeros(1, 4, 4, dtype=torch.float64), keep).item()
    assert uniform == pytest.approx((2 * 0.5 ** 2 + 2 * 0.25 ** 2) / 4 + (2 * 0.5 ** 2) / 4)


def test_cut_loss_gradcheck_float64():
    q = torch.randn(2, 2, 5, 3, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, 5, 3, dtype=torch.float64, requires_grad=True)
    keep = torch.tensor([[1, 1, 0, 1, 0], [1, 0, 0, 1, 1]], dtype=torch.bool)
    assert torch.autograd.gradcheck(lambda a, b: idle.token_cut_loss(a, b, keep, backend="reference"), (q, k))


@pytest.mark.parametrize("B,H,N,d,dtype", [(2, 3, 37, 16, torch.float32), (1, 2, 5, 3, torch.float32),
                                           (2, 1, 18, 24, torch.float16), (1, 2, 33, 8, torch.bfloat16)])
def test_cut_loss_kernel_matches_reference(B, H, N, d, dtype):
    q = (torch.randn(B, H, N, d, device=DEVICE) * 2).to(dtype)
    k = (torch.randn(B, H, N, d, device=DEVICE) * 2).to(dtype)
    keep = torch.rand(B, N, device=DEVICE) > 0.4
    keep[:, 0] = True
    results = {}
    for backend in ("reference", "triton"):
        qi, ki = q.clone().requires_grad_(), k.clone().requires_grad_()
        loss = idle.token_cut_loss(qi, ki, keep, backend=backend)
        loss.backward()
        results[backend] = (loss, qi.grad, ki.grad)
    (l0, gq0, gk0), (l1, gq1, gk1) = results["reference"], results["triton"]
    assert l1.dtype == torch.float32 and gq1.dtype == dtype
    tol = dict(rtol=1e-4, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-4)
    torch.testing.assert_close(l1, l0, **tol)
    torch.testing.assert_close(gq1.float(), gq0.float(), **tol)
    torch.testing.assert_close(gk1.float(), gk0.float(), **tol)


def test_cut_loss_kernel_half_inputs_do_not_overflow():
    # q . k * scale reaches ~1e5, beyond fp16's 65504: computed in float32, finite and equal to float32
    q = torch.full((1, 1, 9, 16), 90.0, device=DEVICE)
    k = torch.full((1, 1, 9, 16), 90.0, device=DEVICE)
    k[0, 0, 3:] = -90.0
    keep = torch.tensor([[True] * 4 + [False] * 5], device=DEVICE)
    ref = idle.token_cut_loss(q, k, keep, backend="reference")
    got = idle.token_cut_loss(q.half(), k.half(), keep, backend="triton")
    assert torch.isfinite(got) and torch.isfinite(ref)
    torch.testing.assert_close(got, ref)


def test_cut_loss_soft_mask_kernel_matches_reference():
    q, k = torch.randn(2, 2, 12, 8, device=DEVICE), torch.randn(2, 2, 12, 8, device=DEVICE)
    m = torch.rand(2, 12, device=DEVICE)
    torch.testing.assert_close(idle.token_cut_loss(q, k, m, backend="triton"),
                               idle.token_cut_loss(q, k, m, backend="reference"), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("call,exc,match", [
    (lambda q, k, m: idle.token_cut_loss(q, k[:, :, :-1], m), ValueError, "same shape"),
    (lambda q, k, m: idle.token_cut_loss(q[0], k[0], m), ValueError, r"\[B, H, N, d\]"),
    (lambda q, k, m: idle.token_cut_loss(q, k, m[:, :-1]), ValueError, "keep"),
    (lambda q, k, m: idle.token_cut_loss(q, k, m.long()), TypeError, "keep"),
    (lambda q, k, m: idle.token_cut_loss(q.long(), k, m), TypeError, "q"),
    (lambda q, k, m: idle.token_cut_loss(q, k, m, scale=-1.0), ValueError, "scale"),
    (lambda q, k, m: idle.token_cut_loss(q, k, m, backend="cuda"), ValueError, "backend"),
])
def test_cut_loss_bad_input(call, exc, match):
    q, k = torch.randn(2, 2, 6, 4), torch.randn(2, 2, 6, 4)
    with pytest.raises(exc, match=match):
        call(q, k, torch.ones(2, 6, dtype=torch.bool))


# --------------------------------------------------------------------------------------------------
# idle block: both forms, kernels against reference, gradients
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("B,N,k,init_values", [(2, 17, 6, None), (1, 17, 1, 1e-1), (3, 10, 8, None)])
def test_gather_and_mask_forms_agree(B, N, k, init_values):
    blk = make_block(init_values=init_values)
    x = torch.randn(B, N, 48, device=DEVICE)
    gather = idle.idle_block(blk, x, k, form="gather", backend="reference")
    mask = idle.idle_block(blk, x, k, form="mask", backend="reference")
    triton_gather = idle.idle_block(blk, x, k, form="gather", backend="triton")
    keep = gather.selection.keep
    assert keep.sum().item() == B * (k + 1) and torch.equal(keep, mask.selection.keep)
    for out in (gather.x, mask.x, triton_gather.x):
        assert torch.equal(out[~keep], x[~keep])  # idle tokens bit-identical
    torch.testing.assert_close(mask.x, gather.x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(triton_gather.x, gather.x, rtol=1e-5, atol=1e-5)
    # the selected tokens saw exactly the block run on the selected tokens alone
    xs = x[keep].view(B, k + 1, 48)
    torch.testing.assert_close(gather.x[keep].view(B, k + 1, 48), blk(xs), rtol=0, atol=0)


def test_keep_all_is_the_plain_block():
    blk = make_block()
    x = torch.randn(2, 17, 48, device=DEVICE)
    for form in ("gather", "mask"):
        out = idle.idle_block(blk, x, 16, form=form, cut_loss=form == "mask", backend="triton")
        assert out.selection is None and out.cut_loss is None
        assert torch.equal(out.x, blk(x))


def test_mask_form_half_precision_stays_finite():
    blk = make_block(dtype=torch.float16)
    x = (torch.randn(2, 17, 48, device=DEVICE) * 20).half()
    out = idle.idle_block(blk, x, 4, form="mask", cut_loss=True, backend="triton")
    ref = idle.idle_block(blk.float(), x.float(), 4, form="mask", backend="reference")
    assert out.x.dtype == torch.float16 and torch.isfinite(out.x).all() and torch.isfinite(out.cut_loss)
    assert torch.equal(out.x[~out.selection.keep], x[~out.selection.keep])
    assert torch.equal(out.selection.keep, ref.selection.keep)


def test_block_gradients_kernels_match_reference():
    blk = make_block()
    x = torch.randn(2, 17, 48, device=DEVICE)
    grads = {}
    for backend in ("reference", "triton"):
        blk.zero_grad()
        xi = x.clone().requires_grad_()
        out = idle.idle_block(blk, xi, 5, form="gather", backend=backend).x
        (out * torch.linspace(-1, 1, 48, device=DEVICE)).square().sum().backward()
        grads[backend] = [xi.grad] + [p.grad.clone() for p in blk.parameters()]
    for a, b in zip(grads["reference"], grads["triton"]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    # mask form: same gradient with respect to x and the weights as the gather form
    blk.zero_grad()
    xi = x.clone().requires_grad_()
    out = idle.idle_block(blk, xi, 5, form="mask", backend="reference").x
    (out * torch.linspace(-1, 1, 48, device=DEVICE)).square().sum().backward()
    # (other summation order; the key bias gradient is zero up to rounding: compare to each tensor's scale)
    for a, b in zip(grads["reference"], [xi.grad] + [p.grad for p in blk.parameters()]):
        assert (b - a).abs().max() <= 1e-5 * a.abs().max() + 1e-6


@pytest.mark.parametrize("form", ["gather", "mask"])
def test_block_gradcheck_float64(form):
    blk = make_block(C=8, H=2).cpu().double()
    x = torch.randn(1, 6, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: idle.idle_block(blk, t, 3, form=form, backend="reference").x, (x,))


def test_block_cut_loss_kernel_matches_reference():
    blk = make_block()
    x = torch.randn(2, 17, 48, device=DEVICE)
    ref = idle.idle_block(blk, x, 6, form="mask", cut_loss=True, backend="reference").cut_loss
    got = idle.idle_block(blk, x, 6, form="mask", cut_loss=True, backend="triton").cut_loss
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)
    # from the logits before the mask: the same as the reference on the full attention logits
    xn = blk.norm1(x)
    q, k, _ = blk.attn.qkv(xn).reshape(2, 17, 3, 3, 16).permute(2, 0, 3, 1, 4).unbind(0)
    keep = idle.select_tokens(idle.cls_logits(x, blk), 6, 1).keep
    torch.testing.assert_close(ref, idle.token_cut_loss_reference((q * blk.attn.scale) @ k.transpose(-2, -1), keep))


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(k=0), ValueError, "k"), (dict(k=17), ValueError, "k"), (dict(k=2.0), TypeError, "k"),
    (dict(k=3, num_prefix_tokens=0), ValueError, "num_prefix_tokens"),
    (dict(k=3, form="idle"), ValueError, "form"),
    (dict(k=3, cut_loss=True), ValueError, "mask"),
    (dict(k=3, cut_loss=1), TypeError, "cut_loss"),
    (dict(k=3, backend="cuda"), ValueError, "backend"),
    (dict(k=3, candidates=torch.ones(2, 16, dtype=torch.bool)), ValueError, "candidates"),
])
def test_block_bad_parameters(kwargs, exc, match):
    blk = make_block()
    with pytest.raises(exc, match=match):
        idle.idle_block(blk, torch.randn(2, 17, 48, device=DEVICE), **kwargs)


def test_block_must_be_a_timm_block():
    with pytest.raises(TypeError, match="Block"):
        idle.idle_block(torch.nn.Linear(4, 4), torch.randn(1, 5, 4), 2)
    with pytest.raises(ValueError, match=r"x must have shape \[B, N, C\]"):
        idle.idle_block(make_block(), torch.randn(17, 48, device=DEVICE), 2)
    with pytest.raises(TypeError, match="x must be float32"):
        idle.idle_block(make_block(), torch.ones(1, 17, 48, dtype=torch.int32, device=DEVICE), 2)


# --------------------------------------------------------------------------------------------------
# timm patch: method="idle"
# --------------------------------------------------------------------------------------------------

def test_patch_registers_idle():
    assert "idle" in patch.available_methods()
    assert hasattr(fastprune, "idle")


def test_patched_model_eval_matches_both_forms_and_keeps_token_count():
    model = make_vit().eval()
    images = torch.randn(2, 3, 32, 32, device=DEVICE)
    with torch.no_grad():
        base = model(images)
        patch.timm(model, method="idle", r=0.5)
        gather = model(images)
        assert patch.state(model).num_tokens == [17] * 4  # no token is ever removed
        patch.timm(model, method="idle", r=0.5, form="mask")
        mask = model(images)
        patch.timm(model, method="idle", r=0.5, backend="triton")
        kernels = model(images)
    torch.testing.assert_close(mask, gather, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(kernels, gather, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(gather, base, atol=1e-3)  # something was idled
    patch.timm(model, method="idle", r=1.0)
    with torch.no_grad():
        assert torch.equal(model(images), base)  # keep rate 1 is the unchanged model
    patch.revert(model)
    with torch.no_grad():
        assert torch.equal(model(images), base)


def test_patch_state_and_reduction_schedule_show_idle_counts():
    # the paper's schedule on a 12-block /16 ViT at 224 px (196 patches), without running it
    vit = VisionTransformer(img_size=224, patch_size=16, embed_dim=12, depth=12, num_heads=2, num_classes=2)
    want = [0, 0, 0, 59, 59, 59, 100, 100, 100, 129, 129, 129]  # 196 - int(196 * 0.7 ** stage)
    assert patch.reduction_schedule(vit, 0.7, method="idle") == want
    assert want == [196 - k for k in idle.idle_schedule(0.7, 12, 196)]
    patch.timm(vit, method="idle", r=0.7)
    assert patch.reduction_schedule(vit) == want
    assert patch.reduction_schedule(vit, 0.5) == [196 - k for k in idle.idle_schedule(0.5, 12, 196)]
    # a forward records the same counts, for every form of r; the token count never changes
    model = make_vit(depth=8).eval()
    images = torch.randn(1, 3, 32, 32, device=DEVICE)
    for r in (0.7, 3, [0, 1, 2, 3, 4, 5, 15, 40]):
        patch.timm(model, method="idle", r=r)
        with torch.no_grad():
            model(images)
        st = patch.state(model)
        expected = [16 - k for k in idle.idle_schedule(r, 8, 16)]
        assert st.r_applied == patch.reduction_schedule(model) == expected
        assert st.num_tokens == [17] * 8
    assert expected[-2:] == [15, 15]  # clipped: one patch token is always selected


def test_reselect_off_never_selects_an_idle_token_again():
    model = make_vit(depth=8).eval()
    images = torch.randn(2, 3, 32, 32, device=DEVICE)
    selections = {}
    for reselect in (True, False):
        patch.timm(model, method="idle", r=0.7, reselect=reselect)
        with torch.no_grad():
            x = model._pos_embed(model.patch_embed(images))
            out = model(images)
        sel = []
        record = model.fastprune_record("idle")
        assert record.selected is not None
        # replay the blocks to see every layer's selection
        ks = idle.idle_schedule(0.7, 8, 16)
        prev = None
        with torch.no_grad():
            for blk, k in zip(model.blocks, ks):
                res = idle.idle_block(blk, x, k, candidates=None if reselect or prev is None else prev)
                if res.selection is not None:
                    sel.append(res.selection.keep)
                    prev = res.selection.keep
                x = res.x
            torch.testing.assert_close(model.forward_head(model.norm(x)), out)
        selections[reselect] = sel
    assert len(selections[False]) == 6
    for a, b in zip(selections[False], selections[False][1:]):
        assert not (b & ~a).any()  # every selected token was selected in the layer before
    assert any((b & ~a).any() for a, b in zip(selections[True], selections[True][1:]))  # the paper's rule
    with pytest.raises(TypeError, match="reselect"):
        patch.timm(model, method="idle", r=0.7, reselect="no")


def test_patch_bad_options():
    model = make_vit()
    with pytest.raises(ValueError, match="form"):
        patch.timm(model, method="idle", r=0.5, form="train")
    with pytest.raises(TypeError, match="cut_loss"):
        patch.timm(model, method="idle", r=0.5, cut_loss="yes")
    with pytest.raises(ValueError, match="keep rate"):
        patch.timm(model, method="idle", r=1.5)


def test_cut_loss_collection():
    model = make_vit()
    patch.timm(model, method="idle", r=0.5)
    images = torch.randn(2, 3, 32, 32, device=DEVICE)
    model.eval()
    with torch.no_grad():
        model(images)
    with pytest.raises(RuntimeError, match="mask form"):
        idle.cut_loss(model)
    model.train()
    model(images)
    loss = idle.cut_loss(model)
    x = model.patch_embed(images)
    x = model._pos_embed(x)
    expected = []
    with torch.no_grad():
        for i, blk in enumerate(model.blocks):
            k = idle.idle_schedule(0.5, 4, 16)[i]
            out = idle.idle_block(blk, x, k, form="mask", cut_loss=k < 16, backend="reference")
            if out.cut_loss is not None:
                expected.append(out.cut_loss)
            x = out.x
    assert len(expected) == 3
    torch.testing.assert_close(loss, torch.stack(expected).mean())
    patch.timm(model, method="idle", r=1.0)
    model(images)
    assert idle.cut_loss(model).item() == 0.0  # no layer idled
    patch.timm(model, method="merge", r=2)
    with pytest.raises(ValueError, match="idle"):
        idle.cut_loss(model)


def test_one_training_step_lowers_task_plus_cut_loss():
    """One SGD step on ``cross-entropy + 20 * cut loss`` (the kernels, through the interpreter on CPU)
    lowers that loss on the same batch; a step on the cut loss alone lowers the cut loss."""
    model = make_vit()
    patch.timm(model, method="idle", r=0.5, backend="triton")
    model.train()
    torch.manual_seed(3)
    images = torch.randn(4, 3, 32, 32, device=DEVICE)
    labels = torch.randint(0, 10, (4,), device=DEVICE)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)

    def losses():
        task = F.cross_entropy(model(images), labels)
        return task + idle.CUT_LOSS_WEIGHT * idle.cut_loss(model), idle.cut_loss(model)

    before, cut_before = losses()
    assert cut_before.item() > 0
    opt.zero_grad()
    before.backward()
    qkv_grad = model.blocks[2].attn.qkv.weight.grad  # an idle layer's keys/queries get gradient
    assert qkv_grad is not None and qkv_grad.abs().sum() > 0
    opt.step()
    with torch.no_grad():
        after, cut_after = losses()
    assert after.item() < before.item()

    patch.timm(model, method="idle", r=0.5)  # PyTorch path on CPU from here on
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    opt.zero_grad()
    model(images)
    cut = idle.cut_loss(model)
    cut.backward()
    opt.step()
    with torch.no_grad():
        model(images)
        assert idle.cut_loss(model).item() < cut.item()


# --------------------------------------------------------------------------------------------------
# ahead-of-time compilation: every kernel of kernels/idle.py is in the registry (tests/test_aot.py
# compiles the registry for sm_80 and sm_90)
# --------------------------------------------------------------------------------------------------

def test_every_idle_kernel_is_registered_for_aot():
    import fastprune.kernels.idle as kernels

    specs = [spec for spec in aot.registered_specs() if spec.name.startswith("idle_")]
    kernel_objects = [obj for name, obj in vars(kernels).items() if name.endswith("_kernel") and name.startswith("_")]
    assert len(kernel_objects) == 5  # the top-k selection is kernels/select.py's
    registered = {id(spec.kernel) for spec in specs}
    assert all(id(obj) in registered for obj in kernel_objects)
    for prefix in ("idle_cls_logit[", "idle_gather_rows[", "idle_scatter_rows[", "idle_cut_loss_fwd[",
                   "idle_cut_loss_bwd["):
        for dtype in ("float32", "float16", "bfloat16"):
            assert any(s.name.startswith(prefix + dtype) for s in specs), f"no AOT spec {prefix}{dtype}...]"
