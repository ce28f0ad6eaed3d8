"""BAT (Long et al., CVPR 2023): the reference against a loop-by-loop statement of the method and a
hand-computed example, the fused Triton kernels against the reference (index map, values, gradients;
interpreter on CPU), edge cases, and ``method="bat"`` of the timm patch.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

import fastprune.patch as fpatch
from conftest import DEVICE
from fastprune.bat import BATCounts, bat, bat_index, bat_plan, bat_reference, bat_tokens
from fastprune.kernels import aot
from fastprune.kernels.bat import bat_index_triton

#: (dtype, atol, rtol) of tokens and of dL/dx.
DTYPES = [(torch.float32, 1e-5, 1e-5), (torch.float16, 2e-3, 2e-3), (torch.bfloat16, 1.6e-2, 1.6e-2)]


def _inputs(B, N, C, Cm, dtype=torch.float32, metric_dtype=None, device=DEVICE):
    x = torch.randn(B, N, C, device=device).to(dtype)
    attn = torch.rand(B, N, device=device).softmax(dim=-1)
    size = torch.rand(B, N, device=device) * 3 + 0.5
    metric = torch.randn(B, N, Cm, device=device).to(metric_dtype or dtype)
    return x, attn, size, metric


# ----------------------------------------------------------------------------------------------------
# The method, loop by loop (the test's own statement of METHODS.md, in float64 Python)
# ----------------------------------------------------------------------------------------------------
def brute_force_index(scores, metric, counts: BATCounts, p: int) -> list:
    """Index map of one image: ``scores`` [N] and ``metric`` [N, Cm] as Python lists."""
    K, r, c, k = counts
    N = len(scores)
    ranked = sorted(range(p, N), key=lambda i: (-scores[i], i))
    attentive, inattentive = sorted(ranked[:K]), sorted(ranked[K:])

    def cosine(i, j):
        dot = sum(u * v for u, v in zip(metric[i], metric[j]))
        return dot / (max(math.sqrt(sum(u * u for u in metric[i])), 1e-6)
                      * max(math.sqrt(sum(v * v for v in metric[j])), 1e-6))

    set_a, set_b = attentive[0::2], attentive[1::2]
    partner = {a: max(set_b, key=lambda b: (cosine(a, b), -b)) for a in set_a} if set_b else {}
    merged = sorted(set_a, key=lambda a: (-cosine(a, partner[a]), a))[:r] if r else []
    survivors = [i for i in range(N) if i < p or (i in attentive and i not in merged)]
    index = [None] * N
    for slot, i in enumerate(survivors):
        index[i] = slot
    for a in merged:
        index[a] = survivors.index(partner[a])
    if c == 0:
        return index

    cm = len(metric[0])

    def dist(i, j):
        return math.sqrt(sum((u - v) ** 2 for u, v in zip(metric[i], metric[j]))) / math.sqrt(cm)

    log_rho = {i: -sum(sorted(dist(i, j) ** 2 for j in inattentive if j != i)[:k]) / k if k else 0.0
               for i in inattentive}
    delta = {}
    for i in inattentive:
        denser = [j for j in inattentive if log_rho[j] > log_rho[i] or (log_rho[j] == log_rho[i] and j < i)]
        delta[i] = min(dist(i, j) for j in denser) if denser else max([dist(i, j) for j in inattentive], default=0.0)
    score = {i: log_rho[i] + (math.log(delta[i]) if delta[i] > 0 else -math.inf) for i in inattentive}
    centres = sorted(sorted(inattentive, key=lambda i: (-score[i], i))[:c])
    for i in inattentive:
        nearest = i if i in centres else min(centres, key=lambda j: (dist(i, j), j))
        index[i] = p + K - r + centres.index(nearest)
    return index


@pytest.mark.parametrize("B,N,Cm,p,keep_rate,clusters,pairs,k", [
    (2, 14, 3, 1, 0.5, 3, None, 2),
    (1, 17, 4, 0, 0.3, 4, 2, 5),
    (2, 20, 5, 2, 0.7, 9, 3, 3),
    (1, 12, 2, 1, 0.05, 2, None, 5),
])
def test_reference_matches_the_loop_by_loop_statement(B, N, Cm, p, keep_rate, clusters, pairs, k):
    scores = torch.rand(B, N, dtype=torch.float64)
    metric = torch.randn(B, N, Cm, dtype=torch.float64)
    counts = bat_plan(N, p, keep_rate, clusters, pairs, k)
    index = bat_index(scores, metric, counts, p)
    for b in range(B):
        assert index[b].tolist() == brute_force_index(scores[b].tolist(), metric[b].tolist(), counts, p)


def test_hand_computed_example():
    """Cls token, two attentive tokens (2 and 5) matched into one, six inattentive tokens on a line at
    0, 0.25, 0.5 and 3, 3.25, 3.5: DPC-kNN (k = 2) finds the centres 0.25 and 3.25."""
    scores = torch.tensor([[0.3, 0.01, 0.2, 0.02, 0.03, 0.3, 0.04, 0.05, 0.05]])
    line = {1: 0.0, 3: 0.25, 4: 0.5, 6: 3.0, 7: 3.25, 8: 3.5, 0: 9.0, 2: 1.0, 5: 1.5}
    metric = torch.tensor([[[line[i]] for i in range(9)]])
    x = torch.randn(1, 9, 4)
    # K = ceil(0.25 * 8) = 2 attentive tokens; c = 2 clusters, so r = 1 pair (EViT's count: 1 + 2 + 1).
    counts = bat_plan(9, 1, 0.25, num_clusters=2, k=2)
    assert counts == BATCounts(K=2, r=1, c=2, k=2) and counts.output_tokens(1) == 4
    want_index = torch.tensor([[0, 2, 1, 2, 2, 1, 3, 3, 3]])
    for backend in ("reference", "triton"):
        out = bat_tokens(x.to(DEVICE), scores.to(DEVICE), 0.25, metric=metric.to(DEVICE), num_clusters=2, k=2,
                         backend=backend)
        assert torch.equal(out.index.cpu(), want_index), backend
        w = scores[0]  # size 1: the merge weights are the class attention
        for members, slot in (([2, 5], 1), ([1, 3, 4], 2), ([6, 7, 8], 3)):
            want = (w[members, None] * x[0, members]).sum(0) / w[members].sum()
            torch.testing.assert_close(out.x[0, slot].cpu(), want)
        assert torch.equal(out.x[0, 0].cpu(), x[0, 0])
        assert out.size.cpu().tolist() == [[1.0, 2.0, 3.0, 3.0]]


def test_counts_and_clipping():
    assert bat_plan(197, 1, 0.7) == BATCounts(K=138, r=9, c=10, k=5)  # 140 tokens out, as EViT
    assert bat_plan(197, 1, 0.7).output_tokens(1) == 140
    assert bat_plan(10, 1, 0.7, num_clusters=50) == BATCounts(K=7, r=1, c=2, k=1)  # c clipped to N - p - K
    assert bat_plan(10, 1, 0.7, num_pairs=9) == BATCounts(K=7, r=3, c=2, k=1)  # r clipped to K // 2
    assert bat_plan(10, 1, 0.01) == BATCounts(K=1, r=0, c=8, k=5)  # one attentive token: nothing to match
    assert bat_plan(10, 1, 1.0) == BATCounts(K=9, r=0, c=0, k=0)  # keep rate 1: a no-op


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_keep_rate_one_is_a_no_op(backend):
    x, attn, size, metric = _inputs(2, 9, 4, 3)
    out = bat_tokens(x, attn, 1.0, size=size, metric=metric, backend=backend)
    assert out.x is x and out.size is size and torch.equal(out.index, torch.arange(9).expand(2, 9))
    matched = bat_tokens(x, attn, 1.0, metric=metric, num_pairs=2, backend=backend)  # matching only
    assert matched.x.shape == (2, 7, 4)


def test_reference_gradcheck_float64():
    x = torch.randn(1, 10, 2, dtype=torch.float64, requires_grad=True)
    scores = torch.rand(1, 10, dtype=torch.float64).softmax(-1).requires_grad_()
    metric = torch.randn(1, 10, 4, dtype=torch.float64)
    size = torch.rand(1, 10, dtype=torch.float64) + 0.5
    assert torch.autograd.gradcheck(
        lambda x, s: bat_reference(x, s, 0.5, size=size, metric=metric, num_clusters=3, k=2).x, (x, scores))


def test_bat_returns_the_tokens_of_bat_tokens():
    x, attn, _, metric = _inputs(2, 11, 4, 3)
    assert torch.equal(bat(x, attn, 0.5, metric=metric), bat_tokens(x, attn, 0.5, metric=metric).x)


# ----------------------------------------------------------------------------------------------------
# The fused kernels against the reference (interpreter on CPU)
# ----------------------------------------------------------------------------------------------------
#: (B, N, C, Cm, p, keep rate, clusters, pairs, k): p = 0 / 1 / 2, B = 1, explicit pairs, one attentive
#: token, more clusters than inattentive tokens, keep rate 1 with pairs (matching only), and N, n large
#: enough for several row tiles in both kernels.
CASES = [
    (1, 9, 5, 3, 0, 0.5, 2, None, 2),
    (2, 23, 24, 16, 1, 0.7, 5, None, 5),
    (2, 37, 40, 20, 2, 0.3, 4, 6, 3),
    (1, 21, 16, 8, 1, 0.01, 3, None, 5),
    (2, 20, 16, 8, 1, 0.5, 50, None, 5),
    (2, 30, 16, 8, 1, 1.0, 3, 4, 5),
    (1, 90, 16, 8, 1, 0.2, 6, None, 4),
]


def _check_kernel(case, dtype, atol, rtol, metric_dtype=None):
    B, N, C, Cm, p, keep_rate, clusters, pairs, k = case
    x, attn, size, metric = _inputs(B, N, C, Cm, dtype, metric_dtype)
    x.requires_grad_()
    attn.requires_grad_()
    kwargs = dict(size=size, metric=metric, num_prefix_tokens=p, num_clusters=clusters, num_pairs=pairs, k=k)
    got = bat_tokens(x, attn, keep_rate, backend="triton", **kwargs)
    want = bat_tokens(x, attn, keep_rate, backend="reference", **kwargs)

    S = bat_plan(N, p, keep_rate, clusters, pairs, k).output_tokens(p)
    assert got.x.shape == (B, S, C) and got.x.dtype == dtype
    assert got.index.dtype == torch.int64 and got.size.dtype == torch.float32
    assert torch.equal(got.index, want.index), f"index maps differ:\n{got.index}\n{want.index}"
    torch.testing.assert_close(got.x.float(), want.x.float(), atol=atol, rtol=rtol)
    torch.testing.assert_close(got.size, want.size)
    for b in range(B):  # tokens alone in their output token are copied bit for bit
        counts = torch.bincount(want.index[b], minlength=S)
        alone = counts[want.index[b]] == 1
        assert torch.equal(got.x[b, want.index[b][alone]], x[b][alone])

    g = torch.randn_like(got.x)
    gx, ga = torch.autograd.grad(got.x, (x, attn), g)
    wx, wa = torch.autograd.grad(want.x, (x, attn), g)
    torch.testing.assert_close(gx.float(), wx.float(), atol=atol, rtol=rtol)
    scale = wa.abs().max().item() + 1e-6  # dL/da sums C products: compare relative to its magnitude
    torch.testing.assert_close(ga / scale, wa / scale, atol=8 * atol, rtol=0)


@pytest.mark.parametrize("case", CASES)
def test_kernel_matches_reference_float32(case):
    _check_kernel(case, *DTYPES[0])


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES[1:])
@pytest.mark.parametrize("case", [CASES[1], CASES[2]])
def test_kernel_matches_reference_half(case, dtype, atol, rtol):
    _check_kernel(case, dtype, atol, rtol)


def test_kernel_metric_of_another_dtype_and_strided():
    _check_kernel(CASES[1], *DTYPES[0], metric_dtype=torch.bfloat16)
    x, attn, _, _ = _inputs(2, 24, 19, 4)
    metric = torch.randn(2, 8, 19, device=DEVICE).transpose(1, 2)  # [2, 19, 8], not contiguous
    x = x.transpose(1, 2)  # [2, 19, 24]
    got = bat_tokens(x, attn[:, :19], 0.5, metric=metric, backend="triton")
    want = bat_tokens(x, attn[:, :19], 0.5, metric=metric, backend="reference")
    assert torch.equal(got.index, want.index)
    torch.testing.assert_close(got.x, want.x)


@pytest.mark.filterwarnings("ignore:divide by zero encountered in log")  # delta = 0 for duplicates: log 0 = -inf
def test_kernel_tie_breaks_match_the_reference():
    """Duplicated tokens on an exact grid: equal similarities, distances and densities everywhere.
    Every tie must go to the lower index in the kernels as in the reference."""
    B, N, p = 2, 26, 1
    scores = torch.rand(B, N, device=DEVICE)
    grid = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 2.0]], device=DEVICE)
    metric = grid[torch.arange(N, device=DEVICE) % 5].expand(B, N, 2).contiguous()
    for pairs in (0, 6):
        counts = bat_plan(N, p, 0.4, num_clusters=4, num_pairs=pairs, k=3)
        want = bat_index(scores, metric, counts, p)
        assert torch.equal(bat_index_triton(scores, metric, counts, p), want)
    same = torch.ones(B, N, 3, device=DEVICE)  # every cosine similarity equal: partners are first B tokens
    counts = bat_plan(N, p, 0.6, num_clusters=3, num_pairs=5, k=2)
    assert torch.equal(bat_index_triton(scores, same, counts, p), bat_index(scores, same, counts, p))


# ----------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,error,match", [
    (dict(keep_rate=0.0), ValueError, "keep_rate"),
    (dict(keep_rate=2), ValueError, "keep_rate"),
    (dict(keep_rate=None), TypeError, "keep_rate"),
    (dict(num_clusters=0), ValueError, "num_clusters"),
    (dict(num_clusters=2.0), TypeError, "num_clusters"),
    (dict(num_pairs=-1), ValueError, "num_pairs"),
    (dict(k=0), ValueError, "k"),
    (dict(num_prefix_tokens=-1), ValueError, "num_prefix_tokens"),
    (dict(metric=torch.randn(2, 7, 3)), ValueError, "metric"),
    (dict(metric=torch.randn(2, 8, 3).long()), TypeError, "metric"),
    (dict(backend="numpy"), ValueError, "backend"),
])
def test_bad_arguments_raise(kwargs, error, match):
    args = dict(x=torch.randn(2, 8, 4), attn=torch.rand(2, 8), keep_rate=0.5)
    args.update(kwargs)
    x, attn, keep_rate = args.pop("x"), args.pop("attn"), args.pop("keep_rate")
    with pytest.raises(error, match=match):
        bat_tokens(x, attn, keep_rate, **args)


def test_kernels_are_registered_for_ahead_of_time_compilation():
    names = [s.name for s in aot.registered_specs()]
    assert any(n.startswith("bat_match[") for n in names) and any(n.startswith("bat_cluster[") for n in names)
    for dtype in ("float32", "float16", "bfloat16"):
        assert any(n.startswith("bat_") and dtype in n for n in names)


# ----------------------------------------------------------------------------------------------------
# timm patch
# ----------------------------------------------------------------------------------------------------
def test_patched_vit_follows_the_papers_schedule():
    model = VisionTransformer(img_size=224, patch_size=16, embed_dim=24, depth=12, num_heads=2, num_classes=5)
    fpatch.timm(model.eval(), method="bat", r=0.7)
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    st = fpatch.state(model)
    assert st.num_tokens == [197] * 4 + [140] * 3 + [100] * 3 + [72] * 2  # EViT's counts
    assert st.r_applied == fpatch.reduction_schedule(model) == [0, 0, 0, 57, 0, 0, 40, 0, 0, 28, 0, 0]
    assert st.size.sum().item() == 197 and st.index.max().item() == 71
    fpatch.timm(model, method="bat", r=0.7, num_clusters=10, num_pairs=0)
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    assert fpatch.state(model).num_tokens == [197] * 4 + [149] * 3 + [115] * 3 + [91] * 2  # 1 + 138 + 10, ...
    assert fpatch.reduction_schedule(model) == fpatch.state(model).r_applied == [0, 0, 0, 48, 0, 0, 34, 0, 0, 24, 0, 0]


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_one_optimiser_step_lowers_the_loss(backend):
    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=5,
                              global_pool="avg", class_token=True)
    fpatch.timm(model.train(), method="bat", r=0.5, layers=(1, 2), num_clusters=3, backend=backend)
    images, labels = torch.randn(4, 3, 32, 32), torch.arange(4)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.05)
    loss = F.cross_entropy(model(images), labels)
    loss.backward()
    assert model.blocks[2].attn.qkv.weight.grad.abs().sum() > 0
    optimiser.step()
    with torch.no_grad():
        assert F.cross_entropy(model(images), labels).item() < loss.item()
    assert fpatch.state(model).num_tokens == [17, 17, 10, 7]  # EViT's counts: 1 + 8 + 1, 1 + 5 + 1


def test_patch_bad_arguments_raise():
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=16, depth=4, num_heads=2, num_classes=5)
    with pytest.raises(TypeError, match="keep rate"):
        fpatch.timm(model, method="bat", r=[0, 1, 0, 1])
    with pytest.raises(ValueError, match="layers"):
        fpatch.timm(model, method="bat", r=0.7, layers=(4,))
    with pytest.raises(ValueError, match="metric"):
        fpatch.timm(model, method="bat", r=0.7, layers=(1,), metric="q")
    with pytest.raises(ValueError, match="num_clusters"):
        fpatch.timm(model, method="bat", r=0.7, layers=(1,), num_clusters=0)
    with pytest.raises(TypeError, match="unexpected option"):
        fpatch.timm(model, method="bat", r=0.7, layers=(1,), clusters=3)
