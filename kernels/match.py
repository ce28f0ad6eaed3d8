"""Cosine matching, the primitive under MSTM, ToMe and BAT: Triton device functions, a launchable kernel
and its launcher.

Semantics (:func:`fastprune.reference.cosine_best_kept`): for every source token ``i`` of an image, the
candidate ``j`` maximising ``sim(i, j) = <m_i, m_j> / (max(|m_i|, eps) max(|m_j|, eps))``; ties go to
the lower candidate index; a NaN similarity ranks above every number (as ``torch.argmax``). Sources
and candidates are per-image lists of token positions, given as int64 tensors (any strides, so
``kept[:, p:]`` or ``att[:, 0::2]`` are views) or as arithmetic ranges (ToMe's even/odd split).
Methods map their sets onto these: MSTM (dropped tokens vs kept non-prefix tokens), ToMe (set A vs
set B, the protected prefix rows and columns left out of the ranges), BAT (attentive A vs B).

Arithmetic: the dot products run on tensor cores in the metric's storage dtype with float32
accumulation (fp16/bf16); float32 metrics use ``input_precision="tf32x3"`` (three TF32 products,
about float32 accuracy, still on tensor cores). The norms are ``tl.sqrt_rn`` and the reciprocals
``tl.div_rn`` (IEEE, once per token), so ``sim = dot * (1/|m_i|) * (1/|m_j|)`` is deterministic.
Only the sources are iterated over: each program holds a tile of sources and streams the candidates.

Near-ties: the float32 accumulation order differs from a float64 reference by at most
:func:`near_tie_eps` ``(Cm)`` in ``sim``, so the chosen candidate's exact similarity is within that
of the best one; candidates closer than that may resolve differently (exact ties never do).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch
import triton
import triton.language as tl

from fastprune.reference import COSINE_EPS

from . import check_triton_device, interpreting
from .aot import KernelSpec, register

__all__ = ["Match", "cosine_match_triton", "near_tie_eps", "match_config", "compiled_match_config"]

Positions = Union[torch.Tensor, range]


def near_tie_eps(cm: int) -> float:
    """Bound on ``|sim_kernel - sim_exact|`` for a metric of ``cm`` channels: ``(cm + 16) 2^-22``.

    A float32 dot of ``cm`` terms is off by at most ``cm 2^-24 |m_i| |m_j|`` (round to nearest;
    twice that for a truncating tensor-core accumulator), each norm by about ``(cm / 2) 2^-24``
    relatively, and TF32x3 products by ``2^-21``; the bound doubles their sum.
    """
    return (cm + 16) * 2.0 ** -22


# ----------------------------------------------------------------------------------------------------
# Device functions
# ----------------------------------------------------------------------------------------------------
@triton.jit
def token_positions(list_row, stride_ln, start, step, offs, valid, IS_LIST: tl.constexpr):
    """int64 token positions of the entries ``offs`` of a list: ``list_row[offs]`` (``IS_LIST``) or
    ``start + step * offs``."""
    if IS_LIST:
        return tl.load(list_row + offs * stride_ln, mask=valid, other=0).to(tl.int64)
    else:
        return start + step * offs.to(tl.int64)


@triton.jit
def _dot_operand(tile, UPCAST: tl.constexpr):
    if UPCAST:
        return tile.to(tl.float32)
    else:
        return tile


@triton.jit
def _inv_norm(sq, COS_EPS: tl.constexpr):
    """``1 / max(sqrt(sq), eps)``, both IEEE-rounded."""
    return tl.div_rn(tl.full(sq.shape, 1.0, tl.float32), tl.maximum(tl.sqrt_rn(sq), COS_EPS))


@triton.jit
def _masked_sim(dots, inv_i, sq_j, valid_j, COS_EPS: tl.constexpr):
    """The similarity tile ``dots * inv_i * inv_j`` for an argmax: NaN as ``+inf`` (it wins, as in
    ``torch.argmax``), candidates outside ``valid_j`` as ``-inf``."""
    sim = dots * inv_i[:, None] * _inv_norm(sq_j, COS_EPS)[None, :]
    sim = tl.where(sim != sim, float("inf"), sim)
    return tl.where(valid_j[None, :], sim, float("-inf"))


@triton.jit
def _rows_tile(rows, valid, CM, BLOCK_CM: tl.constexpr):
    """The ``[rows, BLOCK_CM]`` metric tile of ``rows`` (one channel chunk; zeros outside ``valid``)."""
    offs_c = tl.arange(0, BLOCK_CM)
    return tl.load(rows + offs_c[None, :], mask=valid[:, None] & (offs_c < CM)[None, :], other=0.0)


@triton.jit
def _sq_norms(m):
    """Squared norms of a metric tile's rows, float32."""
    return tl.sum(m.to(tl.float32) * m.to(tl.float32), axis=1)


