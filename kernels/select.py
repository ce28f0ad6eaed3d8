"""Top-k selection, the primitive under MSTM, EViT, BAT and IdleViT: Triton device functions, a launchable
kernel and its launcher.

Semantics (:func:`fastprune.reference.topk_keep_mask`): per image, keep the prefix tokens and the ``K``
non-prefix tokens with the largest score; ties go to the lower index. NaN scores rank above every
number (as ``torch.sort`` puts them first), or, with ``NAN_LAST``, count as ``-inf`` (IdleViT's rule);
``-0.0 == +0.0``. Kept tokens get consecutive output slots in token order.

No sort and no host synchronisation: :func:`order_keys` maps each float32 score to an int32 key with
the same order, :func:`kth_largest` finds the ``K``-th largest key by a radix search (8 steps of 4
bits for ViT rows, each one reduction), and the ties at that key are resolved by a cumsum in token
order (:func:`topk_mask`). Short rows (up to :data:`RANK_MAX_BLOCK` = 256 keys: ViT/16 at 224 px,
ToMe's A set) are selected by ranks instead (:func:`rank_topk_row`): each member's rank, the number
of keys before it in the order, from chunked ``[CHUNK, BLOCK]`` comparison tiles and one reduction,
the same result as the radix chain. The selection runs once per image: one program holds the image's
whole score row in registers.

Device functions (``@triton.jit``, callable from other kernels): :func:`order_keys`,
:func:`kth_largest`, :func:`topk_mask` (a register vector of keys), :func:`rank_topk_row` (a short
row in memory, by ranks), :func:`topk_row` (a score row in memory) and :func:`write_selection`
(slots, kept and dropped positions); MSTM's fused select+match kernel (``kernels/merge.py``) is built
from them. Launch: :func:`_select_topk_kernel` through :func:`select_topk_triton`.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from . import check_triton_device
from .aot import KernelSpec, register

__all__ = ["TopK", "select_topk_triton", "select_config", "radix_bits", "rank_chunk", "MAX_TOKENS", "RANK_MAX_BLOCK"]

#: Most tokens per image the launcher takes (the whole score row lives in one program's registers).
MAX_TOKENS = 16384


# ----------------------------------------------------------------------------------------------------
# Device functions
# ----------------------------------------------------------------------------------------------------
@triton.jit
def order_keys(values, member, NAN_LAST: tl.constexpr):
    """int32 keys that order like the float32 ``values``: ``a > b`` iff ``key(a) > key(b)``.

    The float32 bit pattern, with the 31 low bits flipped for negative numbers (two's complement
    order then matches float order). ``-0.0`` becomes ``+0.0``; every NaN gets one key above ``+inf``
    (``NAN_LAST``: the key of ``-inf``). Entries outside ``member`` get ``INT32_MIN``, below every
    member's key.
    """
    v = values.to(tl.float32)
    v = tl.where(v == 0.0, 0.0, v)
    if NAN_LAST:
        v = tl.where(v != v, float("-inf"), v)
    bits = v.to(tl.int32, bitcast=True)
    key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    if not NAN_LAST:
        key = tl.where(v != v, 0x7FFFFFFF, key)
    return tl.where(member, key, -2147483648)


@triton.jit
def kth_largest(keys, K, RADIX_BITS: tl.constexpr):
    """The ``K``-th largest of the int32 ``keys``, counted with multiplicity (``K >= 1``; ``K == 0`` gives
    ``INT32_MAX``): the largest ``T`` with ``#{keys >= T} >= K``.

    Built ``RADIX_BITS`` bits at a time from the top (on the keys as unsigned, sign bit flipped): each
    of the ``32 / RADIX_BITS`` steps counts the keys above all ``2**RADIX_BITS`` extensions of ``T`` in
    one ``[2**RADIX_BITS, len(keys)]`` reduction and keeps the largest extension still reaching ``K``.
    No sort; ``RADIX_BITS`` (1, 2, 4 or 8) trades sequential steps for comparisons.
    """
    u = (keys ^ -2147483648).to(tl.uint32, bitcast=True)
    digits = tl.arange(0, 1 << RADIX_BITS).to(tl.uint32)
    thresh = tl.max(digits, axis=0) * 0
    for step in tl.static_range(32 // RADIX_BITS):
        cand = thresh | (digits << (32 - RADIX_BITS * (step + 1)))
        counts = tl.sum((u[None, :] >= cand[:, None]).to(tl.int32), axis=1)
        thresh = tl.max(tl.where(counts >= K, cand, 0), axis=0)
    return thresh.to(tl.int32, bitcast=True) ^ -2147483648


@triton.jit
def topk_mask(keys, K, RADIX_BITS: tl.constexpr):
    """Top-``K`` mask of a register vector of keys in token order (from :func:`order_keys`): the keys
    above the ``K``-th largest, then the lowest-index ties at it. ``K`` must not exceed the members."""
    thresh = kth_largest(keys, K, RADIX_BITS)
    above = keys > thresh
    tie = keys == thresh
    quota = K - tl.sum(above.to(tl.int32), axis=0)
    return above | (tie & (tl.cumsum(tie.to(tl.int32), axis=0) <= quota))


@triton.jit
def _rank_pairs(keys, offs, BLOCK: tl.constexpr):
    """int64 ``key * 2**16 + (BLOCK - 1 - offs)``: one comparison orders by key, then by lower index."""
    return keys.to(tl.int64) * 65536 + (BLOCK - 1 - offs)


@triton.jit
def rank_topk(keys, K, BLOCK: tl.constexpr):
    """Top-``K`` mask of a register vector of ``BLOCK`` int32 keys (from :func:`order_keys`, in token
    order), by ranks: :func:`topk_mask`'s result (ties to the lower index, ``K`` at most the members)
    without the radix chain, for keys already in registers (no round trip through memory).

    ``rank_i = #{j : key_j > key_i, or key_j == key_i and j < i}`` (so NaN first or, keyed with
    ``NAN_LAST``, as ``-inf``; ``-0.0 == +0.0``; non-members, ``INT32_MIN``, below every member) from
    one ``[BLOCK, BLOCK]`` comparison of the :func:`rank_topk_row` pairs and one reduction along the
    ``j`` axis (Triton moves the vector into the tile's row and column layouts); ``i`` is kept iff
    ``rank_i < K``. For short rows
    (``BLOCK <= 128``, ToMe's A set at ViT/16 224 px): ``BLOCK**2 / (32 num_warps)`` comparisons per thread.
    """
    pair = _rank_pairs(keys, tl.arange(0, BLOCK), BLOCK)
    return tl.sum((pair[None, :] > pair[:, None]).to(tl.int32), axis=1) < K


@triton.jit
def rank_topk_row(row_ptr, stride, LO, HI, K, NAN_LAST: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    """Top-``K`` mask over ``tl.arange(0, BLOCK)`` of the members ``LO <= n < HI`` of a float row in
    memory (entry ``n`` at ``row_ptr + n * stride``), by ranks: for a short row (``BLOCK <= 256``,
    :data:`RANK_MAX_BLOCK`) in place of the radix search of :func:`topk_mask`, same result.

    ``rank_i = #{j : key_j > key_i, or key_j == key_i and j < i}`` (keys of :func:`order_keys`, so
    descending, NaN first or, with ``NAN_LAST``, as ``-inf``, ``-0.0 == +0.0``, ties to the lower
    index) and ``i`` is kept iff ``rank_i < K`` (``K`` must not exceed the members). The key and the
    index are one int64 ``key * 2**16 + (BLOCK - 1 - i)``, so each pair is one comparison; the
    ``[CHUNK, BLOCK]`` comparison tiles of the ``j`` chunks covering ``[LO, HI)`` (reloaded from
    memory: L1 hits; ``i`` runs along the lanes, as the row's own layout, so each thread holds few
    ``i`` and few ``j``) add up in registers and are reduced once: one block-wide reduction instead of
    the radix chain's ``32 / RADIX_BITS + 2``. Non-members (key ``INT32_MIN``) rank below every member.
    """
    offs = tl.arange(0, BLOCK)
    member = (offs >= LO) & (offs < HI)
    v = tl.load(row_ptr + offs * stride, mask=member, other=0.0)
    pair_i = _rank_pairs(order_keys(v, member, NAN_LAST), offs, BLOCK)
    count = tl.zeros([CHUNK, BLOCK], dtype=tl.int32)
    for j0 in range((LO // CHUNK) * CHUNK, HI, CHUNK):
        offs_j = j0 + tl.arange(0, CHUNK)
        member_j = (offs_j >= LO) & (offs_j < HI)
        v_j = tl.load(row_ptr + offs_j * stride, mask=member_j, other=0.0)
        pair_j = _rank_pairs(order_keys(v_j, member_j, NAN_LAST), offs_j, BLOCK)
        count += (pair_j[:, None] > pair_i[None, :]).to(tl.int32)
    return tl.sum(count, axis=0) < K


@triton.jit
def topk_row(score_row, stride_sn, N, P, K, NAN_LAST: tl.constexpr, RADIX_BITS: tl.constexpr,
             BLOCK_N: tl.constexpr, RANK_CHUNK: tl.constexpr = 0):
    """Keep mask over ``tl.arange(0, BLOCK_N)`` (``BLOCK_N >= N``) of one image's score row in memory:
    the ``P`` prefix tokens and the top ``K`` of the others (``K <= N - P``). ``RANK_CHUNK > 0``: by
    ranks (:func:`rank_topk_row`, short rows), else by the radix search (:func:`topk_mask`, reads
    ``N`` floats once)."""
    offs = tl.arange(0, BLOCK_N)
    valid = offs < N
    if RANK_CHUNK > 0:
        keep = rank_topk_row(score_row, stride_sn, P, N, K, NAN_LAST, BLOCK_N, RANK_CHUNK)
    else:
        s = tl.load(score_row + offs * stride_sn, mask=valid, other=0.0)
        keep = topk_mask(order_keys(s, valid & (offs >= P), NAN_LAST), K, RADIX_BITS)
    return keep | (valid & (offs < P))


# ----------------------------------------------------------------------------------------------------
# Launch
# ----------------------------------------------------------------------------------------------------
@triton.jit
def write_selection(keep, slot_row, kept_row, rest_row, N, DROP_SLOT,
                    WRITE_KEPT: tl.constexpr, WRITE_REST: tl.constexpr, BLOCK_N: tl.constexpr):
    """Stores one image's selection from its keep mask over ``tl.arange(0, BLOCK_N)``: ``slot_row[n]``
    (int64), the output slot of a kept token (in token order), ``DROP_SLOT`` for the others; with
    ``WRITE_KEPT``, ``kept_row[s]``: the position of slot ``s``; with ``WRITE_REST``, ``rest_row[t]``:
    the dropped positions, ascending. Returns the kept tokens' slots (int32).

    The kept and dropped positions are stored at addresses computed from the slots as read back from
    memory (int32, in ``slot_row``'s first half, between two barriers, before the slots overwrite
    them), not from ``keep``: torch's TTIR analysis of the arguments a kernel writes (under
    ``torch.compile`` each one is cloned before every launch) follows a store's address back through
    every operation but loads, and a device function's result to all of its arguments, so addresses
    computed from ``keep = topk_row(score_row, ...)`` would count the scores as written. The round
    trip is one dependent (cached) load per image.
    """
    offs = tl.arange(0, BLOCK_N)
    valid = offs < N
    slot = tl.cumsum(keep.to(tl.int32), axis=0) - 1
    if WRITE_KEPT or WRITE_REST:
        count_row = slot_row.to(tl.pointer_type(tl.int32))
        tl.store(count_row + offs, slot, mask=valid)
        tl.debug_barrier()
        slot = tl.load(count_row + offs, mask=valid, other=0)
        tl.debug_barrier()  # every thread of the program has read its slots before they are overwritten
    tl.store(slot_row + offs, tl.where(keep, slot, DROP_SLOT).to(tl.int64), mask=valid)
    if WRITE_KEPT:
        tl.store(kept_row + slot, offs.to(tl.int64), mask=keep)
    if WRITE_REST:
        tl.store(rest_row + offs - slot - 1, offs.to(tl.int64), mask=valid & (keep == 0))
    return slot


@triton.jit
def _select_topk_kernel(
        scores_ptr, stride_sb, stride_sn,
        slot_ptr, kept_ptr, rest_ptr,
        N, P, K, DROP_SLOT,
        NAN_LAST: tl.constexpr, WRITE_KEPT: tl.constexpr, WRITE_REST: tl.constexpr, RADIX_BITS: tl.constexpr,
        BLOCK_N: tl.constexpr, RANK_CHUNK: tl.constexpr):
    """Top-k selection of one image ``b`` (grid ``(B,)``).

    Writes ``slot[b, n]`` (``[B, N]`` int64): the output slot of a kept token (prefix included, in
    token order), ``DROP_SLOT`` for the others; with ``WRITE_KEPT``, ``kept[b, s]`` (``[B, P + K]``):
    the position of slot ``s``; with ``WRITE_REST``, ``rest[b, t]`` (``[B, N - P - K]``): the dropped
    positions, ascending (:func:`write_selection`). Memory traffic: ``4 N`` bytes read, ``8 N``
    (+ ``8 N``) written (with ``kept`` or ``rest``, ``4 N`` more written and read back, cached).
    """
    pid_b = tl.program_id(0).to(tl.int64)
    keep = topk_row(scores_ptr + pid_b * stride_sb, stride_sn, N, P, K, NAN_LAST, RADIX_BITS, BLOCK_N,
                    RANK_CHUNK)
    write_selection(keep, slot_ptr + pid_b * N, kept_ptr + pid_b * (P + K), rest_ptr + pid_b * (N - P - K), N,
                    DROP_SLOT, WRITE_KEPT, WRITE_REST, BLOCK_N)


def radix_bits(block_n: int, num_warps: int) -> int:
    """``RADIX_BITS`` of :func:`kth_largest` for a row of ``block_n`` keys: the most bits per step (up to
    4) whose comparison tile stays within 32 elements per thread."""
    bits = 4
    while bits > 1 and (block_n << bits) > 32 * 32 * num_warps:
        bits //= 2
    return bits


#: Longest row (as its power-of-two block) selected by ranks (:func:`rank_topk_row`): its comparison
#: work grows as the square of the row.
RANK_MAX_BLOCK = 256


def rank_chunk(block_n: int, num_warps: int) -> int:
    """``CHUNK`` of :func:`rank_topk_row` for a row of ``block_n`` keys: the widest ``j`` chunk (up to
    64) whose ``[CHUNK, block_n]`` count tile stays within 16 elements per thread; 0 (the radix search)
    for rows longer than :data:`RANK_MAX_BLOCK`."""
    if block_n > RANK_MAX_BLOCK:
        return 0
    return max(1, min(64, block_n, 16 * 32 * num_warps // block_n))


def select_config(N: int) -> tuple[dict, int]:
    """Constants and num_warps for ``N`` tokens: the whole row in one program, 4 to 16 warps; rows of
    up to :data:`RANK_MAX_BLOCK` are selected by ranks, longer ones by the radix search."""
    block_n = max(16, triton.next_power_of_2(N))
    num_warps = 4 if block_n <= 1024 else 8 if block_n <= 4096 else 16
    return dict(BLOCK_N=block_n, RADIX_BITS=radix_bits(block_n, num_warps),
                RANK_CHUNK=rank_chunk(block_n, num_warps)), num_warps


class TopK(NamedTuple):
    """Result of :func:`select_topk_triton` (int64): ``slot [B, N]``, ``kept [B, p + k]`` or None,
    ``rest [B, N - p - k]`` or None."""

    slot: torch.Tensor
    kept: Optional[torch.Tensor]
    rest: Optional[torch.Tensor]


def select_topk_triton(scores: torch.Tensor, k: int, num_prefix_tokens: int, *, nan_last: bool = False,
                       drop_slot: int = -1, kept: bool = True, rest: bool = False) -> TopK:
    """Top-k selection per image, one launch (grid ``(B,)``).

    Args:
        scores: ``[B, N]`` scores (prefix columns ignored), read as float32, any strides; CUDA (or CPU
            under ``TRITON_INTERPRET=1``). ``N <= MAX_TOKENS``.
        k: non-prefix tokens kept, ``0 <= k <= N - p``.
        num_prefix_tokens: ``p``, always kept.
        nan_last: NaN scores count as ``-inf`` (IdleViT) instead of ranking first (``torch.sort``).
        drop_slot: value of ``slot`` for dropped tokens (EViT: ``p + k``, its fused token).
        kept: also return the kept positions; rest: also return the dropped positions.

    Returns:
        :class:`TopK` ``(slot, kept, rest)``: the kept tokens' output slots (``drop_slot`` elsewhere),
        the position of every slot, the dropped non-prefix positions (ascending).

    Raises:
        ValueError: ``k``, ``num_prefix_tokens`` or ``N`` out of range; not on CUDA while the
            interpreter is off.
    """
    check_triton_device(scores)
    B, N = scores.shape
    p = int(num_prefix_tokens)
    if not 0 <= p <= N or not 0 <= k <= N - p:
        raise ValueError(f"need 0 <= num_prefix_tokens <= N and 0 <= k <= N - p (N={N}), got p={p}, k={k}")
    if N > MAX_TOKENS:
        raise ValueError(f"select_topk_triton takes at most {MAX_TOKENS} tokens per image, got {N}")
    scores = scores if scores.dtype == torch.float32 else scores.float()
    slot = torch.empty(B, N, dtype=torch.int64, device=scores.device)
    kept_t = torch.empty(B, p + k, dtype=torch.int64, device=scores.device) if kept else None
    rest_t = torch.empty(B, N - p - k, dtype=torch.int64, device=scores.device) if rest else None
    consts, num_warps = select_config(N)
    _select_topk_kernel[(B,)](
        scores, scores.stride(0), scores.stride(1), slot, slot if kept_t is None else kept_t,
        slot if rest_t is None else rest_t, N, p, int(k), int(drop_slot),
        NAN_LAST=bool(nan_last), WRITE_KEPT=kept, WRITE_REST=rest, **consts, num_warps=num_warps)
    return TopK(slot, kept_t, rest_t)


# ----------------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (see kernels/aot.py)
# ----------------------------------------------------------------------------------------------------
def select_spec(name: str, N: int, nan_last: bool, write_kept: bool, write_rest: bool) -> KernelSpec:
    """The spec of one launch configuration of :func:`_select_topk_kernel` (also used by the methods'
    files for the configuration they launch)."""
    consts, warps = select_config(N)
    return KernelSpec(
        name, _select_topk_kernel,
        dict(scores_ptr="*fp32", stride_sb="i32", stride_sn="i32", slot_ptr="*i64", kept_ptr="*i64",
             rest_ptr="*i64", N="i32", P="i32", K="i32", DROP_SLOT="i32"),
        dict(consts, NAN_LAST=nan_last, WRITE_KEPT=write_kept, WRITE_REST=write_rest), warps)


def _aot_specs() -> list[KernelSpec]:
    """ViT/16 at 224 px (N = 197) and 384 px (577), and each warp-count branch up to MAX_TOKENS."""
    return [select_spec(f"select_topk[N={N},{'nan_last' if nan_last else 'nan_first'}]", N, nan_last,
                        True, rest)
            for N, nan_last, rest in ((197, False, True), (197, True, False), (577, False, True),
                                      (4097, False, False), (MAX_TOKENS, True, True))]


register(_aot_specs)
