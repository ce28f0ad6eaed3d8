"""Reduction overhead: each method against its "free" variant and its eager op chain, side by side.

Run ``python -m benchmarks.overhead`` (defaults: ViT-S/16, random weights, float32, batch 32, 2
threads on CPU; bfloat16, batch 256 on CUDA). Each method of :data:`benchmarks.variants.MATCHED`
(ToMe r=13 and the others at its FLOPs) runs next to

* ``free``: the same per-block token schedule with a reduction that costs nothing (keep the first
  ``N - r`` tokens, pass their sizes on), same proportional-attention setting. ``method / free - 1``
  is the method's overhead: its reduction plus what it asks of the attention (class attention, keys);
* the method's eager op chain (:mod:`benchmarks.eager`) at the same schedule, where there is one.

Variants are interleaved: every round times one forward of each, in a rotated order, and the
table gives the best and the median over ``--rounds`` rounds. A profile of ``--profile-reps``
forwards gives the share of the forward spent inside the method's reducer (a profiler range around
it; the attention's extra work is not in it; the profiler's own cost per recorded operator is), and
on the CPU as many forwards without the profiler give the same share by the clock. IdleViT replaces
the block forward and has no reducer and no slicing equivalent: it is skipped. Outputs:
``benchmarks/results/overhead_<device>_<timestamp>.{csv,md}``.
"""
from __future__ import annotations

import argparse
import copy
import time
from typing import Optional, Sequence

import torch

from . import harness, variants


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="vit_small_patch16_224")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(harness.DTYPES), default=None, help="fp32 on CPU, bf16 on CUDA")
    p.add_argument("--batch", type=int, default=None, help="32 on CPU, 256 on CUDA")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--profile-reps", type=int, default=2)
    p.add_argument("--methods", default="tome,merge,evit,bat", help="comma-separated, from MATCHED")
    p.add_argument("--no-write", action="store_true", help="print only (tests)")
    return p.parse_args(argv)


def _variants(base: torch.nn.Module, method: str, options: dict) -> list:
    """``[(label, model)]``: the method, its free variant and its eager chain, each a patched copy."""
    import fastprune.patch
    from fastprune.patch.registry import get_method, resolve_options

    opts = {k: v for k, v in options.items() if k != "r"}
    model = fastprune.patch.timm(copy.deepcopy(base), method=method, r=options["r"], **opts)
    r = list(fastprune.patch.reduction_schedule(model))
    prop_attn = resolve_options(get_method(method), opts)["prop_attn"]
    out = [(method, model),
           ("free", fastprune.patch.timm(copy.deepcopy(base), method="free", r=r, prop_attn=prop_attn))]
    if method in variants.EAGER:
        out.append(("eager", fastprune.patch.timm(copy.deepcopy(base), method=variants.EAGER[method], r=r,
                                                  prop_attn=prop_attn)))
    return out


def _time_one(model: torch.nn.Module, x: torch.Tensor, device: torch.device) -> float:
    harness.synchronize(device)
    t0 = time.perf_counter()
    model(x)
    harness.synchronize(device)
    return (time.perf_counter() - t0) * 1e3


def reduce_share(base: torch.nn.Module, method: str, options: dict, x: torch.Tensor, reps: int) -> tuple:
    """Share of the forward's wall time inside the method's reducer: ``(from torch.profiler, from
    perf_counter)``. The profiler's figure includes its own cost of recording every operator the
    reducer calls; the second times ``reps`` forwards without a profiler around each reducer call
    (CPU only: on CUDA the call returns before its kernels finish, so it is None there)."""
    import fastprune.patch

    name = variants.profiled(method)
    opts = {k: v for k, v in options.items() if k != "r"}
    model = fastprune.patch.timm(copy.deepcopy(base), method=name, r=options["r"], **opts)
    model(x)  # warm-up outside the profile
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(reps):
            model(x)
        wall_us = (time.perf_counter() - t0) * 1e6
    inside = sum(e.cpu_time_total for e in prof.key_averages() if e.key == variants.REDUCE_RANGE)
    if x.device.type != "cpu":
        return inside / wall_us, None
    variants.REDUCE_SECONDS[0] = 0.0
    t0 = time.perf_counter()
    for _ in range(reps):
        model(x)
    return inside / wall_us, variants.REDUCE_SECONDS[0] / (time.perf_counter() - t0)


