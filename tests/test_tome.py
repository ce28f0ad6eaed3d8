"""ToMe (Bolya et al., ICLR 2023): reference vs the published algorithm, kernels vs reference, schedules.

Kernel tests run the Triton kernels through the interpreter on CPU (``TRITON_INTERPRET=1`` from
conftest) or compiled on CUDA; shapes are kept small because the interpreter costs ~1.6 ms per program.
"""
import math

import pytest
import torch

from fastprune.tome import (bipartite_soft_matching, tome_merge, tome_merge_reference, tome_merge_tokens,
                            tome_schedule, tome_token_counts)

from conftest import DEVICE


# --------------------------------------------------------------------------------------------------
# An independent statement of the published algorithm, one image at a time, in float64
# --------------------------------------------------------------------------------------------------
def published_tome(x, metric, size, r, class_token, distill_token):
    """ToMe as published, for one image ``x [N, C]``: returns ``(tokens, sizes)`` in the published order.

    Written from the paper's description with plain Python loops: A = even, B = odd positions; the
    class token (A position 0) never merges, nothing merges into the distillation token (B position
    0); the r A tokens with the best matches merge into their best partner (size-weighted average);
    output = unmerged A tokens (sorted by position when there is a class token, else in descending
    score order), then B tokens. Ties: lower index (the published sort leaves them unspecified).
    """
    N = x.shape[0]
    r = min(r, (N - int(class_token) - int(distill_token)) // 2)
    m = metric.double()
    m = m / m.norm(dim=-1, keepdim=True)
    A, Bs = list(range(0, N, 2)), list(range(1, N, 2))
    best = {}
    for a in A:
        if class_token and a == 0:
            best[a] = (-math.inf, None)
            continue
        cands = [b for b in Bs if not (distill_token and b == 1)]
        sims = [float(m[a] @ m[b]) for b in cands]
        k = max(range(len(cands)), key=lambda i: (sims[i], -i))
        best[a] = (sims[k], cands[k])
    ranked = sorted(A, key=lambda a: (-best[a][0], a))
    merged, unmerged = ranked[:r], ranked[r:]
    if class_token:
        unmerged = sorted(unmerged)
    acc = {b: (size[b].double() * x[b].double(), size[b].double()) for b in Bs}
    for a in merged:
        b = best[a][1]
        acc[b] = (acc[b][0] + size[a].double() * x[a].double(), acc[b][1] + size[a].double())
    tokens = [x[a].double() for a in unmerged] + [acc[b][0] / acc[b][1] for b in Bs]
    sizes = [size[a].double() for a in unmerged] + [acc[b][1] for b in Bs]
    return torch.stack(tokens), torch.stack(sizes), unmerged


@pytest.mark.parametrize("N,r", [(11, 3), (12, 5), (17, 8), (30, 13)])
def test_reference_matches_published_with_class_token(N, r):
    """p = 1: same kept tokens, same merged values, same output order as the published algorithm."""
    B, C = 3, 6
    x, metric = torch.randn(B, N, C), torch.randn(B, N, 5)
    size = torch.randint(1, 5, (B, N)).float()
    got = tome_merge_reference(x, r, size=size, metric=metric, num_prefix_tokens=1)
    for b in range(B):
        tokens, sizes, _ = published_tome(x[b], metric[b], size[b], r, True, False)
        torch.testing.assert_close(got.x[b].double(), tokens, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got.size[b].double(), sizes)


def test_reference_matches_published_with_distillation_token():
    """p = 2: same tokens and values; the distillation token stays at position 1 (documented choice)."""
    B, N, C, r = 2, 15, 4, 6
    x, metric, size = torch.randn(B, N, C), torch.randn(B, N, 3), torch.rand(B, N) + 0.5
    got = tome_merge_reference(x, r, size=size, metric=metric, num_prefix_tokens=2)
    for b in range(B):
        tokens, sizes, unmerged = published_tome(x[b], metric[b], size[b], r, True, True)
        n_unm = len(unmerged)  # published: [cls, unmerged A..., dist, other B...]
        order = [0, n_unm] + list(range(1, n_unm)) + list(range(n_unm + 1, N - r))
        torch.testing.assert_close(got.x[b].double(), tokens[order], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got.size[b].double(), sizes[order])
        assert torch.equal(got.x[b, 1], x[b, 1])


def test_reference_matches_published_without_prefix():
    """p = 0: same tokens and values; unmerged A tokens keep their original order (METHODS.md)."""
    B, N, C, r = 2, 14, 4, 7
    x, metric = torch.randn(B, N, C), torch.randn(B, N, 3)
    size = torch.ones(B, N)
    got = tome_merge_reference(x, r, size=size, metric=metric, num_prefix_tokens=0)
    for b in range(B):
        tokens, sizes, unmerged = published_tome(x[b], metric[b], size[b], r, False, False)
        n_unm = len(unmerged)
        by_position = sorted(range(n_unm), key=lambda i: unmerged[i])
        order = by_position + list(range(n_unm, N - r))
        torch.testing.assert_close(got.x[b].double(), tokens[order], rtol=1e-5, atol=1e-6)


def test_matching_structure():
    """Index map: prefix to itself, output = prefix, unmerged A, B in order; merged A -> partner's slot."""
    B, N, p, r = 2, 21, 3, 7
    metric = torch.randn(B, N, 8)
    mt = bipartite_soft_matching(metric, r, p)
    assert mt.n_out == N - r and mt.index.shape == (B, N)
    assert torch.equal(mt.merged.sum(1), torch.full((B,), r))
    pos = torch.arange(N)
    for b in range(B):
        idx = mt.index[b]
        assert torch.equal(idx[:p], pos[:p])
        stays = torch.ones(N, dtype=torch.bool)
        stays[0::2] = ~mt.merged[b]
        kept = pos[stays]
        expected_order = torch.cat([kept[kept < p], kept[(kept >= p) & (kept % 2 == 0)],
                                    kept[(kept >= p) & (kept % 2 == 1)]])
        assert torch.equal(idx[expected_order], torch.arange(N - r))
        for a in range(mt.merged.shape[1]):
            if mt.merged[b, a]:
                assert 2 * a >= p
                partner_pos = 2 * int(mt.partner[b, a]) + 1
                assert partner_pos >= p and idx[2 * a] == idx[partner_pos]


def test_gradcheck_reference_float64():
    B, N, C, r = 2, 9, 4, 3
    x = torch.randn(B, N, C, dtype=torch.float64, requires_grad=True)
    size = (torch.rand(B, N, dtype=torch.float64) + 0.5).requires_grad_()
    metric = torch.randn(B, N, 3, dtype=torch.float64)

    def f(x, size):
        out = tome_merge_reference(x, r, size=size, metric=metric, num_prefix_tokens=1)
        return out.x, out.size

    assert torch.autograd.gradcheck(f, (x, size), fast_mode=True)


# --------------------------------------------------------------------------------------------------
# Kernels vs reference
# --------------------------------------------------------------------------------------------------
KERNEL_CASES = [
    # B, N, C, Cm, p, r
    (2, 13, 8, 5, 1, 4),
    (1, 37, 70, 33, 1, 18),  # B = 1, r = (N - p) // 2, C and Cm over one tile
    (3, 9, 5, 4, 0, 4),      # no prefix token
    (2, 20, 16, 3, 2, 9),    # class + distillation token
    (2, 50, 24, 16, 5, 20),  # class + 4 register tokens, several B tiles
    (2, 4, 3, 2, 2, 1),      # leaves one non-prefix token
]


@pytest.mark.parametrize("B,N,C,Cm,p,r", KERNEL_CASES)
@pytest.mark.parametrize("with_size", [False, True])
def test_kernel_matches_reference(B, N, C, Cm, p, r, with_size):
    x = torch.randn(B, N, C, device=DEVICE)
    metric = torch.randn(B, N, Cm, device=DEVICE)
    size = (torch.randint(1, 6, (B, N), device=DEVICE).float()) if with_size else None
    got = tome_merge_tokens(x, r, metric=metric, size=size, num_prefix_tokens=p, backend="triton")
    ref = tome_merge_tokens(x, r, metric=metric, size=size, num_prefix_tokens=p, backend="reference")
    assert torch.equal(got.index, ref.index)
    torch.testing.assert_close(got.x, ref.x, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.size, ref.size)
    assert got.x.shape == (B, N - r, C) and got.size.dtype == torch.float32 and got.index.dtype == torch.int64
    # prefix tokens and tokens that absorbed nothing are copied bit-exactly
    assert torch.equal(got.x[:, :p], x[:, :p])
    for b in range(B):
        counts = torch.bincount(got.index[b], minlength=N - r)
        lone = (counts == 1).nonzero().flatten()
        src = torch.stack([(got.index[b] == d).nonzero().flatten()[0] for d in lone])
        assert torch.equal(got.x[b, lone], x[b, src])


def test_kernel_vit_shape():
    """ViT/16 at 224 px: 197 tokens, head-mean keys of width 64, r = 13."""
    B, N, C = 1, 197, 48
    x = torch.randn(B, N, C, device=DEVICE)
    metric = torch.randn(B, N, 64, device=DEVICE)
    got = tome_merge_tokens(x, 13, metric=metric, backend="triton")
    ref = tome_merge_tokens(x, 13, metric=metric, backend="reference")
    assert torch.equal(got.index, ref.index)
    torch.testing.assert_close(got.x, ref.x, rtol=1e-5, atol=1e-6)


def test_kernel_ties_follow_documented_rule():
    """Exact ties (one-hot metric directions): partner and score ties go to the lower index."""
    B, N, C = 2, 24, 6
    directions = torch.eye(4, device=DEVICE)
    metric = directions[torch.randint(0, 4, (B, N), device=DEVICE)] * 2.0
    x = torch.randn(B, N, C, device=DEVICE)
    got = tome_merge_tokens(x, 9, metric=metric, backend="triton")
    ref = tome_merge_tokens(x, 9, metric=metric, backend="reference")
    assert torch.equal(got.index, ref.index)
    torch.testing.assert_close(got.x, ref.x)
    for b in range(B):
        tokens, _, _ = published_tome(x[b].cpu(), metric[b].cpu(), torch.ones(N), 9, True, False)
        torch.testing.assert_close(got.x[b].double().cpu(), tokens, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernel_half_precision(dtype):
    B, N, C = 2, 19, 12
    x = torch.randn(B, N, C, device=DEVICE).to(dtype)
    metric = torch.randn(B, N, 8, device=DEVICE).to(dtype)
    size = torch.rand(B, N, device=DEVICE) * 3 + 0.5
    got = tome_merge_tokens(x, 7, metric=metric, size=size, backend="triton")
    ref = tome_merge_tokens(x, 7, metric=metric, size=size, backend="reference")
    assert got.x.dtype == dtype
    assert torch.equal(got.index, ref.index)
    tol = 1e-3 if dtype == torch.float16 else 1e-2
    torch.testing.assert_close(got.x.float(), ref.x.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_half_precision_large_values_do_not_overflow(backend):
    x = (torch.randn(2, 30, 16, device=DEVICE) * 3e4).clamp(-6e4, 6e4).half()
    x[:, :, 0] = 6e4  # size-weighted sums of these would overflow in float16
    m = tome_merge_tokens(x, 14, size=torch.full((2, 30), 100.0, device=DEVICE), backend=backend)
    assert torch.isfinite(m.x.float()).all()
    torch.testing.assert_close(m.x[:, :, 0].float(), torch.full((2, 16), 6e4, device=DEVICE))


@pytest.mark.parametrize("dtype,tol,size_tol", [(torch.float32, 1e-5, 1e-4), (torch.float16, 2e-3, 1e-2),
                                               (torch.bfloat16, 2e-2, 1e-1)])
@pytest.mark.parametrize("N,C,p,r", [(17, 10, 1, 6), (24, 33, 0, 12), (9, 5, 2, 3)])
@pytest.mark.parametrize("with_size", [False, True])
def test_kernel_gradients_match_reference(with_size, N, C, p, r, dtype, tol, size_tol):
    """Through the shared gather merge's backward: every storage dtype, odd shapes, r up to its maximum."""
    B = 2
    x = torch.randn(B, N, C, device=DEVICE).to(dtype)
    metric = torch.randn(B, N, 4, device=DEVICE)
    size = torch.randint(1, 4, (B, N), device=DEVICE).float() if with_size else None
    g_out = torch.randn(B, N - r, C, device=DEVICE)
    g_size = torch.randn(B, N - r, device=DEVICE)
    grads = {}
    for backend in ("triton", "reference"):
        xb = x.clone().requires_grad_()
        sb = size.clone().requires_grad_() if with_size else None
        out = tome_merge_tokens(xb, r, metric=metric, size=sb, num_prefix_tokens=p, backend=backend)
        loss = (out.x.float() * g_out).sum() + ((out.size * g_size).sum() if with_size else 0)
        loss.backward()
        grads[backend] = (xb.grad, sb.grad if with_size else None)
    torch.testing.assert_close(grads["triton"][0].float(), grads["reference"][0].float(), rtol=tol, atol=tol / 10)
    if with_size:
        torch.testing.assert_close(grads["triton"][1], grads["reference"][1], rtol=size_tol, atol=size_tol / 10)


def _plans_one_tile_and_general(metric, r, p):
    """The merge plan of _tome_match_select_kernel by its ONE_TILE chain (registers) as configured for
    sm_90 and for sm_80 (the candidate tiles prefetched with the sources, or loaded in turn: the same
    for a metric in channel chunks), and by its general path (16-source tiles, running argmax over
    16-candidate tiles, scratch rows, rank top-k read back)."""
    from fastprune.kernels.tome import _tome_match_select_kernel, match_select_config

    B, N, CM = metric.shape
    NS = (N + 1) // 2 - (p + 1) // 2
    consts, warps = match_select_config(N, p, CM, metric.dtype, cc=90)
    sm80, _ = match_select_config(N, p, CM, metric.dtype, cc=80)
    assert consts["ONE_TILE"] and not sm80["PREFETCH"]
    assert consts["PREFETCH"] == consts["SINGLE_CHUNK"]
    general = dict(consts, ONE_TILE=False, J_TILES=1, BLOCK_I=16, BLOCK_J=16)
    plans = []
    for c, w in ((consts, warps), (sm80, warps), (general, 4)):
        score = torch.empty(B, NS, device=DEVICE)
        partner = torch.empty(B, NS, dtype=torch.int32, device=DEVICE)
        plan = torch.full((B, 2 * N + r), -7, dtype=torch.int64, device=DEVICE)
        _tome_match_select_kernel[(B,)](metric, metric.stride(0), metric.stride(1), score, partner, plan,
                                        N, (N + 1) // 2, N // 2, p, r, CM, **c, num_warps=w)
        plans.append(plan)
    return plans


@pytest.mark.parametrize("N,p,r", [(197, 1, 1), (197, 1, 98), (197, 1, 13), (40, 2, 19), (23, 0, 11), (6, 3, 1)])
@pytest.mark.parametrize("Cm,dtype", [(64, torch.float32), (32, torch.float32), (64, torch.float16)])
def test_one_tile_chain_equals_general_path(N, p, r, Cm, dtype):
    """ViT/16 at 224 px and odd shapes, r at its bounds: the register chain (both candidate tiles,
    prefetched or not, rank top-k of the best scores, lists gathered in registers) writes the general
    path's plan, and for float32 the reference's index; exact ties (one-hot metric) and NaN rows
    included. A float32 metric of 64 channels is matched in chunks, 32 channels and float16 in one."""
    B = 2
    metric = torch.randn(B, N, Cm, device=DEVICE)
    metric[1] = torch.eye(Cm, device=DEVICE)[torch.randint(0, 3, (N,), device=DEVICE)] * 3.0  # ties everywhere
    metric[0, min(N - 1, p + 4)] = float("nan")  # a NaN similarity wins its row and ranks first
    metric = metric.to(dtype)
    prefetched, in_turn, general = _plans_one_tile_and_general(metric, r, p)
    assert torch.equal(prefetched, general) and torch.equal(in_turn, general)
    if dtype != torch.float32:
        return
    x = torch.randn(B, N, 8, device=DEVICE)
    ref = tome_merge_tokens(x, r, metric=torch.nan_to_num(metric, nan=0.0), num_prefix_tokens=p,
                            backend="reference")
    got = tome_merge_tokens(x, r, metric=torch.nan_to_num(metric, nan=0.0), num_prefix_tokens=p, backend="triton")
    assert torch.equal(got.index, ref.index)


def test_one_tile_chain_configuration():
    """ViT/16 at 224 px runs the register chain (two 64-candidate tiles, 8 warps for 16-bit metrics,
    16 for float32); 577 and 2049 tokens the general path."""
    from fastprune.kernels.tome import match_select_config

    consts, warps = match_select_config(197, 1, 64, torch.bfloat16, compiled=True)
    assert consts["ONE_TILE"] and (consts["BLOCK_I"], consts["BLOCK_J"], consts["J_TILES"], warps) == (128, 64, 2, 8)
    assert consts["PREFETCH"] and not match_select_config(197, 1, 64, torch.bfloat16, compiled=True, cc=80)[0]["PREFETCH"]
    consts, warps = match_select_config(197, 1, 64, torch.float32, compiled=True)
    assert consts["ONE_TILE"] and (consts["BLOCK_I"], consts["BLOCK_J"], consts["J_TILES"], warps) == (128, 64, 2, 16)
    for N in (577, 2049):
        assert not match_select_config(N, 1, 64, torch.float16)[0]["ONE_TILE"]


def test_kernels_registered_for_ahead_of_time_compilation():
    """tests/test_aot.py compiles every registered spec for sm_80 and sm_90; ToMe's launches are there
    (its fused matching + selection at N = 197 in every dtype, and at 577 and 2049 tokens)."""
    from fastprune.kernels import aot

    names = [s.name for s in aot.registered_specs()]
    for dtype in ("float32", "float16", "bfloat16"):
        for kernel in (f"tome_match_select[{dtype},N=197,Cm=64]", f"tome_merge[{dtype},ones]",
                       f"tome_merge[{dtype},size]", f"tome_merge_backward[{dtype},size]"):
            assert kernel in names
    assert {"tome_match_select[bfloat16,N=577,Cm=64]", "tome_match_select[float16,N=2049,Cm=64]"} <= set(names)


def test_no_gradient_reaches_metric():
    x = torch.randn(1, 11, 4, device=DEVICE, requires_grad=True)
    metric = torch.randn(1, 11, 4, device=DEVICE, requires_grad=True)
    out = tome_merge_tokens(x, 4, metric=metric, backend="triton")
    out.x.sum().backward()
    assert metric.grad is None and x.grad is not None


# --------------------------------------------------------------------------------------------------
# Front door: edge cases and errors
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_r_zero_and_clipping(backend):
    x = torch.randn(2, 10, 4, device=DEVICE)
    m = tome_merge_tokens(x, 0, backend=backend)
    assert m.x is x and torch.equal(m.index, torch.arange(10, device=DEVICE).expand(2, 10))
    assert tome_merge(x, 0, backend=backend) is x
    # r is clipped to (N - p) // 2 = 4
    big = tome_merge_tokens(x, 100, backend=backend)
    assert big.x.shape == (2, 6, 4)
    torch.testing.assert_close(big.size.sum(1), torch.full((2,), 10.0, device=DEVICE))
    # nothing can merge when only one non-prefix token exists
    assert tome_merge_tokens(x[:, :2], 5, backend=backend).x is not None
    assert tome_merge_tokens(x[:, :2], 5, backend=backend).x.shape == (2, 2, 4)


def test_auto_backend_on_cpu_equals_reference():
    """On CPU "auto" runs the C++ kernels when the extension is built (else the reference): bit-equal."""
    x = torch.randn(2, 10, 4)
    a = tome_merge_tokens(x, 3)
    b = tome_merge_tokens(x, 3, backend="reference")
    assert torch.equal(a.x, b.x) and torch.equal(a.index, b.index)


x0 = torch.randn(2, 10, 4)


@pytest.mark.parametrize("call,exc,words", [
    (lambda: tome_merge(x0[0], 2), ValueError, "x must have shape [B, N, C]"),
    (lambda: tome_merge(x0.long(), 2), TypeError, "x must be float32"),
    (lambda: tome_merge(x0, -1), ValueError, "r must be >= 0"),
    (lambda: tome_merge(x0, 2.0), TypeError, "r must be an int"),
    (lambda: tome_merge(x0, True), TypeError, "r must be an int"),
    (lambda: tome_merge(x0, 2, num_prefix_tokens=10), ValueError, "num_prefix_tokens must satisfy"),
    (lambda: tome_merge(x0, 2, num_prefix_tokens=-1), ValueError, "num_prefix_tokens must satisfy"),
    (lambda: tome_merge(x0, 2, size=torch.ones(2, 9)), ValueError, "size must have shape"),
    (lambda: tome_merge(x0, 2, size=torch.ones(2, 10, dtype=torch.long)), TypeError, "size must be a floating"),
    (lambda: tome_merge(x0, 2, metric=torch.ones(2, 9, 3)), ValueError, "metric must have shape"),
    (lambda: tome_merge(x0, 2, metric=torch.ones(2, 10, 3, dtype=torch.float64)), TypeError,
     "metric must be float32"),
    (lambda: tome_merge(x0, 2, backend="cuda"), ValueError, "backend must be one of"),
    (lambda: tome_merge(x0, 2, metric=x0.to("meta")), ValueError, "metric is on meta"),
])
def test_invalid_inputs_raise(call, exc, words):
    with pytest.raises(exc) as info:
        call()
    assert words in str(info.value)


# --------------------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------------------
def test_constant_and_list_schedules():
    assert tome_schedule(13, 12) == [13] * 12
    assert tome_schedule([0, 1, 2], 3) == [0, 1, 2]
    assert tome_token_counts(197, tome_schedule(13, 12)) == [197 - 13 * (l + 1) for l in range(12)]
    assert tome_token_counts(197, tome_schedule(13, 12))[-1] == 41
    # r = 16 over 12 blocks: the last block is clipped to (21 - 1) // 2 = 10
    assert tome_token_counts(197, tome_schedule(16, 12))[-2:] == [21, 11]
    assert tome_token_counts(198, [16] * 12, num_prefix_tokens=2)[-1] == 12


@pytest.mark.parametrize("r,L", [(13, 12), (8, 12), (2, 12), (1, 5), (7, 2), (30, 24)])
def test_decreasing_schedule(r, L):
    s = tome_schedule(r, L, "decreasing")
    assert len(s) == L and sum(s) == r * L
    assert s[0] == 2 * r and s[-1] == 0
    assert all(a >= b for a, b in zip(s, s[1:]))
    exact = [2 * r * (L - 1 - l) / (L - 1) for l in range(L)]
    assert all(abs(v - e) < 1 for v, e in zip(s, exact))


def test_decreasing_schedule_example():
    assert tome_schedule(13, 12, "decreasing") == [26, 24, 21, 19, 17, 14, 12, 9, 7, 5, 2, 0]
    assert tome_schedule(5, 1, "decreasing") == [5]


@pytest.mark.parametrize("call,exc,words", [
    (lambda: tome_schedule(-1, 12), ValueError, "r must be >= 0"),
    (lambda: tome_schedule(1.5, 12), TypeError, "r must be an int"),
    (lambda: tome_schedule([1, 2], 12), ValueError, "num_layers=12 entries"),
    (lambda: tome_schedule([1, -2], 2), ValueError, "r[1] must be >= 0"),
    (lambda: tome_schedule([1, 2], 2, "decreasing"), ValueError, "needs an int r"),
    (lambda: tome_schedule(3, 12, "increasing"), ValueError, "schedule must be one of"),
    (lambda: tome_schedule(3, 0), ValueError, "num_layers must satisfy"),
])
def test_schedule_errors(call, exc, words):
    with pytest.raises(exc) as info:
        call()
    assert words in str(info.value)


# --------------------------------------------------------------------------------------------------
# timm patch: method="tome"
# --------------------------------------------------------------------------------------------------
def make_vit(depth=3, **kwargs):
    """A small random-init timm ViT: 32 px images, 8 px patches -> 16 patches + class token = 17 tokens."""
    from timm.models.vision_transformer import VisionTransformer

    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=depth, num_heads=2, num_classes=7)
    args.update(kwargs)
    return VisionTransformer(**args).eval()


def published_tome_vit_forward(model, images, r):
    """A patched ViT as the ToMe paper describes it, written out by hand: every block runs attention with
    proportional attention (``+log size`` on every key), then ToMe on the head-mean keys (the published
    algorithm above, image by image), then the MLP."""
    x = model.patch_embed(images)
    x = model._pos_embed(x)
    x = model.norm_pre(x)
    size = torch.ones(x.shape[0], x.shape[1])
    for blk in model.blocks:
        attn = blk.attn
        B, N, C = x.shape
        qkv = attn.qkv(blk.norm1(x)).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        a = (q * attn.scale) @ k.transpose(-2, -1) + size.log()[:, None, None, :]
        out = (a.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, N, C)
        x = x + attn.proj(out)
        metric = k.mean(dim=1)
        merged = [published_tome(x[b], metric[b], size[b], r, True, False) for b in range(B)]
        x = torch.stack([t for t, _, _ in merged]).float()
        size = torch.stack([s for _, s, _ in merged]).float()
        x = x + blk.mlp(blk.norm2(x))
    return model.forward_head(model.norm(x))


def test_patched_vit_predicts_like_the_published_algorithm():
    import fastprune.patch as fpatch

    model = make_vit()
    for blk in model.blocks:
        blk.attn.fused_attn = False  # the explicit softmax path, as written out above
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = published_tome_vit_forward(model, images, 3)
        fpatch.timm(model, method="tome", r=3)
        got = model(images)
    assert fpatch.state(model).num_tokens == [17, 14, 11]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_patch_defaults_and_no_op():
    import fastprune.patch as fpatch

    model = make_vit(global_pool="avg")
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(images)
        fpatch.timm(model, method="tome", r=0)
        assert torch.equal(model(images), expected)
        fpatch.timm(model, method="tome", r=1.0)  # keep rate 1: nothing merged
        assert torch.equal(model(images), expected)
        fpatch.timm(model, method="tome", r=5)
        model(images)
    st = fpatch.state(model)
    assert st.options["prop_attn"] is True and st.options["metric"] == "keys"
    assert st.num_tokens == [17, 12, 7]  # tokens entering each block: 17 - 5, then 12 - 5
    assert st.size.shape == (2, 4) and torch.equal(st.size.sum(1), torch.full((2,), 17.0))
    fpatch.revert(model)
    with torch.no_grad():
        assert torch.equal(model(images), expected)


@pytest.mark.parametrize("kwargs,p", [(dict(reg_tokens=4), 5), (dict(reg_tokens=1, no_embed_class=True), 2)])
def test_patch_keeps_prefix_tokens_in_front(kwargs, p):
    import fastprune.patch as fpatch

    model = make_vit(**kwargs)
    images = torch.randn(2, 3, 32, 32)
    fpatch.timm(model, method="tome", r=4)
    with torch.no_grad():
        model(images)
    st = fpatch.state(model)
    assert st.num_tokens == [16 + p, 12 + p, 8 + p]
    assert torch.equal(st.index[:, :p], torch.arange(p).expand(2, p))
    assert st.index[:, p:].min() >= p
    torch.testing.assert_close(st.size.sum(1), torch.full((2,), 16.0 + p))


def test_patch_schedules():
    import fastprune.patch as fpatch

    model = make_vit(depth=4)
    fpatch.timm(model, method="tome", r=2, schedule="decreasing")
    assert fpatch.reduction_schedule(model) == tome_schedule(2, 4, "decreasing") == [4, 3, 1, 0]
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert fpatch.state(model).num_tokens == [17, 13, 10, 9]
    fpatch.timm(model, method="tome", r=[1, 0, 2, 100])
    assert fpatch.reduction_schedule(model) == [1, 0, 2, 6]  # last block clipped to (14 - 1) // 2
    fpatch.timm(model, method="tome", r=0.5)  # keep rate per block, clipped to (N - p) // 2
    assert fpatch.reduction_schedule(model) == [8, 4, 2, 1]


@pytest.mark.parametrize("options,exc,words", [
    (dict(metric="q"), ValueError, "metric must be one of"),
    (dict(schedule="increasing"), ValueError, "schedule must be one of"),
    (dict(backend="cuda"), ValueError, "backend must be one of"),
    (dict(r=0.5, schedule="decreasing"), ValueError, "needs an int r"),
    (dict(weight="size"), TypeError, "unexpected option"),
])
def test_patch_bad_options_raise(options, exc, words):
    import fastprune.patch as fpatch

    options = {"r": 3, **options}
    with pytest.raises(exc) as info:
        fpatch.timm(make_vit(), method="tome", **options)
    assert words in str(info.value)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_one_optimiser_step_lowers_the_loss(backend):
    """Training through ToMe: one SGD step on a patched random-init ViT lowers the loss on a fixed batch."""
    import fastprune.patch as fpatch

    model = make_vit(depth=2).to(DEVICE).train()
    fpatch.timm(model, method="tome", r=4, backend=backend)
    images = torch.randn(4, 3, 32, 32, device=DEVICE)
    labels = torch.randint(0, 7, (4,), device=DEVICE)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loss = torch.nn.functional.cross_entropy(model(images), labels)
    opt.zero_grad()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    opt.step()
    with torch.no_grad():
        after = torch.nn.functional.cross_entropy(model(images), labels)
    assert fpatch.state(model).num_tokens == [17, 13]
    assert after.item() < loss.item()
