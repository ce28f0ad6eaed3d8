"""End-to-end benchmarks: timm ViTs (random weights), unreduced and with fastprune's token reduction.

Run ``python -m benchmarks.end_to_end``. For each model and variant (the unreduced model with fused
attention, then each ``fastprune.patch.timm(model, method=..., ...)`` variant, by default the MSTM
merge at ToMe's ``r = 8`` and ``r = 13``), eager and with ``torch.compile``, the run records:

* images/s at the throughput batch (256 on CUDA) and latency at batch 1 (median, p20, p80);
* GFLOPs per image counted by :class:`torch.utils.flop_counter.FlopCounterMode` (2 FLOPs per
  multiply-add; GMACs, the unit papers quote, are half that). Work done inside custom kernels
  (Triton/C++: the matching's similarity) is not seen by the counter;
* a row with the error, not a crash, where patching or compiling fails.

Besides the library's methods, ``free`` (the token schedule with a reduction that costs nothing) and
``eager-tome``/``eager-merge``/``eager-evit`` (the eager op chains) are variants, see
:mod:`benchmarks.variants`; :mod:`benchmarks.overhead` times each method against them side by side.

Defaults: CUDA: ViT-S/16, ViT-B/16, ViT-L/16 in bfloat16, batch 256; CPU: ViT-Ti/16 and ViT-S/16
in float32, batch 16, ``torch.compile`` on the first model only (compiling is slow on few cores).
Outputs: ``benchmarks/results/end_to_end_<device>_<timestamp>.{csv,md}`` and a throughput PNG.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import signal
import threading
import time
from typing import Optional, Sequence

import torch

from . import harness

DEFAULTS = {
    "cuda": dict(models=["vit_small_patch16_224", "vit_base_patch16_224", "vit_large_patch16_224"], dtype="bf16",
                 batch=256, compile_models=None),
    "cpu": dict(models=["vit_tiny_patch16_224", "vit_small_patch16_224"], dtype="fp32", batch=16,
                compile_models=["vit_tiny_patch16_224"]),
}
QUICK = {
    "cuda": dict(models=["vit_small_patch16_224"], dtype="bf16", batch=64, compile_models=None),
    "cpu": dict(models=["vit_tiny_patch16_224"], dtype="fp32", batch=8, compile_models=[]),
}
DEFAULT_VARIANTS = "merge:r=8,merge:r=13"


def parse_variant(spec: str) -> tuple[str, dict]:
    """``"merge:r=13"`` -> ``("merge", {"r": 13})``; values are int, float, bool or str.

    Raises:
        ValueError: a spec without a method or with a ``key=value`` part that has no ``=``.
    """
    method, *parts = spec.strip().split(":")
    if not method:
        raise ValueError(f"variant spec must start with a method name, got {spec!r}")
    kwargs = {}
    for part in parts:
        if "=" not in part:
            raise ValueError(f"variant option must be key=value, got {part!r} in {spec!r}")
        key, value = part.split("=", 1)
        for cast in (int, float):
            try:
                value = cast(value)
                break
            except ValueError:
                pass
        if value in ("True", "False"):
            value = value == "True"
        kwargs[key.strip()] = value
    return method, kwargs


def variant_name(method: Optional[str], kwargs: dict) -> str:
    if method is None:
        return "unreduced"
    return method + "".join(f" {k}={v}" for k, v in kwargs.items())


def build_model(name: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A timm model with random weights in eval mode, fused attention switched on everywhere."""
    import timm

    model = timm.create_model(name, pretrained=False)
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = True
    return model.eval().to(device=device, dtype=dtype)


def model_image_size(model: torch.nn.Module) -> int:
    """The input resolution a timm ViT was built for (its patch embedding's, else its config's, else 224)."""
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if size is None:
        size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224))[1:]
    return int(size[-1]) if isinstance(size, (tuple, list)) else int(size)


def fused_attn_state(model: torch.nn.Module) -> str:
    flags = [bool(m.fused_attn) for m in model.modules() if hasattr(m, "fused_attn")]
    if not flags:
        return "n/a"
    return "on" if all(flags) else ("off" if not any(flags) else f"{sum(flags)}/{len(flags)}")


def apply_variant(model: torch.nn.Module, method: Optional[str], kwargs: dict) -> torch.nn.Module:
    """Patch ``model`` with ``fastprune.patch.timm(model, method=..., **kwargs)`` (None: unreduced)."""
    if method is None:
        return model
    import fastprune.patch

    from . import variants

    variants.register()  # "free" and "eager-*" (benchmarks.variants) are variants too
    patched = fastprune.patch.timm(model, method=method, **kwargs)
    return model if patched is None else patched


def gflops_per_image(model: torch.nn.Module, image: torch.Tensor) -> float:
    """FLOPs of one forward at batch 1 counted by FlopCounterMode, in GFLOPs (2 per multiply-add).

    Every SDPA kernel is counted like the explicit ``q k^T`` / ``attn v`` products
    (:func:`fastprune.flops.counter`), so the count does not depend on the torch release."""
    from fastprune import flops

    counter = flops.counter()
    with torch.no_grad(), counter:
        model(image)
    return counter.get_total_flops() / image.shape[0] / 1e9