@triton.jit
def _candidate_rows(metric_row, stride_mn, cand_row, stride_cn, cand_start, cand_step, offs_j, M,
                    CAND_LIST: tl.constexpr):
    """``(rows_j, valid_j)``: pointers ``[BLOCK_J, 1]`` to the rows of candidates ``offs_j``, and which exist."""
    valid_j = offs_j < M
    rows_j = metric_row + token_positions(cand_row, stride_cn, cand_start, cand_step, offs_j, valid_j,
                                          CAND_LIST)[:, None] * stride_mn
    return rows_j, valid_j


@triton.jit
def _source_tile(rows_i, valid_i, CM, COS_EPS: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_CM: tl.constexpr,
                 SINGLE_CHUNK: tl.constexpr):
    """``(m_i, inv_i)``: the sources' metric tile (``SINGLE_CHUNK``; else zeros, unused) and their
    inverse norms, once per source tile."""
    offs_c = tl.arange(0, BLOCK_CM)
    if SINGLE_CHUNK:
        m_i = _rows_tile(rows_i, valid_i, CM, BLOCK_CM)
        sq_i = _sq_norms(m_i)
    else:
        m_i = tl.zeros([BLOCK_I, BLOCK_CM], rows_i.dtype.element_ty)
        sq_i = tl.zeros([BLOCK_I], tl.float32)
        for c0 in range(0, CM, BLOCK_CM):
            m_c = tl.load(rows_i + (c0 + offs_c)[None, :],
                          mask=valid_i[:, None] & ((c0 + offs_c) < CM)[None, :], other=0.0).to(tl.float32)
            sq_i += tl.sum(m_c * m_c, axis=1)
    return m_i, _inv_norm(sq_i, COS_EPS)


