"""The top-k selection primitive (kernels/select.py) against the reference and a brute-force rule.

Kernels run through the Triton interpreter on CPU (or compiled on CUDA). The rule: prefix tokens are
always kept, then the ``k`` largest other scores, ties to the lower index; NaN ranks first (as
``torch.sort``), or counts as ``-inf`` with ``nan_last``; ``-0.0 == +0.0``. Random cases draw scores
from a few distinct values, so ties are everywhere.
"""
import math
import random

import pytest
import torch
import triton
import triton.language as tl

from conftest import DEVICE
from fastprune.kernels import aot
from fastprune.kernels.select import (MAX_TOKENS, order_keys, rank_chunk, rank_topk, rank_topk_row, select_config,
                                     select_topk_triton, topk_mask)
from fastprune.reference import output_slots, topk_keep_mask


def brute_force_keep(scores, k, p, nan_last=False):
    """Kept positions of one image by sorting ``(rank value, index)`` pairs in Python."""
    def rank(j):
        v = float(scores[j])
        if math.isnan(v):
            return (1, math.inf, j) if nan_last else (0, 0.0, j)  # as -inf, or above every number
        return (1, -v, j)

    return sorted(list(range(p)) + sorted(range(p, len(scores)), key=rank)[:k])


def reference_slots(scores, k, p, nan_last=False, drop_slot=-1):
    s = torch.where(scores.isnan(), float("-inf"), scores) if nan_last else scores
    keep = topk_keep_mask(s, k, p)
    return keep, torch.where(keep, output_slots(keep), drop_slot)


def check(scores, k, p, nan_last=False, drop_slot=-1):
    got = select_topk_triton(scores, k, p, nan_last=nan_last, drop_slot=drop_slot, rest=True)
    keep, slot = reference_slots(scores.float(), k, p, nan_last, drop_slot)
    assert got.slot.dtype == torch.int64 and torch.equal(got.slot, slot)
    for b in range(scores.shape[0]):
        kept = brute_force_keep(scores[b].tolist(), k, p, nan_last)
        assert got.kept[b].tolist() == kept
        assert got.rest[b].tolist() == [j for j in range(scores.shape[1]) if j not in set(kept)]
    return got


