"""Cost model of fastprune's fused launches: what each must move and compute, and the time that implies.

GPUs are rare here, so predictions come first and measurements (``benchmarks/gpu_check.py``) check
them. For each launch of the MSTM merge and of ToMe at a ViT geometry the model gives:

* ``min_bytes``: every input read once, every output written once (the memory roofline);
* ``useful_flops`` and ``written_flops``: the arithmetic the algorithm needs and the arithmetic the
  kernel issues as written (a gap is wasted work: padded tiles, candidates that cannot match, rows
  of a gather round that have no token, the three products of TF32x3). Integer comparisons of the
  selection and of the merge's index scan are counted as operations too;
* ``tensor_cores``: whether the kernel's products run on tensor cores;
* ``registers`` / ``resident_warps``: from the ahead-of-time sm_90 compile (``--aot``), else blank;
* ``sass_barriers``: the ``BAR.SYNC`` instructions of that compile as written (reductions and scans
  across warps, layout conversions through shared memory). Not part of ``serial_us``, which counts
  the algorithm's reductions: a kernel with many more barriers than modelled reductions has a
  longer chain than predicted;
* ``predicted_us``: ``max(min_bytes / bandwidth, written_flops / peak, serial_us)``, where
  ``serial_us`` is the latency-bound time of the dependent steps each program walks through
  (block reductions, dependent loads, and the instructions of the rank top-k's comparison tiles,
  issued by one program's warps on an SM's 4 schedulers), spread over the programs that fit on the
  GPU at once.

Launch configurations (tiles, warps, grids) are read from the kernel files, so the model follows the
code. Numbers of the machine (:data:`H200`) are nominal figures and the fastprune-measured copy
bandwidth; the per-step latencies are estimates (one block-wide reduction ~0.3 us, one dependent L2
load ~0.6 us). This is a model: say so wherever its figures are quoted.

    python -m benchmarks.cost_model [--aot] [--batch 1 256] [--dtype bf16 fp16 fp32]
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from typing import Optional

import torch
import triton

from benchmarks import harness


@dataclasses.dataclass(frozen=True)
class Machine:
    name: str
    bandwidth_gbps: float  # measured device-to-device copy bandwidth, GB/s
    fp32_fma_tflops: float  # scalar FMA issue rate (IEEE fp32 tl.dot and integer compares run here)
    tc_tflops: float  # dense fp16/bf16 tensor cores (TF32: half of it)
    sms: int
    reduction_us: float = 0.3  # one block-wide reduction (shuffles + shared memory + barrier)
    dependent_load_us: float = 0.6  # one load whose address depends on the previous step
    clock_ghz: float = 1.98  # boost clock; one program's warps issue on the SM's 4 schedulers
    schedulers: int = 4


#: The GPU machine (ENVIRONMENT.md: ~4.3 TB/s measured copy bandwidth, 132 SMs).
H200 = Machine("H200", 4300.0, 67.0, 790.0, 132)


@dataclasses.dataclass(frozen=True)
class Launch:
    name: str
    aot_name: str  # the spec compiled for registers (its "@jit" variant), from the AOT registry
    min_bytes: float
    useful_flops: float
    written_flops: float
    tensor_cores: bool
    programs: int
    serial_steps_reduction: float  # per program
    serial_steps_load: float  # per program
    num_warps: int
    backward: bool = False
    tc_flops: float = 0.0  # the part of written_flops that runs on tensor cores (rest: scalar issue)
    tc_rate: float = 1.0  # tensor-core rate relative to bf16 (TF32: 1/2)
    serial_ops: float = 0.0  # per program: scalar operations on its critical path (rank top-k tiles)


def _vit_block_flops(N: int, C: int) -> float:
    """FLOPs of one ViT block on N tokens of width C (qkv, proj, MLP 4C; attention q k^T and attn v)."""
    return 2 * N * 12 * C * C + 4 * N * N * C


def _tag(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _select_work(lo: int, hi: int, consts: dict, block: str) -> tuple:
    """``(integer ops, serial reductions, serial loads, serial ops)`` of kernels/select.py's top-k on one
    row of ``consts[block]`` keys whose members are ``lo <= n < hi`` (per image).

    Radix search (``RANK_CHUNK == 0``): ``32 / RADIX_BITS`` steps of a ``[2**bits, BLOCK]`` comparison
    (one reduction each), the count above the threshold, the tie cumsum and the slot cumsum.
    Ranks (``RANK_CHUNK > 0``, short rows): the ``[CHUNK, BLOCK]`` tiles of the chunks covering the
    members, 3 operations per pair (the int64 comparison, the count), reduced once, then the slot
    cumsum; the chunks' loads are independent (one latency), and the tiles' instructions are on the
    program's critical path (``serial ops``, per program)."""
    width, chunk = consts[block], consts.get("RANK_CHUNK", 0)
    if chunk:
        chunks = math.ceil(hi / chunk) - lo // chunk
        tile_ops = chunks * chunk * width * 3
        return tile_ops + 4 * width, 2, 2, tile_ops
    bits = consts["RADIX_BITS"]
    steps = math.ceil(32 / bits)
    return steps * (width << bits) + 4 * width, steps + 3, 2, 0


