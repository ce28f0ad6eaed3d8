"""The cosine-matching primitive (kernels/match.py) against a float64 reference.

Kernels run through the Triton interpreter on CPU (or compiled on CUDA). The kernel may choose a
different candidate than the float64 reference only when the two similarities differ by less than
``near_tie_eps(Cm)``; the reported best similarity is within that bound; exact ties (identical
candidate vectors) go to the lower candidate index; a NaN similarity wins, as in ``torch.argmax``.
"""
import random

import pytest
import torch

from conftest import DEVICE
from fastprune.kernels import aot
from fastprune.kernels.match import cosine_match_triton, near_tie_eps
from fastprune.kernels.select import select_topk_triton
from fastprune.reference import COSINE_EPS, mstm_merge

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def as_list(pos, B):
    return torch.tensor(list(pos), device=DEVICE).expand(B, -1) if isinstance(pos, range) else pos


def reference_sim(metric, sources, candidates):
    """``[B, S, M]`` float64 cosine similarities of the positions (the metric's stored values)."""
    B = metric.shape[0]
    m = metric.double()
    m = m / m.norm(dim=-1, keepdim=True).clamp_min(COSINE_EPS)
    src, cand = as_list(sources, B), as_list(candidates, B)
    ms = torch.stack([m[b, src[b]] for b in range(B)])
    mc = torch.stack([m[b, cand[b]] for b in range(B)])
    return ms @ mc.transpose(1, 2)


def check_within_tolerance(got, sim, cm):
    """The chosen candidate is the best one, or within ``near_tie_eps`` of it; the best value too."""
    eps = near_tie_eps(cm)
    best, arg = sim.max(dim=-1)
    chosen = sim.gather(2, got.partner[..., None])[..., 0]
    assert got.partner.dtype == torch.int64 and got.best.dtype == torch.float32
    assert (chosen >= best - eps).all()
    assert (got.best.double() - best).abs().max() <= eps
    top2 = sim.topk(2, dim=-1).values if sim.shape[-1] > 1 else None
    if top2 is not None:
        clear = (top2[..., 0] - top2[..., 1]) > eps  # no near-tie: the very same candidate
        assert torch.equal(got.partner[clear], arg[clear])


def random_sets(B, N, S, M):
    perm = torch.stack([torch.randperm(N, device=DEVICE) for _ in range(B)])
    return perm[:, :S].sort(dim=1).values, perm[:, S:S + M].sort(dim=1).values


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,N,CM,S,M", [
    (1, 5, 3, 1, 4),        # tiny, one partial tile
    (2, 40, 24, 7, 20),     # one chunk
    (2, 70, 64, 35, 35),    # one chunk (16-bit), two source tiles
    (1, 197, 100, 13, 150),  # chunks, channels not a multiple of the chunk
    (2, 61, 48, 20, 41),
])
def test_lists_match_reference(dtype, B, N, CM, S, M):
    metric = torch.randn(B, N, CM, device=DEVICE).to(dtype)
    src, cand = random_sets(B, N, S, M)
    got = cosine_match_triton(metric, src, cand)
    check_within_tolerance(got, reference_sim(metric, src, cand), CM)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,p", [(21, 1), (20, 2), (197, 1), (9, 0)])
def test_ranges_tome_split(dtype, N, p):
    """ToMe: A = even positions past the prefix, B = odd positions past it."""
    metric = torch.randn(2, N, 16, device=DEVICE).to(dtype)
    sources, candidates = range(p + p % 2, N, 2), range(p + 1 - p % 2, N, 2)
    got = cosine_match_triton(metric, sources, candidates)
    check_within_tolerance(got, reference_sim(metric, sources, candidates), 16)


