"""Cost model of fastprune's fused launches: what each must move and compute, and the time that implies.

GPUs are rare here, so predictions come first and measurements (``benchmarks/gpu_check.py``) check
them. For each launch at a ViT geometry the model gives:

* ``min_bytes``: every input read once, every output written once (the memory roofline);
* ``useful_flops`` and ``written_flops``: the arithmetic the algorithm needs and the arithmetic the
  kernel issues as written (a gap is wasted work, e.g. comparing against tokens that cannot match);
* ``tensor_cores``: whether the kernel's products can run on tensor cores;
* ``registers`` / ``resident_warps``: from the ahead-of-time sm_90 compile (``--aot``), else blank;
* ``predicted_us``: ``max(min_bytes / bandwidth, written_flops / peak, serial_us)``, where
  ``serial_us`` is the latency-bound time of the dependent steps each program walks through
  (block reductions, dependent loads), spread over the programs that fit on the GPU at once.

Numbers of the machine (:data:`H200`) are nominal figures and the fastprune-measured copy bandwidth;
the per-step latencies are estimates (one block-wide reduction ~0.3 us, one dependent L2 load
~0.6 us). This is a model: say so wherever its figures are quoted.

    python -m benchmarks.cost_model [--aot] [--batch 1 256] [--dtype bf16]
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from typing import Optional

from benchmarks import harness


@dataclasses.dataclass(frozen=True)
class Machine:
    name: str
    bandwidth_gbps: float  # measured device-to-device copy bandwidth, GB/s
    fp32_fma_tflops: float  # scalar FMA issue rate (IEEE fp32 tl.dot runs here)
    tc_tflops: float  # dense fp16/bf16 tensor cores
    sms: int
    reduction_us: float = 0.3  # one block-wide reduction (shuffles + shared memory + barrier)
    dependent_load_us: float = 0.6  # one load whose address depends on the previous step


#: The GPU machine (ENVIRONMENT.md: ~4.3 TB/s measured copy bandwidth, 132 SMs).
H200 = Machine("H200", 4300.0, 67.0, 790.0, 132)


@dataclasses.dataclass(frozen=True)
class Launch:
    name: str
    aot_prefix: str  # the kernel's name in the ahead-of-time registry
    min_bytes: float
    useful_flops: float
    written_flops: float
    tensor_cores: bool
    programs: int
    serial_steps_reduction: float  # per program
    serial_steps_load: float  # per program
    num_warps: int


def _vit_block_flops(N: int, C: int) -> float:
    """FLOPs of one ViT block on N tokens of width C (qkv, proj, MLP 4C; attention q k^T and attn v)."""
    return 2 * N * 12 * C * C + 4 * N * N * C


def mstm_launches(B: int, N: int, C: int, r: int, elt: int) -> list:
    """The MSTM merge's launches as written in kernels/merge.py (select+match, gather merge, backward)."""
    S = N - r
    tiles_i = math.ceil(N / 16)  # select+match: BLOCK_I = 16 rows per program (N <= 1024)
    search_steps = 33 + max(4, math.ceil(math.log2(max(16, N))))  # bitwise threshold search, one reduction each
    select = Launch(
        "mstm_select_match", "mstm_select_match[",
        min_bytes=B * (N * C * elt + N * 4 + N * 8),
        useful_flops=B * 2 * r * (N - r) * C,  # sources x kept candidates
        written_flops=B * tiles_i * 16 * N * 2 * C,  # every tile row against all N tokens
        tensor_cores=False,  # IEEE fp32 tl.dot on converted tiles
        programs=B * tiles_i, serial_steps_reduction=search_steps + 2 * math.ceil(N / 16),
        serial_steps_load=math.ceil(N / 16), num_warps=4)
    rows = 16
    merge = Launch(
        "mstm_weighted_merge (gather)", "mstm_weighted_merge[",
        min_bytes=B * ((N + S) * C * elt + N * (8 + 4 + 4) + S * 8),
        useful_flops=B * 2 * N * C, written_flops=B * 2 * N * C, tensor_cores=False,
        programs=B * math.ceil(S / rows),
        serial_steps_reduction=rows * 3 + 2 * (N / S) * rows,  # W, size, count per row; find i, w_i per input
        serial_steps_load=rows * N / S, num_warps=4)
    backward = Launch(
        "mstm_merge_backward", "mstm_merge_backward[",
        min_bytes=B * (S * C * elt + N * 8 + N * C * elt),
        useful_flops=B * 2 * N * C, written_flops=B * 4 * N * C, tensor_cores=False,
        programs=B * math.ceil(N / 32), serial_steps_reduction=2, serial_steps_load=2, num_warps=4)
    return [select, merge, backward]