def _match_work(S: int, M: int, CM: int, dtype: torch.dtype, consts: dict, ranges: bool) -> tuple:
    """``(written flops, serial reductions, serial loads)`` per image of kernels/match.py's
    :func:`cosine_argmax` over ``S`` sources in tiles of ``BLOCK_I`` (one after the other in the
    image's program) against ``M`` candidates in tiles of ``BLOCK_J``: per candidate tile a running
    max/argmax (2 reductions) and the candidate rows' load, after their positions' load for lists
    (ranges: positions are arithmetic); per source tile its rows' load and the results' store.

    ``ONE_TILE`` (ToMe at ViT/16 224 px: :func:`cosine_argmax_tile`): one source tile, ``J_TILES``
    unrolled candidate tiles (ranges); per candidate tile one max-with-index reduction. In one
    channel chunk with ``PREFETCH`` (sm_90) the sources' rows and the first two candidate tiles are
    loaded before any arithmetic (tests/test_aot.py checks in the sm_90 SASS that no load follows the
    first product), later tiles two ahead of their use: one latency, plus one per tile beyond two
    (conservatively); without it (sm_80) each tile's load follows the previous tile's product and the
    sources' norms: ``1 + J_TILES``; in chunks, each tile loads the sources' chunks with its own:
    ``J_TILES`` loads in sequence; no store (the caller's)."""
    bi, bj = consts["BLOCK_I"], consts["BLOCK_J"]
    passes = 3 if dtype == torch.float32 else 1  # TF32x3: three tensor-core products
    if consts.get("ONE_TILE"):
        tiles_j = consts["J_TILES"]
        if consts["SINGLE_CHUNK"]:
            loads = 1 + max(0, tiles_j - 2) if consts["PREFETCH"] else 1 + tiles_j
        else:
            loads = tiles_j
        return tiles_j * bi * bj * CM * 2 * passes, tiles_j, loads
    tiles_i, tiles_j = math.ceil(S / bi), math.ceil(M / bj)
    written = tiles_i * tiles_j * bi * bj * CM * 2 * passes
    return written, tiles_i * 2 * tiles_j, tiles_i * ((1 if ranges else 2) * tiles_j + 2)


def mstm_select_match_launch(B: int, N: int, CM: int, r: int, dtype: torch.dtype, elt: int, p: int = 1) -> Launch:
    """kernels/merge.py's fused launch, one program per image: the top-k of the score row, then the
    cosine matching of the ``r`` sources against the ``K`` kept non-prefix tokens (lists, tensor cores)."""
    from fastprune.kernels.merge import select_match_config

    K = N - p - r
    consts, warps = select_match_config(N, r, p, CM, dtype)
    sel_ops, sel_red, sel_load, sel_serial = _select_work(p, N, consts, "BLOCK_N")
    mflops, m_red, m_load = _match_work(r, K, CM, dtype, consts, ranges=False)
    return Launch(
        "MSTM select + match (one program per image)", f"mstm_select_match[{_tag(dtype)},N={N},r={r},Cm={CM}]",
        min_bytes=B * (N * 4 + (N - p) * CM * elt + (2 * N + r) * 8),
        useful_flops=B * 2 * r * K * CM, written_flops=B * (mflops + sel_ops), tensor_cores=True,
        # + write_selection's round trip through memory (two barriers, one reload of the slots) and the
        # barrier before the matching
        programs=B, serial_steps_reduction=sel_red + 2 + m_red, serial_steps_load=sel_load + 1 + 1 + m_load,
        num_warps=warps, tc_flops=B * mflops, tc_rate=0.5 if dtype == torch.float32 else 1.0,
        serial_ops=sel_serial)