def run(args: argparse.Namespace) -> list:
    from .end_to_end import build_model, model_image_size

    device = torch.device(args.device)
    dtype = harness.DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    batch = args.batch or (256 if device.type == "cuda" else 32)
    variants.register()
    base = build_model(args.model, device, dtype)
    x = torch.randn(batch, 3, model_image_size(base), model_image_size(base), device=device, dtype=dtype)
    chosen = [m.strip() for m in args.methods.split(",") if m.strip()]
    matched = [(m, o) for m, o in variants.MATCHED if m in chosen and m != "idle"]
    rows = []
    with torch.no_grad():
        for method, options in matched:
            models = _variants(base, method, options)
            for _, model in models:  # warm-up
                model(x)
            times = {label: [] for label, _ in models}
            for round_ in range(args.rounds):
                k = round_ % len(models)
                for label, model in models[k:] + models[:k]:
                    times[label].append(_time_one(model, x, device))
            best = {label: min(t) for label, t in times.items()}
            med = {label: sorted(t)[len(t) // 2] for label, t in times.items()}
            row = {"model": args.model, "method": method, "setting": " ".join(f"{k}={v}" for k, v in options.items()),
                   "dtype": harness.DTYPE_NAMES[dtype], "batch": batch, "rounds": args.rounds,
                   "ms_method": best[method], "ms_free": best["free"],
                   "overhead_best": best[method] / best["free"] - 1.0,
                   "overhead_median": med[method] / med["free"] - 1.0}
            row["reduce_share"], row["reduce_share_wall"] = reduce_share(base, method, options, x,
                                                                         args.profile_reps)
            if "eager" in best:
                row.update(ms_eager=best["eager"], eager_overhead_best=best["eager"] / best["free"] - 1.0)
            rows.append(row)
            wall = "" if row["reduce_share_wall"] is None else f" ({row['reduce_share_wall']:.1%} by the clock)"
            print(f"  {method}: {row['overhead_best']:+.1%} (best), {row['overhead_median']:+.1%} (median), "
                  f"{row['reduce_share']:.1%} of the forward in the reducer{wall}", flush=True)
    return rows


def summary_markdown(rows: list, meta: dict) -> str:
    header = ["method", "setting", "ms (best)", "free ms", "overhead best", "overhead median",
              "time in reducer (profiler)", "time in reducer (clock)", "eager ms", "eager overhead"]
    body = [[r["method"], r["setting"], f"{r['ms_method']:.1f}", f"{r['ms_free']:.1f}",
             f"{r['overhead_best']:+.1%}", f"{r['overhead_median']:+.1%}", f"{r['reduce_share']:.1%}",
             "-" if r.get("reduce_share_wall") is None else f"{r['reduce_share_wall']:.1%}",
             f"{r['ms_eager']:.1f}" if "ms_eager" in r else "-",
             f"{r['eager_overhead_best']:+.1%}" if "ms_eager" in r else "-"] for r in rows]
    first = rows[0] if rows else {}
    title = (f"Reduction overhead on {meta['device']}: {first.get('model', '')} {first.get('dtype', '')}, "
             f"batch {first.get('batch', '')}, best/median of {first.get('rounds', '')} interleaved rounds")
    return f"{title}\n\n" + harness.markdown_table(header, body)


def main(argv: Optional[Sequence[str]] = None) -> list:
    args = parse_args(argv)
    harness.set_threads(args.threads)
    meta = harness.run_metadata(args.device)
    print(f"device: {meta['device']}; torch {meta['torch']}, timm {meta['timm']}")
    rows = [dict(meta, **r) for r in run(args)]
    md = summary_markdown(rows, meta)
    if args.no_write:
        print(md)
    else:
        harness.write_results(harness.result_stem("overhead", args.device), rows, md)
    return rows


if __name__ == "__main__":
    main()