def test_strided_lists_and_out_map():
    """BAT: A and B alternate among a list (views with stride 2); MSTM: the partner written into a map."""
    metric = torch.randn(2, 30, 8, device=DEVICE)
    att = torch.stack([torch.randperm(30, device=DEVICE)[:20].sort().values for _ in range(2)])
    a, b = att[:, 0::2], att[:, 1::2]
    out_map = torch.full((2, 30), -7, dtype=torch.int64, device=DEVICE)
    got = cosine_match_triton(metric, a, b, out_map=out_map, map_offset=3)
    check_within_tolerance(got, reference_sim(metric, a, b), 8)
    want = torch.full_like(out_map, -7).scatter_(1, a, got.partner + 3)
    assert torch.equal(out_map, want)


def test_noncontiguous_metric_is_copied():
    metric = torch.randn(2, 12, 33, device=DEVICE).transpose(1, 2)  # [2, 33, 12], channel stride 33
    src, cand = random_sets(2, 33, 5, 20)
    check_within_tolerance(cosine_match_triton(metric, src, cand), reference_sim(metric, src, cand), 12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_exact_ties_go_to_the_lower_candidate(dtype):
    """Identical candidates and zero vectors (similarity 0 to all). In one tile the dot products of
    identical candidates are computed alike, so the lower index wins; across tiles the matrix product
    may round them apart (the interpreter's BLAS does), which the near-tie tolerance covers."""
    metric = torch.randn(1, 80, 40, device=DEVICE).to(dtype)
    cand = torch.arange(10, 80, device=DEVICE)[None]
    metric[0, 50] = metric[0, 15]   # candidate 40 duplicates candidate 5 (another tile)
    metric[0, 12] = metric[0, 11]   # candidates 1 and 2
    metric[0, 0] = metric[0, 15] * 2  # source 0 is parallel to both duplicates
    metric[0, 1] = metric[0, 12]
    metric[0, 2] = 0.0               # zero source: every similarity 0, the first candidate
    metric[0, 70:72] = 0.0
    src = torch.tensor([[0, 1, 2, 3]], device=DEVICE)
    got = cosine_match_triton(metric, src, cand)
    assert got.partner[0, 0].item() in (5, 40) and got.partner[0, 1:3].tolist() == [1, 0]
    assert got.best[0, 2] == 0
    check_within_tolerance(got, reference_sim(metric, src, cand), 40)


@pytest.mark.parametrize("dtype", DTYPES)
def test_near_ties(dtype):
    """Two candidates whose similarities to a source differ by ``gap``: the better one must win when
    ``gap`` exceeds the tolerance; below it either may (and the chosen one is within it)."""
    cm = 64
    eps = near_tie_eps(cm)
    g = torch.Generator(device="cpu").manual_seed(3)
    for gap in (100 * eps, 4 * eps, eps / 8):
        base = torch.randn(cm, generator=g, dtype=torch.float64)
        base /= base.norm()
        ortho = torch.randn(cm, generator=g, dtype=torch.float64)
        ortho -= (ortho @ base) * base
        ortho /= ortho.norm()
        c1 = 0.9 * base + (1 - 0.81) ** 0.5 * ortho   # cos = 0.9
        c2 = (0.9 - gap) * base + (1 - (0.9 - gap) ** 2) ** 0.5 * -ortho
        metric = torch.stack([base, c2, c1, -base]).to(dtype)[None].to(DEVICE)  # the better one second
        got = cosine_match_triton(metric, range(0, 1), range(1, 4))
        sim = reference_sim(metric, range(0, 1), range(1, 4))
        check_within_tolerance(got, sim, cm)
        if (sim[0, 0, 1] - sim[0, 0, 0]) > eps:
            assert got.partner.item() == 1


def test_nan_similarities_win_like_argmax():
    metric = torch.randn(1, 10, 6, device=DEVICE)
    metric[0, 7, 2] = float("nan")  # candidate 4 (position 7): NaN against every source
    metric[0, 1, 0] = float("nan")  # source 1: NaN against every candidate -> the first candidate
    got = cosine_match_triton(metric, range(0, 3), range(3, 10))
    assert got.partner[0].tolist() == [4, 0, 4]
    assert got.best.isnan().all()
    m = metric.double() / metric.double().norm(dim=-1, keepdim=True)
    assert (m[0, :3] @ m[0, 3:].T).argmax(-1).tolist() == [4, 0, 4]  # what torch.argmax does


def test_empty_sets():
    metric = torch.randn(2, 6, 4, device=DEVICE)
    got = cosine_match_triton(metric, range(0, 3), range(3, 3))
    assert (got.best == float("-inf")).all() and (got.partner == 0).all()
    got = cosine_match_triton(metric, range(0, 0), range(0, 6))
    assert got.best.shape == (2, 0)


@pytest.mark.parametrize("kwargs", [
    dict(sources=range(0, 9)),
    dict(sources=torch.zeros(2, 3, dtype=torch.int32)),
    dict(candidates=torch.zeros(1, 3, dtype=torch.int64)),
    dict(out_map=torch.zeros(2, 5, dtype=torch.int64)),
])
def test_bad_arguments_raise(kwargs):
    args = dict(sources=range(0, 3), candidates=range(3, 6))
    args.update(kwargs)
    with pytest.raises(ValueError):
        cosine_match_triton(torch.randn(2, 6, 4, device=DEVICE), **args)


# ----------------------------------------------------------------------------------------------------
# Compositions the methods use
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("B,N,C,p,r", [(2, 13, 24, 1, 6), (1, 31, 40, 5, 12), (2, 17, 8, 0, 16)])
def test_select_then_match_is_the_mstm_index_map(B, N, C, p, r):
    """MSTM: select (slots, kept, dropped) and match the dropped tokens against the kept non-prefix
    ones, writing ``p + partner`` (the winner's slot) into the slot map: the reference's index map."""
    x = torch.randn(B, N, C, device=DEVICE)
    scores = torch.rand(B, N, device=DEVICE)
    sel = select_topk_triton(scores, N - p - r, p, rest=True)
    cosine_match_triton(x, sel.rest, sel.kept[:, p:], out_map=sel.slot, map_offset=p)
    assert torch.equal(sel.slot, mstm_merge(x, scores, r, num_prefix_tokens=p).index)


@pytest.mark.parametrize("N,p", [(17, 1), (20, 2), (31, 0)])
def test_ranges_are_tomes_bipartite_matching(N, p):
    """ToMe: A tokens past the prefix against B tokens past it; ``partner + j0`` is the B index."""
    from fastprune.tome import bipartite_soft_matching

    metric = torch.randn(2, N, 12, device=DEVICE)
    a0, b0 = p + p % 2, p + 1 - p % 2  # first non-prefix A (even) and B (odd) positions
    got = cosine_match_triton(metric, range(a0, N, 2), range(b0, N, 2))
    want = bipartite_soft_matching(metric, 1, p)
    assert torch.equal(got.partner + b0 // 2, want.partner[:, a0 // 2:])
    torch.testing.assert_close(got.best, want.score[:, a0 // 2:], atol=near_tie_eps(12), rtol=0)


def test_registered_for_ahead_of_time_compilation():
    names = [s.name for s in aot.registered_specs()]
    for dtype in ("float32", "float16", "bfloat16"):
        assert any(n.startswith(f"cosine_match[{dtype},") for n in names)


def test_tolerance_formula():
    assert near_tie_eps(64) == 80 * 2.0 ** -22 and near_tie_eps(768) < 2e-4
    rng = random.Random(0)
    for _ in range(5):  # the bound holds with room on random data at the largest ViT width
        cm = rng.choice([384, 768, 1024])
        metric = torch.randn(1, 40, cm, device=DEVICE).half()
        got = cosine_match_triton(metric, range(0, 20), range(20, 40))
        best = reference_sim(metric, range(0, 20), range(20, 40)).max(-1).values
        assert (got.best.double() - best).abs().max() < near_tie_eps(cm) / 4