def _measure(model, device, dtype, batch, rep_ms, warmup_ms, image_size):
    """(latency Timing at batch 1, throughput Timing at ``batch``, first-call seconds)."""
    x1 = torch.randn(1, 3, image_size, image_size, device=device, dtype=dtype)
    xb = torch.randn(batch, 3, image_size, image_size, device=device, dtype=dtype)
    first = 0.0
    with torch.no_grad():
        for x in (x1, xb):  # first calls: compilation for torch.compile, lazy init otherwise
            t0 = time.perf_counter()
            out = model(x)
            harness.synchronize(device)
            first += time.perf_counter() - t0
            if not torch.isfinite(out.float()).all():
                raise FloatingPointError(f"non-finite logits at batch {x.shape[0]}")
        lat = harness.bench(lambda: model(x1), device, warmup_ms=warmup_ms, rep_ms=rep_ms, min_reps=5)
        thr = harness.bench(lambda: model(xb), device, warmup_ms=warmup_ms, rep_ms=rep_ms, min_reps=3)
    return lat, thr, first


class CompileTimeout(TimeoutError):
    """Compiling (or the first compiled calls) took longer than ``--compile-timeout``."""


@contextlib.contextmanager
def time_limit(seconds: Optional[float]):
    """Raise :class:`CompileTimeout` in the main thread after ``seconds`` (SIGALRM; no-op if None/0
    or where SIGALRM does not exist). Yields a dict whose ``"fired"`` turns True when the alarm went
    off, since a library may catch the exception and raise its own."""
    state = {"fired": False}
    if not seconds or not hasattr(signal, "SIGALRM") or threading.current_thread() is not threading.main_thread():
        yield state
        return

    def on_alarm(signum, frame):
        state["fired"] = True
        raise CompileTimeout(f"torch.compile and first calls did not finish within {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield state
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_model(name: str, variants: list, device: torch.device, dtype: torch.dtype, batch: int,
              compile_it: bool, rep_ms: float, warmup_ms: float, compile_timeout: Optional[float] = None) -> list:
    """All rows of one model: every variant, eager then compiled (compiling bounded by ``compile_timeout`` s)."""
    rows = []
    for method, kwargs in variants:
        row0 = {"model": name, "variant": variant_name(method, kwargs), "method": method or "",
                "params": " ".join(f"{k}={v}" for k, v in kwargs.items()), "dtype": harness.DTYPE_NAMES[dtype],
                "throughput_batch": batch}
        try:
            model = apply_variant(build_model(name, device, dtype), method, kwargs)
        except Exception as exc:
            status = "skipped" if isinstance(exc, ImportError) else "error"
            for compiled in ([False, True] if compile_it else [False]):
                rows.append(dict(row0, compiled=compiled, status=status, note=harness.first_line(exc)))
            print(f"  {name} / {row0['variant']}: {status}: {harness.first_line(exc)}", flush=True)
            continue
        image_size = model_image_size(model)
        try:
            gflops = gflops_per_image(model, torch.randn(1, 3, image_size, image_size, device=device, dtype=dtype))
        except Exception as exc:
            gflops, row0["note"] = float("nan"), f"flop count failed: {harness.first_line(exc)}"
        row0.update(gflops_per_image=gflops, gmacs_per_image=gflops / 2, fused_attn=fused_attn_state(model),
                    image_size=image_size)
        for compiled in ([False, True] if compile_it else [False]):
            row, runner, alarm = dict(row0, compiled=compiled), None, {"fired": False}
            try:
                if compiled:
                    torch._dynamo.reset()
                    runner = torch.compile(model, dynamic=False)
                else:
                    runner = model
                with time_limit(compile_timeout if compiled else None) as alarm:
                    lat, thr, first = _measure(runner, device, dtype, batch, rep_ms, warmup_ms, image_size)
                row.update(latency_ms=lat.median_ms, latency_p20_ms=lat.p20_ms, latency_p80_ms=lat.p80_ms,
                           throughput_ms=thr.median_ms, throughput_p20_ms=thr.p20_ms, throughput_p80_ms=thr.p80_ms,
                           images_per_s=batch / (thr.median_ms * 1e-3), first_call_s=first, status="ok")
                print(f"  {name} / {row['variant']}{' +compile' if compiled else ''}: "
                      f"{row['images_per_s']:.1f} img/s @{batch}, {lat.median_ms:.2f} ms @1, "
                      f"{gflops:.2f} GFLOPs/img", flush=True)
            except Exception as exc:
                note = harness.first_line(exc, 300)
                if alarm["fired"] and not isinstance(exc, CompileTimeout):
                    note = f"timed out after {compile_timeout:.0f} s ({note})"
                row.update(status="error", note=note)
                print(f"  {name} / {row['variant']}{' +compile' if compiled else ''}: error: {row['note']}",
                      flush=True)
            rows.append(row)
            del runner
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        del model
        gc.collect()
    base = {r["compiled"]: r for r in rows if r["variant"] == "unreduced" and r.get("status") == "ok"}
    for r in rows:
        b = base.get(r["compiled"])
        ok = r.get("status") == "ok" and b is not None
        r["speedup_vs_unreduced"] = r["images_per_s"] / b["images_per_s"] if ok else float("nan")
        r["latency_speedup_vs_unreduced"] = b["latency_ms"] / r["latency_ms"] if ok else float("nan")
    return rows


def summary_markdown(rows: list, meta: dict) -> str:
    out = [f"### End-to-end — {meta['device']}", "",
           f"torch {meta['torch']}, timm {meta['timm']}, triton {meta['triton']}, fastprune {meta['fastprune']} "
           f"(git {meta['git']}), {meta['timestamp']}. Random weights. Throughput: images/s at batch "
           f"{rows[0]['throughput_batch'] if rows else '?'} (median); latency: batch-1 median (p20–p80) in ms; "
           "speed-up: images/s over the unreduced model run the same way (eager or compiled); "
           "GFLOPs per image from FlopCounterMode (2 per multiply-add; custom kernels not counted).", ""]
    header = ["model", "variant", "compile", "GFLOPs/img", "img/s", "speed-up", "latency ms (p20–p80)", "status"]
    table = []
    for r in rows:
        ok = r.get("status") == "ok"
        table.append([
            r["model"], r["variant"], "yes" if r.get("compiled") else "no",
            r.get("gflops_per_image", float("nan")),
            r["images_per_s"] if ok else float("nan"),
            r["speedup_vs_unreduced"] if ok else float("nan"),
            f"{r['latency_ms']:.2f} ({r['latency_p20_ms']:.2f}–{r['latency_p80_ms']:.2f})" if ok else "–",
            "ok" if ok else f"{r.get('status')}: {r.get('note', '')}"[:160],
        ])
    out.append(harness.markdown_table(header, table))
    return "\n".join(out)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.end_to_end", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="one small model, no torch.compile: a smoke run")
    ap.add_argument("--models", help="comma list of timm model names")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS,
                    help="comma list of method:key=value[:key=value] passed to fastprune.patch.timm "
                         f"(default {DEFAULT_VARIANTS}); the unreduced model always runs")
    ap.add_argument("--dtype", choices=list(harness.DTYPES), help="bf16 on CUDA, fp32 on CPU by default")
    ap.add_argument("--batch", type=int, help="throughput batch (256 on CUDA, 16 on CPU)")
    ap.add_argument("--compile-models", help="comma list of models also run with torch.compile "
                                             "('all', 'none'; default: all on CUDA, the first model on CPU)")
    ap.add_argument("--compile-timeout", type=float, default=900.0,
                    help="seconds allowed for compiling and measuring one compiled variant; past it the "
                         "variant is an error row (default 900)")
    ap.add_argument("--threads", type=int, help="CPU threads for torch")
    ap.add_argument("--warmup-ms", type=float, help="warm-up budget per timing (default 100 CUDA, 200 CPU)")
    ap.add_argument("--rep-ms", type=float, help="timing budget per measurement (default 1000 CUDA, 2000 CPU)")
    ap.add_argument("--no-plots", action="store_true")
    return ap.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> list:
    """Run the end-to-end benchmarks; returns the rows (also written to CSV / Markdown / PNG)."""
    args = parse_args(argv)
    device = harness.setup(args.device, args.threads)
    cfg = dict((QUICK if args.quick else DEFAULTS)[device.type])
    models = [m.strip() for m in args.models.split(",")] if args.models else cfg["models"]
    dtype = harness.DTYPES[args.dtype or cfg["dtype"]]
    batch = args.batch or cfg["batch"]
    if args.compile_models is None:
        compile_models = models if cfg["compile_models"] is None else cfg["compile_models"]
    elif args.compile_models == "all":
        compile_models = models
    elif args.compile_models == "none":
        compile_models = []
    else:
        compile_models = [m.strip() for m in args.compile_models.split(",")]
    variants = [(None, {})] + [parse_variant(v) for v in args.variants.split(",") if v.strip()]
    rep_ms = args.rep_ms or (1000.0 if device.type == "cuda" else 2000.0)
    warmup_ms = args.warmup_ms or (100.0 if device.type == "cuda" else 200.0)

    meta = harness.run_metadata(device)
    stem = harness.result_stem("end_to_end", device)
    print(f"device: {meta['device']}; torch {meta['torch']}, timm {meta['timm']}, fastprune {meta['fastprune']}")
    try:
        import fastprune.patch  # noqa: F401
    except Exception as exc:
        print(f"fastprune.patch not importable ({harness.first_line(exc)}): reduced variants are recorded as skipped")
    rows = []
    for name in models:
        print(f"[{name}] {harness.DTYPE_NAMES[dtype]}, batch {batch}, compile: {name in compile_models}")
        rows += [dict(meta, **r) for r in run_model(name, variants, device, dtype, batch, name in compile_models,
                                                    rep_ms, warmup_ms, args.compile_timeout)]
    md = summary_markdown(rows, meta)
    harness.write_results(stem, rows, md, None if args.no_plots else "end_to_end_plot")
    return rows


if __name__ == "__main__":
    main()
