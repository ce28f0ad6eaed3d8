"""Kernel benchmarks: fastprune's fused operations against the PyTorch reference and eager op chains.

Run ``python -m benchmarks.kernels`` (all defaults for the device: the full grid on CUDA, a capped
grid on CPU); ``--quick`` for a smoke run; ``--help`` for the filters. For every case and provider
the run records the median and 20th/80th percentile time, the bytes the kernel must move (inputs
read once, outputs written once), the achieved GB/s and its fraction of the device's copy bandwidth
measured at the start of the same run, and the speed-ups over the eager chain and the reference.
Outputs go to ``benchmarks/results/kernels_<device>_<timestamp>.{csv,md}`` plus PNG plots.
Every provider's output is checked against the reference (computed from float32 copies of the
inputs) before it is timed; the ``match_frac`` and ``check`` columns report it.
"""
from __future__ import annotations

import argparse
import itertools
import sys
from typing import Optional, Sequence

import torch

from . import harness
from .ops import SHAPES, Case, KernelOp, kernel_ops, resolve_r

MODES = ("fwd", "fwd+bwd")

#: Default grids, per device; ``--quick`` picks the smaller ones.
GRIDS = {
    "cuda": dict(shapes=list(SHAPES), batches=[1, 8, 64, 256], dtypes=["fp16", "bf16", "fp32"],
                 modes=list(MODES), r=["13", "n/4"]),
    "cuda-quick": dict(shapes=["deit_s", "vit_b16"], batches=[8, 64], dtypes=["bf16"], modes=list(MODES), r=["13"]),
    "cpu": dict(shapes=["deit_s", "vit_b16"], batches=[1, 8], dtypes=["fp32", "bf16"], modes=list(MODES),
                r=["13", "n/4"]),
    "cpu-quick": dict(shapes=["deit_s"], batches=[1, 8], dtypes=["fp32"], modes=list(MODES), r=["13"]),
}

#: Relative tolerance of the output check, per dtype (relative to |expected| + mean |expected|).
CHECK_TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
#: A provider passes the check when at least this fraction of output rows match (a few cosine
#: argmax flips between half and float32 arithmetic are legitimate, a wrong kernel is not).
CHECK_MIN_MATCH = 0.98


def _list(text: Optional[str]) -> Optional[list]:
    return None if text is None else [t.strip() for t in text.split(",") if t.strip()]


def build_cases(op: KernelOp, device: torch.device, shapes: Sequence[str], batches: Sequence[int],
                dtypes: Sequence[str], modes: Sequence[str], r_specs: Sequence[str],
                keep_rates: Sequence[float] = (0.7,)) -> list:
    """The cartesian grid of :class:`Case` for ``op``: ``r`` or ``keep_rate`` only where ``op`` takes it."""
    cases = []
    for key, batch, dname, mode in itertools.product(shapes, batches, dtypes, modes):
        shape = SHAPES[key]
        if op.param == "r":
            params = [(r, None) for r in sorted({resolve_r(s, shape.N, op.name) for s in r_specs})]
        elif op.param == "keep_rate":
            params = [(None, float(k)) for k in keep_rates]
        else:
            params = [(None, None)]
        for r, keep_rate in params:
            cases.append(Case(op.name, shape, int(batch), harness.DTYPES[dname], mode, r, device, keep_rate))
    return cases


def _param(case: Case) -> str:
    if case.r is not None:
        return f"r={case.r}"
    if case.keep_rate is not None:
        return f"keep={case.keep_rate:g}"
    return ""


def _float32_copy(value):
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.detach().float()
    return value