def tome_match_select_launch(B: int, N: int, CM: int, r: int, dtype: torch.dtype, elt: int, p: int = 1) -> Launch:
    """kernels/tome.py's fused launch, one program per image: the A-vs-B cosine matching (ranges,
    tensor cores), then the top-r of the A tokens' best scores and the merge plan.

    ``ONE_TILE`` (up to 257 tokens), all in registers: the matching (:func:`_match_work`), the rank
    top-k of the best scores (one ``[BLOCK_I, BLOCK_I]`` comparison tile, 3 operations per pair, one
    reduction), the scan counting the merged flags, then the plan's stores (one latency), scattered
    from those counts when the metric is one channel chunk (its tiles loaded in the kernel's body);
    in chunks (float32) the lists' inverse comes first (a second tile, 2 operations per pair: the
    comparison and the select, and a reduction).
    Otherwise: the matching over source tiles, the scratch rows' store, a barrier and the top-k of the
    row read back (:func:`_select_work`)."""
    from fastprune.kernels.tome import match_select_config

    NA, NB = (N + 1) // 2, N // 2
    NS, M = NA - (p + 1) // 2, NB - p // 2
    consts, warps = match_select_config(N, p, CM, dtype)
    mflops, m_red, m_load = _match_work(NS, M, CM, dtype, consts, ranges=True)
    if consts["ONE_TILE"]:
        inverse = not consts["SINGLE_CHUNK"]
        tile_ops = (3 + 2 * inverse) * consts["BLOCK_I"] ** 2  # the rank tile (and the lists' inverse tile)
        sel_ops, sel_red, sel_load, sel_serial = tile_ops + 4 * consts["BLOCK_I"], 2 + inverse, 1, tile_ops
    else:
        sel_ops, sel_red, sel_load, sel_serial = _select_work((p + 1) // 2, NA, consts, "BLOCK_NA")
    return Launch(
        "ToMe match + select (one program per image)", f"tome_match_select[{_tag(dtype)},N={N},Cm={CM}]",
        min_bytes=B * ((N - p) * CM * elt + (2 * N + r) * 8),
        useful_flops=B * 2 * NS * M * CM, written_flops=B * (mflops + sel_ops), tensor_cores=True,
        programs=B, serial_steps_reduction=m_red + sel_red, serial_steps_load=m_load + sel_load,
        num_warps=warps, tc_flops=B * mflops, tc_rate=0.5 if dtype == torch.float32 else 1.0,
        serial_ops=sel_serial)


def _merge_launches(B: int, N: int, C: int, S: int, n_sources: int, elt: int, has_scores: bool, has_size: bool,
                    prefix: str, fwd_aot: str, bwd_aot: str, plan: bool = True) -> list:
    """kernels/weighted_merge.py forward (gather) and backward, for ``n_sources`` of the N tokens merged
    into other tokens' rows; ``plan``: the gather reads the selection's compact lists (MSTM, ToMe),
    else it scans the index map (BAT)."""
    from fastprune.kernels.weighted_merge import backward_config, merge_config

    consts, warps = merge_config(N, C, has_size, has_scores, n_sources if plan else None)
    rows, block_n, split, block_c = consts["ROWS"], consts["BLOCK_N"], consts["C_SPLIT"], consts["BLOCK_C"]
    tiles = math.ceil(S / rows)
    splits = math.ceil(C / split)
    chunks = math.ceil(min(split, C) / block_c)
    # rounds of a tile: 1 + the sources of its busiest row; a tile holds rows * n_sources / S sources on
    # average, rarely more than one per row. The first two tokens of every row are found and loaded
    # together: only rounds beyond two are sequential.
    rounds = 1 + min(1.0, rows * n_sources / S)
    later = max(0.0, rounds - 2)
    weight_bytes = N * ((4 if has_scores else 0) + (4 if has_size else 0))
    index_bytes = (2 * N + n_sources) * 8 if plan else N * 8
    fwd = Launch(
        f"{prefix} weighted merge (gather{' from lists' if plan else ''})", fwd_aot,
        min_bytes=B * ((N + S) * C * elt + index_bytes + weight_bytes + S * 8),
        useful_flops=B * 2 * N * C,
        written_flops=B * tiles * splits * (2 * max(2.0, rounds) * rows * split  # FMAs, all rows, 2+ tokens
                                            + rows * block_n * (3 + later * (1 + chunks))),  # comparisons
        tensor_cores=False, programs=B * tiles * splits,
        # the index row scan (map) or nothing (lists), the first two tokens, later rounds; then the
        # lists (or index row), the first two tokens' weights, and per chunk their rows (and later ones)
        serial_steps_reduction=(0 if plan else 1) + 2 + later * (1 + chunks),
        serial_steps_load=2 + chunks * (1 + later), num_warps=warps)
    consts, warps = backward_config(has_size, has_scores, True, has_scores, has_size)
    need_gw = has_scores or has_size
    bwd = Launch(
        f"{prefix} weighted merge backward", bwd_aot,
        min_bytes=B * (S * C * elt * (2 if need_gw else 1) + N * C * elt * (2 if need_gw else 1)
                       + N * 8 + S * 8 + weight_bytes + N * 4 * (int(has_scores) + int(has_size))),
        useful_flops=B * N * C * (4 if need_gw else 1), written_flops=B * N * C * (4 if need_gw else 1),
        tensor_cores=False, programs=B * math.ceil(N / consts["BLOCK_I"]),
        serial_steps_reduction=2, serial_steps_load=2 + math.ceil(C / consts["BLOCK_C"]) / 4,
        num_warps=warps, backward=True)
    return [fwd, bwd]


def mstm_launches(B: int, N: int, C: int, r: int, elt: int, dtype: torch.dtype = torch.bfloat16,
                  p: int = 1) -> list:
    """The MSTM merge as kernels/merge.py composes it: select + match (metric = x), gather merge, backward."""
    tag = _tag(dtype)
    return [mstm_select_match_launch(B, N, C, r, dtype, elt, p),
            *_merge_launches(B, N, C, N - r, r, elt, True, True, "MSTM", *_MSTM_MERGE_AOT[tag])]


#: The registered MSTM merge instantiation of each dtype (forward, backward); float32's forward is the
#: ``weight="size"`` one (the kernel differs only by the score load).
_MSTM_MERGE_AOT = {
    "float32": ("mstm_weighted_merge[float32,size]", "mstm_merge_backward[float32,size_attn]"),
    "float16": ("mstm_weighted_merge[float16,size_attn]", "mstm_merge_backward[float16,size_attn]"),
    "bfloat16": ("mstm_weighted_merge[bfloat16,size_attn]", "mstm_merge_backward[bfloat16,size]"),
}


def tome_launches(B: int, N: int, C: int, r: int, elt: int, dtype: torch.dtype = torch.bfloat16,
                  p: int = 1, CM: int = 64) -> list:
    """ToMe as kernels/tome.py composes it (metric = head-mean keys, ``CM`` channels): match + select,
    gather merge, backward."""
    tag = _tag(dtype)
    return [tome_match_select_launch(B, N, CM, r, dtype, elt, p),
            *_merge_launches(B, N, C, N - r, r, elt, False, True, "ToMe",
                             f"tome_merge[{tag},size]", f"tome_merge_backward[{tag},size]")]


def predict(launch: Launch, machine: Machine, resident_warps: Optional[int]) -> dict:
    memory_us = launch.min_bytes / (machine.bandwidth_gbps * 1e9) * 1e6
    scalar = launch.written_flops - launch.tc_flops
    compute_us = (launch.tc_flops / (launch.tc_rate * machine.tc_tflops * 1e12)
                  + scalar / (machine.fp32_fma_tflops * 1e12)) * 1e6
    per_sm = max(1, (resident_warps or 16) // launch.num_warps)
    waves = math.ceil(launch.programs / (machine.sms * per_sm))
    issue_us = launch.serial_ops / (32 * machine.schedulers * machine.clock_ghz * 1e3)
    serial_us = waves * (launch.serial_steps_reduction * machine.reduction_us
                         + launch.serial_steps_load * machine.dependent_load_us + issue_us)
    bound = max((memory_us, "memory"), (compute_us, "issue"), (serial_us, "latency"))
    return {"memory_us": memory_us, "compute_us": compute_us, "serial_us": serial_us,
            "predicted_us": bound[0], "bound": bound[1], "x_roofline": bound[0] / memory_us}


def aot_usage(names, cc: int = 90) -> dict:
    """``{spec name: (registers, resident warps, barriers)}`` of the named specs as the JIT specialises
    them, compiled now (no GPU needed); barriers: ``BAR.SYNC`` in the SASS as written (not counted by
    the model's serial steps: a check on them)."""
    from fastprune.kernels import aot

    wanted = {f"{n}@jit" for n in names}
    specs = [s for s in aot.registered_specs() if s.name in wanted]
    out = {}
    for row in aot.compile_all((cc,), specs=specs):
        if row["ok"]:
            out[row["name"][: -len("@jit")]] = (row["registers"], aot.resident_warps(
                row["registers"], row["num_warps"], row.get("shared_bytes") or 0), row.get("barriers"))
    return out


def launches(B: int, dtype: str = "bf16", N: int = 197, C: int = 768, r: int = 13) -> dict:
    """``{method: [Launch]}`` at one batch size and storage dtype."""
    torch_dtype = harness.DTYPES[dtype]
    elt = torch_dtype.itemsize
    return {"MSTM": mstm_launches(B, N, C, r, elt, torch_dtype), "ToMe": tome_launches(B, N, C, r, elt, torch_dtype)}


def table(batches=(1, 256), dtype: str = "bf16", N: int = 197, C: int = 768, r: int = 13,
          machine: Machine = H200, usage: Optional[dict] = None) -> list:
    rows = []
    for B in batches:
        block_us = B * _vit_block_flops(N, C) / (0.75 * machine.tc_tflops * 1e12) * 1e6
        for method, method_launches in launches(B, dtype, N, C, r).items():
            forward = 0.0
            for launch in method_launches:
                regs, warps, bars = (usage or {}).get(launch.aot_name, (None, None, None))
                p = predict(launch, machine, warps)
                if not launch.backward:
                    forward += p["predicted_us"]
                rows.append(dict(batch=B, dtype=dtype, launch=launch.name, min_mb=launch.min_bytes / 1e6,
                                 useful_gflop=launch.useful_flops / 1e9, written_gflop=launch.written_flops / 1e9,
                                 tensor_cores=launch.tensor_cores, registers=regs, resident_warps=warps,
                                 sass_barriers=bars, **p))
            rows.append(dict(batch=B, dtype=dtype, launch=f"{method} forward / one ViT-B block (75% of TC peak)",
                             predicted_us=forward, bound=f"{forward / block_us:.0%} of {block_us:.0f} us"))
    return rows


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 256])
    parser.add_argument("--dtype", nargs="+", default=["bf16"], choices=sorted(harness.DTYPES))
    parser.add_argument("--aot", action="store_true", help="compile the kernels for sm_90 to read registers")
    args = parser.parse_args(argv)
    names = {launch.aot_name for dtype in args.dtype for group in launches(1, dtype).values() for launch in group}
    usage = aot_usage(sorted(names)) if args.aot else None
    rows = [row for dtype in args.dtype for row in table(args.batch, dtype, usage=usage)]
    cols = ["batch", "dtype", "launch", "min_mb", "useful_gflop", "written_gflop", "tensor_cores", "registers",
            "resident_warps", "sass_barriers", "memory_us", "compute_us", "serial_us", "predicted_us", "bound", "x_roofline"]
    print(f"Cost model (a model, not a measurement): the MSTM merge and ToMe at ViT-B/16, N=197, C=768, r=13 "
          f"(ToMe's metric: 64-channel head-mean keys), {H200.name} ({H200.bandwidth_gbps:.0f} GB/s copy, "
          f"{H200.fp32_fma_tflops:.0f} TFLOP/s fp32 FMA, {H200.tc_tflops:.0f} TFLOP/s bf16 tensor cores); "
          f"registers: sm_90 ahead-of-time compile as the JIT specialises the launch\n")
    print(harness.markdown_table(cols, [[r.get(c, "") for c in cols] for r in rows]))
    return rows


if __name__ == "__main__":
    main()