@triton.jit
def _tile_sim(m_i, inv_i, m_j, valid_j, PRECISION: tl.constexpr, UPCAST: tl.constexpr, COS_EPS: tl.constexpr,
              BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
    """:func:`_masked_sim` of one-chunk tiles already loaded: sources ``m_i`` against candidates ``m_j``."""
    dots = tl.dot(_dot_operand(m_i, UPCAST), tl.trans(_dot_operand(m_j, UPCAST)),
                  tl.zeros([BLOCK_I, BLOCK_J], tl.float32), input_precision=PRECISION)
    return _masked_sim(dots, inv_i, _sq_norms(m_j), valid_j, COS_EPS)


@triton.jit
def _candidate_sim(metric_row, stride_mn, rows_i, valid_i, m_i, inv_i, cand_row, stride_cn, cand_start, cand_step,
                   offs_j, M, CM, CAND_LIST: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                   COS_EPS: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_CM: tl.constexpr,
                   SINGLE_CHUNK: tl.constexpr):
    """The ``[BLOCK_I, BLOCK_J]`` similarity tile of the sources against candidates ``offs_j``
    (:func:`_masked_sim`): ``tl.dot`` of metric chunks (the storage dtype, or float32 with ``UPCAST``;
    fp32 accumulation) and the candidates' squared norms from the same loads."""
    rows_j, valid_j = _candidate_rows(metric_row, stride_mn, cand_row, stride_cn, cand_start, cand_step, offs_j, M,
                                      CAND_LIST)
    if SINGLE_CHUNK:
        sim = _tile_sim(m_i, inv_i, _rows_tile(rows_j, valid_j, CM, BLOCK_CM), valid_j, PRECISION, UPCAST,
                        COS_EPS, BLOCK_I, BLOCK_J)
    else:
        offs_c = tl.arange(0, BLOCK_CM)
        dots = tl.zeros([BLOCK_I, BLOCK_J], tl.float32)
        sq_j = tl.zeros([BLOCK_J], tl.float32)
        for c0 in range(0, CM, BLOCK_CM):
            cmask = ((c0 + offs_c) < CM)[None, :]
            m_ic = tl.load(rows_i + (c0 + offs_c)[None, :], mask=valid_i[:, None] & cmask, other=0.0)
            m_jc = tl.load(rows_j + (c0 + offs_c)[None, :], mask=valid_j[:, None] & cmask, other=0.0)
            dots = tl.dot(_dot_operand(m_ic, UPCAST), tl.trans(_dot_operand(m_jc, UPCAST)), dots,
                          input_precision=PRECISION)
            sq_j += tl.sum(m_jc.to(tl.float32) * m_jc.to(tl.float32), axis=1)
        sim = _masked_sim(dots, inv_i, sq_j, valid_j, COS_EPS)
    return sim


@triton.jit
def cosine_argmax(metric_row, stride_mn, pos_i, valid_i,
                  cand_row, stride_cn, cand_start, cand_step, M, CM,
                  CAND_LIST: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                  COS_EPS: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_CM: tl.constexpr,
                  SINGLE_CHUNK: tl.constexpr):
    """Best candidate of ``BLOCK_I`` source tokens (positions ``pos_i``, int64) of one image.

    ``metric_row`` points at the image's ``[N, Cm]`` metric (token stride ``stride_mn``, channels
    contiguous). Candidates ``j < M`` at :func:`token_positions` ``(cand_row, stride_cn, cand_start, cand_step)``
    are streamed in tiles of ``BLOCK_J``; per tile, ``tl.dot`` of ``[BLOCK_I, BLOCK_CM]`` by
    ``[BLOCK_CM, BLOCK_J]`` metric chunks (the storage dtype, or float32 with ``UPCAST``; fp32
    accumulation), the candidates' squared norms from the same loads, and a running argmax (first
    maximum in a tile, strictly greater across tiles). ``SINGLE_CHUNK`` (``CM <= BLOCK_CM``): the
    sources' metric is loaded once and kept in registers.

    Returns ``(best [BLOCK_I] fp32, arg [BLOCK_I] int32)``: the best similarity (NaN if a NaN
    similarity won; ``-inf`` if ``M == 0``) and its candidate index in ``0 .. M - 1``.
    """
    rows_i = metric_row + pos_i[:, None] * stride_mn
    m_i, inv_i = _source_tile(rows_i, valid_i, CM, COS_EPS, BLOCK_I, BLOCK_CM, SINGLE_CHUNK)
    best = tl.full([BLOCK_I], float("-inf"), tl.float32)
    arg = tl.zeros([BLOCK_I], tl.int32)
    for j0 in range(0, M, BLOCK_J):
        sim = _candidate_sim(metric_row, stride_mn, rows_i, valid_i, m_i, inv_i, cand_row, stride_cn, cand_start,
                             cand_step, j0 + tl.arange(0, BLOCK_J), M, CM, CAND_LIST, PRECISION, UPCAST, COS_EPS,
                             BLOCK_I, BLOCK_J, BLOCK_CM, SINGLE_CHUNK)
        tile_best = tl.max(sim, axis=1)
        tile_arg = tl.argmax(sim, axis=1, tie_break_left=True).to(tl.int32) + j0
        better = tile_best > best
        arg = tl.where(better, tile_arg, arg)
        best = tl.where(better, tile_best, best)
    return tl.where(best == float("inf"), float("nan"), best), arg


@triton.jit
def cosine_argmax_tile(metric_row, stride_mn, pos_i, valid_i,
                       cand_row, stride_cn, cand_start, cand_step, M, CM,
                       CAND_LIST: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                       COS_EPS: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
                       BLOCK_CM: tl.constexpr, SINGLE_CHUNK: tl.constexpr, J_TILES: tl.constexpr):
    """:func:`cosine_argmax` when all ``M`` candidates fit ``J_TILES`` tiles of ``BLOCK_J``
    (``M <= J_TILES * BLOCK_J``), same arguments and bit-identical results, with no loop over
    candidates: the tiles are unrolled (every load's address is arithmetic, none waits on another
    tile's argmax), and each tile's max-with-index is one reduction (first maximum), merged
    strictly-greater in tile order (:func:`argmax_into`). Returns ``(best [BLOCK_I] fp32, arg
    [BLOCK_I] int32)``. A kernel holding the tiles already (loaded in its own body) calls
    :func:`inverse_norms` and :func:`argmax_into` itself."""
    rows_i = metric_row + pos_i[:, None] * stride_mn
    best = tl.full([BLOCK_I], float("-inf"), tl.float32)
    arg = tl.zeros([BLOCK_I], tl.int32)
    m_i, inv_i = _source_tile(rows_i, valid_i, CM, COS_EPS, BLOCK_I, BLOCK_CM, SINGLE_CHUNK)
    for jt in tl.static_range(J_TILES):
        sim = _candidate_sim(metric_row, stride_mn, rows_i, valid_i, m_i, inv_i, cand_row, stride_cn,
                             cand_start, cand_step, jt * BLOCK_J + tl.arange(0, BLOCK_J), M, CM, CAND_LIST,
                             PRECISION, UPCAST, COS_EPS, BLOCK_I, BLOCK_J, BLOCK_CM, SINGLE_CHUNK)
        best, arg = _first_better(sim, best, arg, jt * BLOCK_J)
    return tl.where(best == float("inf"), float("nan"), best), arg


@triton.jit
def inverse_norms(m, COS_EPS: tl.constexpr):
    """``1 / max(|m_i|, eps)`` of a loaded one-chunk metric tile's rows (IEEE), float32."""
    return _inv_norm(_sq_norms(m), COS_EPS)


@triton.jit
def argmax_into(m_i, inv_i, m_j, valid_j, best, arg, j0, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                COS_EPS: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
    """One loaded candidate tile (``m_j``, candidates ``j0 + arange(BLOCK_J)``, ``valid_j``) merged into
    the running ``(best, arg)`` of the loaded sources ``m_i`` (inverse norms ``inv_i``): the tile's
    :func:`_tile_sim`, its first maximum, taken where strictly greater. Start from ``(-inf, 0)``; the
    final ``best`` holds ``+inf`` where a NaN similarity won (:func:`cosine_argmax` returns NaN)."""
    sim = _tile_sim(m_i, inv_i, m_j, valid_j, PRECISION, UPCAST, COS_EPS, BLOCK_I, BLOCK_J)
    return _first_better(sim, best, arg, j0)


@triton.jit
def _first_better(sim, best, arg, j0):
    """Merge one similarity tile (candidates from ``j0``) into the running ``(best, arg)``: the tile's
    first maximum per source by one max-with-index reduction, taken where strictly greater."""
    tile_best, tile_arg = tl.max(sim, axis=1, return_indices=True, return_indices_tie_break_left=True)
    better = tile_best > best
    return tl.where(better, tile_best, best), tl.where(better, tile_arg.to(tl.int32) + j0, arg)


# ----------------------------------------------------------------------------------------------------
# Launch
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _cosine_match_kernel(
        metric_ptr, metric_stride_b, metric_stride_n,
        src_ptr, stride_sb, stride_sn, src_start, src_step, S,
        cand_ptr, stride_cb, stride_cn, cand_start, cand_step, M,
        best_ptr, partner_ptr, map_ptr, map_stride, map_offset, CM,
        SRC_LIST: tl.constexpr, CAND_LIST: tl.constexpr, WRITE_MAP: tl.constexpr, PRECISION: tl.constexpr,
        UPCAST: tl.constexpr, COS_EPS: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
        BLOCK_CM: tl.constexpr, SINGLE_CHUNK: tl.constexpr):
    """Cosine matching of ``BLOCK_I`` sources of one image (grid ``(B, cdiv(S, BLOCK_I))``).

    Writes ``best[b, i]`` (``[B, S]`` fp32) and ``partner[b, i]`` (``[B, S]`` int64, the candidate
    index) of :func:`cosine_argmax`; with ``WRITE_MAP`` also ``map[b, pos_i] = partner + map_offset``
    (an index map filled in place). Memory traffic per program: the metric of its sources and of all
    ``M`` candidates once (``(BLOCK_I + M) Cm`` elements; the sources' chunks are re-read from L1 per
    candidate tile unless ``SINGLE_CHUNK``), ``12 BLOCK_I`` bytes written. ``2 BLOCK_I M Cm`` FLOPs.
    """
    pid_b = tl.program_id(0).to(tl.int64)
    offs_i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    valid_i = offs_i < S
    pos_i = token_positions(src_ptr + pid_b * stride_sb, stride_sn, src_start, src_step, offs_i, valid_i, SRC_LIST)
    best, arg = cosine_argmax(metric_ptr + pid_b * metric_stride_b, metric_stride_n, pos_i, valid_i,
                              cand_ptr + pid_b * stride_cb, stride_cn, cand_start, cand_step, M, CM,
                              CAND_LIST, PRECISION, UPCAST, COS_EPS, BLOCK_I, BLOCK_J, BLOCK_CM, SINGLE_CHUNK)
    partner_row = partner_ptr + pid_b * S
    if WRITE_MAP:
        # the map's addresses from the positions read back (through the partner row, overwritten
        # below), not from token_positions' result: torch's TTIR analysis would trace that to the
        # source list and count it as written (see kernels/select.py's write_selection)
        tl.store(partner_row + offs_i, pos_i, mask=valid_i)
        tl.debug_barrier()
        pos_i = tl.load(partner_row + offs_i, mask=valid_i, other=0)
        tl.debug_barrier()
    tl.store(best_ptr + pid_b * S + offs_i, best, mask=valid_i)
    tl.store(partner_row + offs_i, arg.to(tl.int64), mask=valid_i)
    if WRITE_MAP:
        tl.store(map_ptr + pid_b * map_stride + pos_i, (arg + map_offset).to(tl.int64), mask=valid_i)


def match_config(S: int, M: int, CM: int, dtype: torch.dtype) -> tuple[dict, int]:
    """Compile-time constants and num_warps for ``S`` sources, ``M`` candidates, ``CM`` channels.

    Tiles of 16 sources x up to 32 candidates; the metric in one chunk up to 64 channels (32 for
    float32, whose TF32x3 makes three products), else in chunks of 32 (16 for float32): compiled for
    sm_80/sm_90 with triton 3.6 and 3.8 at least 16 warps stay resident per SM. ``tl.dot`` needs 16 in
    every dimension. Under the interpreter bf16 operands are widened to float32 (its ``tl.dot``
    mishandles bf16), an exact conversion.
    """
    wide = dtype == torch.float32
    block_cm = max(16, triton.next_power_of_2(CM))
    single = block_cm <= (32 if wide else 64)
    upcast = dtype == torch.bfloat16 and interpreting()
    consts = dict(PRECISION="tf32x3" if wide else "ieee" if upcast else "tf32", UPCAST=upcast,
                  COS_EPS=COSINE_EPS, BLOCK_I=16, BLOCK_J=max(16, min(32, triton.next_power_of_2(M))),
                  BLOCK_CM=block_cm if single else 16 if wide else 32, SINGLE_CHUNK=single)
    return consts, 4


def compiled_match_config(S: int, M: int, CM: int, dtype: torch.dtype) -> tuple[dict, int]:
    """:func:`match_config` as a compiled (not interpreted) launch has it: no widening of bf16."""
    consts, warps = match_config(S, M, CM, dtype)
    consts.update(UPCAST=False, PRECISION="tf32x3" if dtype == torch.float32 else "tf32")
    return consts, warps


class Match(NamedTuple):
    """Result of :func:`cosine_match_triton`: ``best [B, S]`` float32, ``partner [B, S]`` int64."""

    best: torch.Tensor
    partner: torch.Tensor


def _positions_arg(pos: Positions, B: int, N: int, name: str, device):
    """``(tensor, stride_b, stride_n, start, step, count, is_list)`` of a position list or range."""
    if isinstance(pos, range):
        if len(pos) and not (0 <= pos[0] < N and 0 <= pos[-1] < N):
            raise ValueError(f"{name} {pos} reaches outside the {N} tokens")
        return None, 0, 0, pos.start, pos.step, len(pos), False
    if pos.dim() != 2 or pos.shape[0] != B or pos.dtype != torch.int64:
        raise ValueError(f"{name} must be a range or an int64 tensor [B={B}, count], got "
                         f"{pos.dtype} {tuple(pos.shape)}")
    if pos.device != device:
        raise ValueError(f"{name} is on {pos.device}, the metric on {device}")
    return pos, pos.stride(0), pos.stride(1), 0, 1, pos.shape[1], True


def cosine_match_triton(metric: torch.Tensor, sources: Positions, candidates: Positions, *,
                        out_map: Optional[torch.Tensor] = None, map_offset: int = 0) -> Match:
    """For every source token, the most cosine-similar candidate token (ties: lower candidate index).

    Args:
        metric: ``[B, N, Cm]`` float32 / float16 / bfloat16 (copied if its channels are not contiguous);
            CUDA (or CPU under ``TRITON_INTERPRET=1``).
        sources: the ``S`` source positions of every image: an int64 tensor ``[B, S]`` (any strides)
            or a ``range`` shared by all images.
        candidates: the ``M`` candidate positions, likewise (ascending for "ties: lower position").
        out_map: optional int64 ``[B, N]`` index map (unit inner stride): ``out_map[b, source] =
            partner + map_offset`` is written in place (MSTM: the winner's output slot).

    Returns:
        :class:`Match` ``(best, partner)``: the best similarity (float32; NaN where a NaN similarity
        won, ``-inf`` if ``M == 0``) and the winner's index in ``candidates`` (int64).

    Raises:
        ValueError: malformed positions or ``out_map``; not on CUDA while the interpreter is off.
    """
    check_triton_device(metric)
    metric = metric if metric.stride(-1) == 1 else metric.contiguous()
    B, N, CM = metric.shape
    src, ssb, ssn, s0, s1, S, src_list = _positions_arg(sources, B, N, "sources", metric.device)
    cand, scb, scn, c0, c1, M, cand_list = _positions_arg(candidates, B, N, "candidates", metric.device)
    if out_map is not None and (out_map.shape != (B, N) or out_map.dtype != torch.int64 or out_map.stride(1) != 1):
        raise ValueError(f"out_map must be an int64 [B, N] = [{B}, {N}] tensor with unit inner stride")
    best = torch.empty(B, S, dtype=torch.float32, device=metric.device)
    partner = torch.empty(B, S, dtype=torch.int64, device=metric.device)
    if B * S == 0:
        return Match(best, partner)
    consts, num_warps = match_config(S, M, CM, metric.dtype)
    omap = partner if out_map is None else out_map
    _cosine_match_kernel[(B, triton.cdiv(S, consts["BLOCK_I"]))](
        metric, metric.stride(0), metric.stride(1),
        partner if src is None else src, ssb, ssn, s0, s1, S,
        partner if cand is None else cand, scb, scn, c0, c1, M,
        best, partner, omap, omap.stride(0), int(map_offset), CM,
        SRC_LIST=src_list, CAND_LIST=cand_list, WRITE_MAP=out_map is not None, **consts, num_warps=num_warps)
    return Match(best, partner)


# ----------------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (see kernels/aot.py)
# ----------------------------------------------------------------------------------------------------
_PTR = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}


def match_spec(name: str, S: int, M: int, CM: int, dtype: torch.dtype, src_list: bool, cand_list: bool,
               write_map: bool) -> KernelSpec:
    """The spec of one launch configuration of :func:`_cosine_match_kernel` (compiled kernels: no
    interpreter widening)."""
    consts, warps = compiled_match_config(S, M, CM, dtype)
    consts.update(SRC_LIST=src_list, CAND_LIST=cand_list, WRITE_MAP=write_map)
    sig = dict(metric_ptr=_PTR[dtype], metric_stride_b="i32", metric_stride_n="i32",
               src_ptr="*i64", stride_sb="i32", stride_sn="i32", src_start="i32", src_step="i32", S="i32",
               cand_ptr="*i64", stride_cb="i32", stride_cn="i32", cand_start="i32", cand_step="i32", M="i32",
               best_ptr="*fp32", partner_ptr="*i64", map_ptr="*i64", map_stride="i32", map_offset="i32", CM="i32")
    return KernelSpec(name, _cosine_match_kernel, sig, consts, warps,
                      divisible=("CM", "metric_stride_b", "metric_stride_n"))


def _aot_specs() -> list[KernelSpec]:
    """ViT-B/16 at 224 px, each storage dtype: MSTM (13 dropped sources vs 183 kept, lists, metric = x:
    768 channels, in chunks) and ToMe / BAT (98 x 98 ranges or lists, metric = head-mean keys: 64
    channels, one chunk for 16-bit metrics); BAT's attentive pairs (lists); float32 in one chunk."""
    def tag(dtype):
        return str(dtype).replace("torch.", "")

    specs = []
    for dtype in _PTR:
        specs.append(match_spec(f"cosine_match[{tag(dtype)},S=13,M=183,Cm=768,lists,map]", 13, 183, 768, dtype,
                                True, True, True))
        specs.append(match_spec(f"cosine_match[{tag(dtype)},S=98,M=98,Cm=64,ranges]", 98, 98, 64, dtype,
                                False, False, False))
    specs.append(match_spec("cosine_match[float16,S=49,M=49,Cm=64,lists]", 49, 49, 64, torch.float16,
                            True, True, False))
    specs.append(match_spec("cosine_match[float32,S=98,M=98,Cm=32,ranges]", 98, 98, 32, torch.float32,
                            False, False, False))
    return specs


register(_aot_specs)