def _check(out: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> tuple[float, float]:
    """(max abs error, fraction of matching rows) of ``out`` against ``expected``, in float32."""
    out, expected = out.detach().float(), expected.float()
    if out.shape != expected.shape:
        raise ValueError(f"output shape {tuple(out.shape)} != expected {tuple(expected.shape)}")
    err = (out - expected).abs()
    bound = CHECK_TOL[dtype] * (expected.abs() + expected.abs().mean())
    close = err <= bound
    rows = close.reshape(-1, close.shape[-1]).all(dim=-1) if close.dim() == 3 else close.reshape(-1)
    return float(err.max()), float(rows.float().mean())


def _timed_call(provider, case, inputs, grad_out):
    """The closure that is timed: forward (under no_grad), or forward + backward."""
    if case.backward:
        def fn():
            provider.fn(case, **inputs.kwargs).backward(grad_out)
    else:
        def fn():
            with torch.no_grad():
                provider.fn(case, **inputs.kwargs)
    return fn


def run_case(op: KernelOp, case: Case, providers: list, copy_gbps: float, warmup_ms: float,
             rep_ms: float) -> list:
    """Check and time every provider on one case; returns one row dict per provider."""
    inputs = op.make_inputs(case)
    fwd_bytes, bwd_bytes = op.bytes_moved(case)
    nbytes = fwd_bytes + (bwd_bytes if case.backward else 0)
    expected = None
    reference = next((p for p in providers if p.role == "reference"), None) or \
        next((p for p in providers if p.role == "eager"), None)
    if reference is not None:
        with torch.no_grad():
            expected = reference.fn(case, **{k: _float32_copy(v) for k, v in inputs.kwargs.items()})
    base = {"op": op.name, "shape": case.shape.name, "N": case.shape.N, "C": case.shape.C, "H": case.shape.H,
            "batch": case.batch, "dtype": harness.DTYPE_NAMES[case.dtype], "mode": case.mode,
            "r": "" if case.r is None else case.r, "keep_rate": "" if case.keep_rate is None else case.keep_rate,
            "n_out": op.n_out(case), "bytes": nbytes}
    rows = []
    for provider in providers:
        row = dict(base, provider=provider.name, role=provider.role)
        try:
            with torch.no_grad():
                out = provider.fn(case, **inputs.kwargs)
            if expected is None:
                row["check"] = "unchecked"
            else:
                row["max_abs_err"], row["match_frac"] = _check(out, expected, case.dtype)
                row["check"] = "ok" if row["match_frac"] >= CHECK_MIN_MATCH else "MISMATCH"
            grad_out = torch.randn_like(out) if case.backward else None
            del out
            t = harness.bench(_timed_call(provider, case, inputs, grad_out), case.device,
                              grad_to_none=inputs.leaves or None, warmup_ms=warmup_ms, rep_ms=rep_ms)
            row.update(median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms, reps=t.n,
                       gbps=nbytes / (t.median_ms * 1e-3) / 1e9, status="ok")
            row["frac_copy_bw"] = row["gbps"] / copy_gbps
        except Exception as exc:  # one failing provider must not end the run
            row.update(status="error", note=harness.first_line(exc))
            if case.device.type == "cuda":
                torch.cuda.empty_cache()
        for leaf in inputs.leaves:
            leaf.grad = None
        rows.append(row)
    times = {r["provider"]: r["median_ms"] for r in rows if r.get("status") == "ok"}
    eager_t = next((times[r["provider"]] for r in rows if r["role"] == "eager" and r["provider"] in times), None)
    ref_t = next((times[r["provider"]] for r in rows if r["role"] == "reference" and r["provider"] in times), None)
    for row in rows:
        t = times.get(row["provider"])
        row["speedup_vs_eager"] = eager_t / t if (t and eager_t) else float("nan")
        row["speedup_vs_reference"] = ref_t / t if (t and ref_t) else float("nan")
    return rows


def available_providers(op: KernelOp, device: torch.device, only: Optional[Sequence[str]]) -> tuple[list, dict]:
    """Providers of ``op`` that can run on ``device`` and the skip reason of the others."""
    ok, skipped = [], {}
    for p in op.providers:
        if only and p.name not in only and p.role != "reference":
            skipped[p.name] = "not selected (--providers)"
            continue
        reason = p.why_not(device)
        if reason is None:
            ok.append(p)
        else:
            skipped[p.name] = reason
    return ok, skipped


def _row_param(row: dict) -> str:
    if row.get("r", "") != "":
        return f"r={row['r']}"
    if row.get("keep_rate", "") != "":
        return f"keep={row['keep_rate']:g}"
    return ""


def summary_markdown(rows: list, skipped: dict, meta: dict, copy_gbps: float) -> str:
    """The run's Markdown summary: one table per operation, mode and dtype."""
    out = [f"### Kernel benchmarks — {meta['device']}",
           "",
           f"torch {meta['torch']}, triton {meta['triton']}, fastprune {meta['fastprune']} (git {meta['git']}), "
           f"{meta['timestamp']}. Copy bandwidth measured in this run: **{copy_gbps:.1f} GB/s**. "
           "Times are medians in ms; speed-ups are the eager chain's (or the reference's) median over "
           "fastprune's; %BW is the kernel's minimal traffic (inputs read once, outputs written once) "
           "per second as a fraction of that copy bandwidth.", ""]
    for op_name, reasons in skipped.items():
        for prov, why in reasons.items():
            out.append(f"- `{op_name}` / `{prov}` skipped: {why}")
    if any(skipped.values()):
        out.append("")
    groups = {}
    for row in rows:
        groups.setdefault((row["op"], row["mode"], row["dtype"]), []).append(row)
    for (op_name, mode, dtype), group in groups.items():
        providers = list(dict.fromkeys(r["provider"] for r in group))
        fast = next((p for p in providers if any(r["provider"] == p and r["role"] == "fastprune"
                                                   and r.get("status") == "ok" for r in group)), None)
        header = ["shape", "B", "param"] + [f"{p} ms" for p in providers]
        roles = {r["provider"]: r["role"] for r in group}
        # The %BW column: fastprune's kernel, else the eager chain, else the reference.
        shown = fast or next((p for p in providers if roles[p] == "eager"), None) or providers[0]
        if fast:
            header += [f"{fast} vs eager", f"{fast} vs reference"]
        header += [f"{shown} %BW"]
        table = []
        keys = list(dict.fromkeys((r["shape"], r["batch"], _row_param(r)) for r in group))
        for key in keys:
            cells = {r["provider"]: r for r in group if (r["shape"], r["batch"], _row_param(r)) == key}

            def ms(p):
                c = cells.get(p)
                if c is None:
                    return "–"
                if c.get("status") != "ok":
                    return "error"
                return f"{c['median_ms']:.3g}" + (" (!)" if c.get("check") == "MISMATCH" else "")

            line = [key[0], key[1], key[2] or "–"] + [ms(p) for p in providers]
            c = cells.get(shown, {})
            if fast:
                line += [c.get("speedup_vs_eager", float("nan")), c.get("speedup_vs_reference", float("nan"))]
            line += [f"{100 * c['frac_copy_bw']:.1f}%" if "frac_copy_bw" in c else "–"]
            table.append(line)
        out += [f"#### {op_name}, {mode}, {dtype}", "", harness.markdown_table(header, table), ""]
    if any(r.get("check") == "MISMATCH" for r in rows):
        out.append("(!) output differs from the reference beyond the tolerance on more than "
                   f"{100 * (1 - CHECK_MIN_MATCH):.0f}% of rows (CSV column match_frac). For an eager chain in "
                   "half precision this is its own rounding flipping argmax/sort decisions (it computes in the "
                   "input dtype, the reference in float32); for a fastprune kernel it is a bug.")
    errors = [r for r in rows if r.get("status") == "error"]
    if errors:
        out.append(f"{len(errors)} provider runs failed; first: `{errors[0]['provider']}` on "
                   f"{errors[0]['shape']} B={errors[0]['batch']} {errors[0]['dtype']} {errors[0]['mode']}: "
                   f"{errors[0]['note']}")
    return "\n".join(out)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.kernels", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--quick", action="store_true", help="a small grid: a smoke run of a minute or two")
    ap.add_argument("--ops", help=f"comma list of operations (default all: {','.join(kernel_ops())})")
    ap.add_argument("--providers", help="comma list of providers to time (the reference always runs)")
    ap.add_argument("--shapes", help=f"comma list of {','.join(SHAPES)}")
    ap.add_argument("--batches", help="comma list of batch sizes")
    ap.add_argument("--dtypes", help="comma list of fp32,fp16,bf16")
    ap.add_argument("--modes", help="comma list of fwd,fwd+bwd")
    ap.add_argument("--r", help="comma list of r values; 'n/4' is a quarter of the tokens (default 13,n/4)")
    ap.add_argument("--keep-rates", default="0.7,0.5", help="comma list of keep rates for pruning/fusion "
                                                             "operations (EViT; default 0.7,0.5)")
    ap.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's)")
    ap.add_argument("--warmup-ms", type=float, default=25.0, help="warm-up budget per timing")
    ap.add_argument("--rep-ms", type=float, help="timing budget per provider and case (default 100 on "
                                                  "CUDA, 200 on CPU)")
    ap.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    return ap.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> list:
    """Run the kernel benchmarks; returns the result rows (also written to CSV / Markdown / PNG)."""
    args = parse_args(argv)
    device = harness.setup(args.device, args.threads)
    grid = dict(GRIDS[device.type + ("-quick" if args.quick else "")])
    for name in ("shapes", "dtypes", "modes", "r"):
        if getattr(args, name) is not None:
            grid[name] = _list(getattr(args, name))
    if args.batches is not None:
        grid["batches"] = [int(b) for b in _list(args.batches)]
    unknown = [s for s in grid["shapes"] if s not in SHAPES] + [d for d in grid["dtypes"] if d not in harness.DTYPES] \
        + [m for m in grid["modes"] if m not in MODES]
    if unknown:
        sys.exit(f"unknown shape/dtype/mode: {unknown}")
    all_ops = kernel_ops()
    op_names = _list(args.ops) or list(all_ops)
    if any(o not in all_ops for o in op_names):
        sys.exit(f"unknown op in {op_names}; known: {list(all_ops)}")
    rep_ms = args.rep_ms or (100.0 if device.type == "cuda" else 200.0)

    meta = harness.run_metadata(device)
    stem = harness.result_stem("kernels", device)
    print(f"device: {meta['device']}; torch {meta['torch']}, triton {meta['triton']}, fastprune {meta['fastprune']}")
    copy_gbps = harness.copy_bandwidth_gbps(device)
    print(f"copy bandwidth: {copy_gbps:.1f} GB/s")

    rows, skipped = [], {}
    for op_name in op_names:
        op = all_ops[op_name]
        providers, skipped[op_name] = available_providers(op, device, _list(args.providers))
        for prov, why in skipped[op_name].items():
            print(f"[{op_name}] skipping provider {prov}: {why}")
        cases = build_cases(op, device, grid["shapes"], grid["batches"], grid["dtypes"], grid["modes"], grid["r"],
                            [float(k) for k in _list(args.keep_rates)])
        print(f"[{op_name}] {len(cases)} cases x {len(providers)} providers ({', '.join(p.name for p in providers)})")
        for i, case in enumerate(cases):
            torch.manual_seed(i)
            try:
                case_rows = run_case(op, case, providers, copy_gbps, args.warmup_ms, rep_ms)
            except Exception as exc:  # e.g. out of memory while building the inputs
                case_rows = [{"op": op.name, "shape": case.shape.name, "batch": case.batch,
                              "dtype": harness.DTYPE_NAMES[case.dtype], "mode": case.mode, "r": case.r or "",
                              "keep_rate": case.keep_rate or "", "provider": "*", "role": "", "status": "error",
                              "note": harness.first_line(exc)}]
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            rows += [dict(meta, copy_gbps=copy_gbps, **r) for r in case_rows]
            desc = "  ".join(f"{r['provider']}={r['median_ms']:.3g}ms" if r.get("status") == "ok"
                             else f"{r['provider']}=error" for r in case_rows)
            print(f"  {case.shape.name} B={case.batch} {harness.DTYPE_NAMES[case.dtype]} {case.mode} {_param(case)}: "
                  f"{desc}", flush=True)

    md = summary_markdown(rows, skipped, meta, copy_gbps)
    harness.write_results(stem, rows, md, None if args.no_plots else "kernel_plots")
    return rows


if __name__ == "__main__":
    main()