def predict(launch: Launch, machine: Machine, resident_warps: Optional[int]) -> dict:
    memory_us = launch.min_bytes / (machine.bandwidth_gbps * 1e9) * 1e6
    peak = machine.tc_tflops if launch.tensor_cores else machine.fp32_fma_tflops
    compute_us = launch.written_flops / (peak * 1e12) * 1e6
    per_sm = max(1, (resident_warps or 16) // launch.num_warps)
    waves = math.ceil(launch.programs / (machine.sms * per_sm))
    serial_us = waves * (launch.serial_steps_reduction * machine.reduction_us
                         + launch.serial_steps_load * machine.dependent_load_us)
    bound = max((memory_us, "memory"), (compute_us, "issue"), (serial_us, "latency"))
    return {"memory_us": memory_us, "compute_us": compute_us, "serial_us": serial_us,
            "predicted_us": bound[0], "bound": bound[1], "x_roofline": bound[0] / memory_us}


def aot_usage(cc: int = 90) -> dict:
    """``{aot name prefix: (registers, resident warps)}`` of the MSTM kernels (bf16, N=197), compiled now."""
    from fastprune.kernels import aot

    wanted = ("mstm_select_match[bfloat16", "mstm_weighted_merge[bfloat16", "mstm_merge_backward[bfloat16")
    specs = [s for s in aot.registered_specs() if s.name.startswith(wanted) and s.name.endswith("@jit")]
    out = {}
    for row in aot.compile_all((cc,), specs=specs):
        if row["ok"]:
            prefix = row["name"].split("[")[0] + "["
            out[prefix] = (row["registers"], aot.resident_warps(row["registers"], row["num_warps"],
                                                                row.get("shared_bytes") or 0))
    return out


def table(batches=(1, 256), dtype: str = "bf16", N: int = 197, C: int = 768, r: int = 13,
          machine: Machine = H200, usage: Optional[dict] = None) -> list:
    elt = harness.DTYPES[dtype].itemsize
    rows = []
    for B in batches:
        launches = mstm_launches(B, N, C, r, elt)
        block_us = B * _vit_block_flops(N, C) / (0.75 * machine.tc_tflops * 1e12) * 1e6
        forward = 0.0
        for launch in launches:
            regs, warps = (usage or {}).get(launch.aot_prefix, (None, None))
            p = predict(launch, machine, warps)
            if "backward" not in launch.name:
                forward += p["predicted_us"]
            rows.append(dict(batch=B, dtype=dtype, launch=launch.name, min_mb=launch.min_bytes / 1e6,
                             useful_gflop=launch.useful_flops / 1e9, written_gflop=launch.written_flops / 1e9,
                             tensor_cores=launch.tensor_cores, registers=regs, resident_warps=warps, **p))
        rows.append(dict(batch=B, dtype=dtype, launch="MSTM forward / one ViT-B block (75% of TC peak)",
                         predicted_us=forward, bound=f"{forward / block_us:.0%} of {block_us:.0f} us"))
    return rows


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 256])
    parser.add_argument("--dtype", default="bf16", choices=sorted(harness.DTYPES))
    parser.add_argument("--aot", action="store_true", help="compile the kernels for sm_90 to read registers")
    args = parser.parse_args(argv)
    usage = aot_usage() if args.aot else None
    rows = table(args.batch, args.dtype, usage=usage)
    cols = ["batch", "launch", "min_mb", "useful_gflop", "written_gflop", "tensor_cores", "registers",
            "resident_warps", "memory_us", "compute_us", "serial_us", "predicted_us", "bound", "x_roofline"]
    print(f"Cost model (a model, not a measurement): MSTM merge at ViT-B/16, N=197, C=768, r=13, {args.dtype}, "
          f"{H200.name} ({H200.bandwidth_gbps:.0f} GB/s copy, {H200.fp32_fma_tflops:.0f} TFLOP/s fp32 FMA, "
          f"{H200.tc_tflops:.0f} TFLOP/s bf16 tensor cores)\n")
    print(harness.markdown_table(cols, [[r.get(c, "") for c in cols] for r in rows]))
    return rows


if __name__ == "__main__":
    main()