@pytest.mark.parametrize("B,N,p,k", [
    (1, 1, 0, 1), (1, 1, 1, 0), (2, 7, 1, 3), (2, 9, 0, 4), (2, 6, 1, 0), (1, 5, 1, 4), (3, 20, 2, 1),
    (2, 70, 1, 33), (1, 197, 1, 137), (1, 197, 1, 196), (2, 16, 16, 0), (1, 33, 5, 28),
])
@pytest.mark.parametrize("nan_last", [False, True])
def test_matches_reference_with_ties_and_nan(B, N, p, k, nan_last):
    scores = torch.randn(B, N, device=DEVICE).round(decimals=1)
    scores[0, -1] = float("nan")
    scores[-1, N // 2] = -float("nan")
    check(scores, k, p, nan_last, drop_slot=p + k if nan_last else -1)


def test_special_values():
    inf, nan = float("inf"), float("nan")
    scores = torch.tensor([[9.0, -0.0, 0.0, -inf, inf, nan, -nan, 1e-45, -1e-45, 3.4e38, -3.4e38, 0.0]],
                          device=DEVICE)
    for k in range(0, 12):
        for nan_last in (False, True):
            check(scores, k, 1, nan_last)
    got = select_topk_triton(scores, 4, 1)  # the two NaNs first, then inf, then 3.4e38
    assert got.kept[0].tolist() == [0, 4, 5, 6, 9]


def test_all_equal_scores_keep_the_lowest_indices():
    scores = torch.full((2, 40), 0.25, device=DEVICE)
    got = check(scores, 11, 3)
    assert got.kept[0].tolist() == list(range(14))


def test_random_cases():
    rng = random.Random(0)
    for _ in range(40):
        N = rng.choice([2, 3, 8, 17, 64, 100, 257])
        p = rng.randint(0, min(3, N))
        k = rng.randint(0, N - p)
        values = [rng.choice([-1.5, -0.0, 0.0, 0.5, 2.0, float("inf"), float("nan")]) for _ in range(3)]
        scores = torch.tensor([[rng.choice(values) + (rng.random() if rng.random() < 0.3 else 0.0)
                                for _ in range(N)] for _ in range(2)], device=DEVICE)
        check(scores, k, p, nan_last=rng.random() < 0.5)


def test_largest_row_strided_and_half_scores():
    scores = torch.randn(1, MAX_TOKENS, device=DEVICE).round(decimals=2)
    check(scores, 5000, 1)
    wide = torch.randn(3, 50, device=DEVICE).half().round(decimals=1)[:, ::2]  # fp16, stride 2
    check(wide, 10, 1)


@pytest.mark.parametrize("kept,rest", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("N,p,k", [(13, 1, 8), (300, 2, 100)])  # by ranks, by the radix search
def test_every_choice_of_lists(kept, rest, N, p, k):
    """The slots, and the position lists asked for, whichever are written: with a list, the slots
    make a round trip through the slot row (int32) before the final slots overwrite it."""
    scores = torch.randn(2, N, device=DEVICE).round(decimals=1)
    got = select_topk_triton(scores, k, p, drop_slot=p + k, kept=kept, rest=rest)
    keep, slot = reference_slots(scores, k, p, drop_slot=p + k)
    assert torch.equal(got.slot, slot)
    positions = torch.arange(N, device=DEVICE)
    assert (got.kept is None) != kept and (got.rest is None) != rest
    for b in range(2):
        if kept:
            assert got.kept[b].tolist() == positions[keep[b]].tolist()
        if rest:
            assert got.rest[b].tolist() == positions[~keep[b]].tolist()


@pytest.mark.parametrize("k,p,N", [(-1, 1, 8), (8, 1, 8), (0, 9, 8), (1, 1, MAX_TOKENS + 1)])
def test_bad_arguments_raise(k, p, N):
    with pytest.raises(ValueError):
        select_topk_triton(torch.zeros(1, N, device=DEVICE), k, p)


# ----------------------------------------------------------------------------------------------------
# The device functions, called from another kernel the way a method's kernel calls them
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _members_topk_kernel(values_ptr, out_ptr, N, K, NAN_LAST: tl.constexpr, RADIX_BITS: tl.constexpr,
                         BLOCK: tl.constexpr):
    """Top-K among the even positions (ToMe's set A), over one register vector."""
    offs = tl.arange(0, BLOCK)
    valid = offs < N
    v = tl.load(values_ptr + offs, mask=valid, other=0.0)
    keep = topk_mask(order_keys(v, valid & (offs % 2 == 0), NAN_LAST), K, RADIX_BITS)
    tl.store(out_ptr + offs, keep.to(tl.int8), mask=valid)


@pytest.mark.parametrize("radix", [1, 2, 4, 8])
@pytest.mark.parametrize("nan_last", [False, True])
def test_device_functions_with_a_member_mask(nan_last, radix):
    rng = random.Random(1)
    for N in (5, 16, 37):
        values = torch.tensor([rng.choice([0.0, 1.0, -2.0, float("nan")]) for _ in range(N)], device=DEVICE)
        members = list(range(0, N, 2))
        for K in sorted({0, 1, len(members) // 2, len(members) - 1, len(members)}):
            out = torch.empty(N, dtype=torch.int8, device=DEVICE)
            _members_topk_kernel[(1,)](values, out, N, K, NAN_LAST=nan_last, RADIX_BITS=radix,
                                       BLOCK=triton.next_power_of_2(N))
            sub = values[members]
            want = [members[i] for i in brute_force_keep(sub.tolist(), K, 0, nan_last)]
            assert out.nonzero().flatten().tolist() == want


def test_registered_for_ahead_of_time_compilation():
    names = [s.name for s in aot.registered_specs()]
    assert any(n.startswith("select_topk[N=197,nan_first]") for n in names)
    assert any(n.startswith(f"select_topk[N={MAX_TOKENS},") for n in names)


def test_methods_follow_their_nan_rule():
    """EViT keeps NaN scores first (the reference's stable sort); IdleViT ranks them as ``-inf``."""
    from fastprune import idle
    from fastprune.evit import evit_tokens

    x = torch.randn(2, 11, 8, device=DEVICE)
    attn = torch.rand(2, 11, device=DEVICE)
    attn[0, 3], attn[1, 5], attn[1, 6] = float("nan"), -float("nan"), float("nan")
    got = evit_tokens(x, attn, 0.5, backend="triton")
    assert torch.equal(got.index, evit_tokens(x, attn, 0.5, backend="reference").index)
    assert (got.index[1, 5:7] < 6).all()  # both NaNs kept
    sel = idle.select_tokens(attn, 5, 1, backend="triton")
    assert torch.equal(sel.slot, idle.select_tokens(attn, 5, 1, backend="reference").slot)
    assert not sel.keep[1, 5:7].any()


# ----------------------------------------------------------------------------------------------------
# The rank top-k of short rows (rank_topk_row): same result as the radix search
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _rank_vs_radix_kernel(values_ptr, rank_out_ptr, radix_out_ptr, LO, HI, K, NAN_LAST: tl.constexpr,
                          BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    """Top-K of the members LO <= n < HI of one row, by ranks and by the radix search (4 bits)."""
    offs = tl.arange(0, BLOCK)
    member = (offs >= LO) & (offs < HI)
    rank = rank_topk_row(values_ptr, 1, LO, HI, K, NAN_LAST, BLOCK, CHUNK)
    v = tl.load(values_ptr + offs, mask=member, other=0.0)
    radix = topk_mask(order_keys(v, member, NAN_LAST), K, 4)
    tl.store(rank_out_ptr + offs, rank.to(tl.int8))
    tl.store(radix_out_ptr + offs, radix.to(tl.int8))


def _rank_and_radix(values, lo, hi, k, nan_last, chunk=None):
    block = max(16, triton.next_power_of_2(values.numel()))
    chunk = chunk or rank_chunk(block, 4)
    rank = torch.empty(block, dtype=torch.int8, device=DEVICE)
    radix = torch.empty(block, dtype=torch.int8, device=DEVICE)
    _rank_vs_radix_kernel[(1,)](values, rank, radix, lo, hi, k, NAN_LAST=nan_last, BLOCK=block, CHUNK=chunk)
    want = [lo + i for i in brute_force_keep(values[lo:hi].tolist(), k, 0, nan_last)]
    return rank.nonzero().flatten().tolist(), radix.nonzero().flatten().tolist(), want


# ----------------------------------------------------------------------------------------------------
# The rank top-k of a register vector (rank_topk, ToMe's one-tile chain): the same tests
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _register_rank_kernel(values_ptr, rank_out_ptr, radix_out_ptr, LO, HI, K, NAN_LAST: tl.constexpr,
                          BLOCK: tl.constexpr):
    """Top-K of the members LO <= n < HI of one row held in registers: by ranks and by the radix search."""
    offs = tl.arange(0, BLOCK)
    member = (offs >= LO) & (offs < HI)
    keys = order_keys(tl.load(values_ptr + offs, mask=member, other=0.0), member, NAN_LAST)
    tl.store(rank_out_ptr + offs, rank_topk(keys, K, BLOCK).to(tl.int8))
    tl.store(radix_out_ptr + offs, topk_mask(keys, K, 4).to(tl.int8))


def _register_rank_and_radix(values, lo, hi, k, nan_last):
    block = max(16, triton.next_power_of_2(values.numel()))
    rank = torch.empty(block, dtype=torch.int8, device=DEVICE)
    radix = torch.empty(block, dtype=torch.int8, device=DEVICE)
    _register_rank_kernel[(1,)](values, rank, radix, lo, hi, k, NAN_LAST=nan_last, BLOCK=block)
    want = [lo + i for i in brute_force_keep(values[lo:hi].tolist(), k, 0, nan_last)]
    return rank.nonzero().flatten().tolist(), radix.nonzero().flatten().tolist(), want


#: Both rank top-k device functions: a row in memory (chunked tiles), a vector in registers.
RANK_PATHS = pytest.mark.parametrize("rank_and_radix", [_rank_and_radix, _register_rank_and_radix],
                                     ids=["row_in_memory", "register_vector"])


@RANK_PATHS
@pytest.mark.parametrize("nan_last", [False, True])
def test_rank_topk_special_values_and_signed_zeros(nan_last, rank_and_radix):
    """NaN (either sign) ranks first, or as -inf; -0.0 == +0.0 (ties to the lower index), as the radix path."""
    inf, nan = float("inf"), float("nan")
    values = torch.tensor([-0.0, 0.0, -0.0, nan, 1e-45, -1e-45, -nan, inf, -inf, 0.0, -inf, nan, 3.4e38],
                          device=DEVICE)
    n = values.numel()
    for k in range(n + 1):
        rank, radix, want = rank_and_radix(values, 0, n, k, nan_last)
        assert rank == radix == want, k
    rank, _, _ = rank_and_radix(values, 0, n, 6, False)
    assert rank == [3, 4, 6, 7, 11, 12]  # NaNs, inf, 3.4e38, then 1e-45 (in token order)
    rank, _, _ = rank_and_radix(values, 0, n, 7, False)
    assert rank == [0, 3, 4, 6, 7, 11, 12]  # then the first zero of either sign
    rank, _, _ = rank_and_radix(values, 0, n, 3, True)
    assert rank == [4, 7, 12]  # NaNs count as -inf: inf, 3.4e38, 1e-45


@RANK_PATHS
def test_rank_topk_ties_and_odd_lengths(rank_and_radix):
    """Heavy ties, members not starting at 0 (ToMe: the non-prefix A tokens), k at 0, 1, half, all."""
    rng = random.Random(2)
    for n in (1, 2, 3, 7, 16, 31, 99, 100, 197, 256):
        for _ in range(3):
            pool = [rng.choice([-1.0, -0.0, 0.0, 0.5, float("nan"), float("-inf")]) for _ in range(3)]
            values = torch.tensor([rng.choice(pool) for _ in range(n)], device=DEVICE)
            lo = rng.randint(0, min(3, n - 1))
            hi = rng.randint(lo + 1, n)
            for k in sorted({0, 1, (hi - lo) // 2, hi - lo}):
                nan_last = rng.random() < 0.5
                rank, radix, want = rank_and_radix(values, lo, hi, k, nan_last)
                assert rank == radix == want, (n, lo, hi, k, nan_last)


@pytest.mark.parametrize("chunk", [1, 4, 16, 64])
def test_rank_topk_chunks_not_aligned_with_members(chunk):
    """Members starting and ending inside a chunk; every chunk width gives the same selection."""
    values = torch.tensor([float(v) for v in [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4, 6, 2, 6, 4,
                                              3, 3, 8, 3, 2, 7, 9, 5, 0, 2, 8, 8, 4, 1, 9, 7, 1, 6]], device=DEVICE)
    for lo, hi, k in ((0, 42, 10), (5, 37, 12), (17, 18, 1), (3, 42, 39), (1, 30, 0)):
        rank, radix, want = _rank_and_radix(values, lo, hi, k, False, chunk=min(chunk, 64))
        assert rank == radix == want, (lo, hi, k)


def test_register_rank_topk_all_equal_and_bounds():
    """All keys equal: the lowest indices, for k at 0, 1, all but one and all of 128 keys."""
    values = torch.full((128,), 0.25, device=DEVICE)
    for k in (0, 1, 127, 128):
        rank, radix, _ = _register_rank_and_radix(values, 0, 128, k, False)
        assert rank == radix == list(range(k))


def test_rank_topk_configuration():
    """Short rows use ranks, longer ones the radix search; the count tile stays small."""
    assert rank_chunk(256, 4) == 8 and rank_chunk(128, 8) == 32 and rank_chunk(16, 4) == 16
    assert rank_chunk(512, 4) == 0
    assert select_config(197)[0]["RANK_CHUNK"] > 0 and select_config(577)[0]["RANK_CHUNK"] == 0
    from fastprune.kernels.tome import match_select_config
    assert match_select_config(197, 1, 64, torch.bfloat16)[0]["RANK_CHUNK"] > 0
    assert match_select_config(577, 1, 64, torch.bfloat16)[0]["RANK_CHUNK"] == 0
