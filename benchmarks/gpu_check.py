"""The GPU check: one prepared command that proves fastprune's kernels on a real GPU in under 8 minutes.

Run from the repository root on the GPU machine (see README, "The GPU check")::

    python benchmarks/gpu_check.py                 # writes under $OUT (or --out), at most 7 files
    python benchmarks/gpu_check.py --dry-run       # the same steps on the CPU at tiny shapes (CI)

Steps, in priority order, each inside its own time box (seconds of the total ``--budget``) so that
a slow step cannot eat the next; what a step could not do is a row with ``status`` ``skipped`` and
the reason, never a silent gap:

1. ``env``: GPU name, clocks, versions, measured device-to-device copy bandwidth (the roofline).
2. ``correctness``: every Triton kernel (through the public API, ``backend="triton"``) against its
   PyTorch reference, compiled on the GPU: outputs, sizes, index maps, gradients; bit-identity of
   tokens that absorb nothing; determinism (two runs, same bits); a NaN token reaches only the rows
   it is merged into. Then the CUDA C++ extension, built there if that takes under its time box.
3. ``kernels``: per-launch medians and p20/p80 (``triton.testing.do_bench``) of every fused op at
   ViT-B/16, B = 1/8/64/256 (fp16, bf16; fp32 at 256), next to the memory roofline (bytes / copy
   bandwidth) and the reference and eager PyTorch op chains (``benchmarks.kernels``).
4. ``end_to_end``: timm ViT-B/16 (random weights, bf16, fused attention): images/s at B=256 and
   latency at B=1 for the unreduced model, each method at ToMe-r=13 FLOPs, each method's "free"
   variant (its token schedule, a reduction that costs nothing: the speed limit) and an eager ToMe
   op chain; unreduced / ToMe / MSTM also with ``torch.compile``.

Files (named ``gpu_check_<device>_<date>_<step>``): one Markdown summary with a section per step, one
CSV per step, and a PNG (end-to-end speed-up per variant, fraction of the copy roofline per kernel).
The plan (steps, shapes, time boxes) is printed before anything runs, so a cut-off run still says
what it skipped.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time
import traceback
from typing import Callable, Optional

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/gpu_check.py` from the repository root
    sys.path.insert(0, str(ROOT))


def _early_dry_run() -> bool:
    return "--dry-run" in sys.argv[1:]


if _early_dry_run():  # the interpreter must be chosen before triton is imported anywhere
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from benchmarks import harness, variants as bench_variants  # noqa: E402

#: Time boxes in seconds (scaled to ``--budget``): env, correctness, C++ build, kernels, end to end.
BOXES = {"env": 20, "correctness": 100, "cuda_ext": 100, "kernels": 110, "end_to_end": 150}
MATCHED = bench_variants.MATCHED


class StepTimeout(TimeoutError):
    """A step ran past its time box."""


@contextlib.contextmanager
def time_box(seconds: float):
    """Raise :class:`StepTimeout` in the main thread after ``seconds`` (SIGALRM)."""
    if seconds <= 0 or not hasattr(signal, "SIGALRM") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum, frame):
        raise StepTimeout(f"time box of {seconds:.0f} s reached")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class Plan:
    """Shapes and sizes of one run: the real ones on a GPU, tiny ones for ``--dry-run`` on the CPU."""

    def __init__(self, dry_run: bool):
        self.dry_run = dry_run
        self.device = torch.device("cpu" if dry_run else "cuda")
        self.dtypes = [torch.float32, torch.float16, torch.bfloat16]
        # correctness: (B, N, C, prefix, r-or-keep) grid; odd N, prefix 0/1/5, r = 1 and maximal
        self.check_shapes = [(2, 13, 16), (3, 29, 24)] if dry_run else [(2, 197, 768), (3, 61, 96), (4, 577, 1024)]
        self.prefixes = [0, 1, 5]
        self.kernel_shapes = ["vit_b16"]
        self.kernel_batches = [1, 2] if dry_run else [1, 8, 64, 256]
        self.kernel_fp32_batch = 2 if dry_run else 256
        self.rep_ms = 5.0 if dry_run else 60.0
        self.warmup_ms = 2.0 if dry_run else 15.0
        self.e2e_batch = 2 if dry_run else 256
        self.e2e_dtype = torch.float32 if dry_run else torch.bfloat16

    def describe(self, boxes: dict) -> str:
        lines = [f"gpu_check plan ({'dry run on the CPU, Triton interpreter' if self.dry_run else 'GPU'}):",
                 f"  1. env: versions, clocks, copy bandwidth [{boxes['env']:.0f} s]",
                 f"  2. correctness: merge/tome/evit/bat/idle, triton vs reference, dtypes fp32/fp16/bf16, "
                 f"shapes {self.check_shapes}, prefix {self.prefixes}, r = 1 and maximal; outputs, sizes, "
                 f"index maps, gradients, bit-identity, determinism, NaN containment [{boxes['correctness']:.0f} s]",
                 f"  2b. CUDA C++ extension: build and check [{boxes['cuda_ext']:.0f} s]",
                 f"  3. kernels: {self.kernel_shapes} B={self.kernel_batches} fp16/bf16, fp32 at "
                 f"B={self.kernel_fp32_batch}; fwd, and fwd+bwd at the largest batch [{boxes['kernels']:.0f} s]",
                 f"  4. end to end: {'tiny ViT' if self.dry_run else 'vit_base_patch16_224'} "
                 f"{harness.DTYPE_NAMES[self.e2e_dtype]} B={self.e2e_batch} and B=1: unreduced, "
                 f"{', '.join(m for m, _ in MATCHED)} at ToMe-r=13 FLOPs, their free variants, eager ToMe; "
                 f"compiled: unreduced/tome/merge [{boxes['end_to_end']:.0f} s]"]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# step 1: environment


def step_env(plan: Plan) -> list:
    rows = [dict(key=k, value=v) for k, v in harness.run_metadata(plan.device).items()]
    if plan.device.type == "cuda":
        props = torch.cuda.get_device_properties(plan.device)
        rows += [dict(key="gpu", value=props.name), dict(key="sm_count", value=props.multi_processor_count),
                 dict(key="memory_gib", value=round(props.total_memory / 2 ** 30, 1)),
                 dict(key="capability", value=f"{props.major}.{props.minor}"),
                 dict(key="cuda", value=torch.version.cuda)]
        try:
            query = "clocks.sm,clocks.max.sm,clocks.mem,power.limit,driver_version"
            out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=10).stdout.strip()
            rows.append(dict(key=f"nvidia-smi {query}", value=out))
        except (OSError, subprocess.SubprocessError) as exc:
            rows.append(dict(key="nvidia-smi", value=f"n/a ({exc})"))
    gbps = harness.copy_bandwidth_gbps(plan.device, nbytes=(16 << 20) if plan.dry_run else None)
    rows.append(dict(key="copy_bandwidth_gbps", value=round(gbps, 1)))
    return rows


# --------------------------------------------------------------------------------------------------
# step 2: correctness


def _method_calls(plan: Plan):
    """(name, param text, fn(x, attn, size, p, backend) -> Merged) for every method with a Triton path."""
    import fastprune
    from fastprune import bat, evit, tome

    def merge_call(r):
        return lambda x, a, s, p, backend: fastprune.merge_tokens(x, a, r(x, p), size=s, num_prefix_tokens=p,
                                                                  backend=backend)

    def tome_call(r):
        return lambda x, a, s, p, backend: tome.tome_merge_tokens(x, r(x, p), size=s, num_prefix_tokens=p,
                                                                  backend=backend)

    def keep_call(fn, keep_rate):
        return lambda x, a, s, p, backend: fn(x, a, keep_rate, size=s, num_prefix_tokens=p, backend=backend)

    return [
        ("merge", "r=1", merge_call(lambda x, p: 1)),
        ("merge", "r=max", merge_call(lambda x, p: x.shape[1] - p - 1)),
        ("tome", "r=1", tome_call(lambda x, p: 1)),
        ("tome", "r=max", tome_call(lambda x, p: (x.shape[1] - p) // 2)),
        ("evit", "keep=0.62", keep_call(evit.evit_tokens, 0.62)),
        ("bat", "keep=0.62", keep_call(bat.bat_tokens, 0.62)),
    ]


def _compare(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> tuple[bool, float]:
    """(all rows close, fraction of rows close): the kernel benchmark's check (``benchmarks.kernels``)."""
    from benchmarks import kernels as kbench

    if got.shape != want.shape:
        return False, 0.0
    if got.dim() == 2:  # sizes [B, N]: one row per token
        got, want = got[..., None], want[..., None]
    _, frac = kbench._check(got, want, dtype)
    return frac == 1.0, frac


def _check_method(name, param, fn, x, attn, size, p, dtype) -> dict:
    row = {"check": name, "param": param, "dtype": harness.DTYPE_NAMES[dtype], "shape": "x".join(map(str, x.shape)),
           "prefix": p}
    xr = x.detach().clone().requires_grad_(True)
    xt = x.detach().clone().requires_grad_(True)
    ref = fn(xr, attn, size, p, "reference")
    got = fn(xt, attn, size, p, "triton")
    row["out_close"], row["out_rows_close"] = _compare(got.x, ref.x, dtype)
    row["size_close"], _ = _compare(got.size, ref.size, torch.float32)
    row["index_equal_frac"] = float((got.index == ref.index).float().mean())
    grad = torch.randn_like(got.x)
    got.x.backward(grad)
    ref.x.backward(grad)
    row["grad_close"], row["grad_rows_close"] = _compare(xt.grad, xr.grad, dtype)
    # tokens that absorb nothing: outputs fed by exactly one input, equal to it bit for bit
    with torch.no_grad():
        again = fn(x, attn, size, p, "triton")
        row["deterministic"] = bool(torch.equal(again.x, got.x.detach()) and torch.equal(again.index, got.index))
        counts = torch.zeros(got.x.shape[:2], dtype=torch.long, device=x.device).scatter_add_(
            1, got.index, torch.ones_like(got.index))
        lone = counts == 1
        source = torch.full(got.x.shape[:2], -1, dtype=torch.long, device=x.device).scatter_(
            1, got.index, torch.arange(x.shape[1], device=x.device).expand_as(got.index).contiguous())
        if name == "evit":  # the fused token is a weighted sum even of one token; compare kept ones only
            lone[:, -1] = False
        b_idx, o_idx = lone.nonzero(as_tuple=True)
        row["lone_tokens"] = int(b_idx.numel())
        row["lone_bit_identical"] = bool(torch.equal(got.x.detach()[b_idx, o_idx], x[b_idx, source[b_idx, o_idx]]))
        # a NaN in one non-prefix token of image 0 reaches only the output row it went into
        poisoned = x.clone()
        j = x.shape[1] - 2
        poisoned[0, j] = float("nan")
        out = fn(poisoned, attn, size, p, "triton")
        bad = torch.isnan(out.x).any(-1)
        allowed = torch.zeros_like(bad)
        allowed[0, out.index[0, j]] = True
        row["nan_contained"] = bool(not (bad & ~allowed).any())
    checks = [row["out_close"] or row["out_rows_close"] >= 0.98, row["size_close"], row["grad_rows_close"] >= 0.98,
              row["deterministic"], row["lone_bit_identical"], row["nan_contained"],
              row["index_equal_frac"] == 1.0 or (dtype != torch.float32 and row["index_equal_frac"] >= 0.98)]
    row["status"] = "ok" if all(checks) else "FAIL"
    return row


def _check_idle(plan: Plan, B: int, N: int, C: int, p: int, dtype: torch.dtype) -> list:
    from fastprune import idle

    rows = []
    base = {"check": "idle", "dtype": harness.DTYPE_NAMES[dtype], "shape": f"{B}x{N}x{C}", "prefix": p}
    scores = torch.randn(B, N, device=plan.device)
    k = max(1, (N - p) // 2)
    ref = idle.select_tokens(scores, k, p, backend="reference")
    got = idle.select_tokens(scores, k, p, backend="triton")
    same = all(torch.equal(a, b) for a, b in zip(got, ref))
    rows.append(dict(base, param=f"select k={k}", index_equal_frac=float(same), status="ok" if same else "FAIL"))
    x = torch.randn(B, N, C, device=plan.device, dtype=dtype)
    g_ref = idle.idle_gather(x, ref, backend="reference")
    g_got = idle.idle_gather(x, ref, backend="triton")
    ok = torch.equal(g_got, g_ref)
    rows.append(dict(base, param="gather", out_close=ok, status="ok" if ok else "FAIL"))
    y = torch.randn_like(g_ref)
    s_ref = idle.idle_scatter(x, y, ref, backend="reference")
    s_got = idle.idle_scatter(x, y, ref, backend="triton")
    ok = torch.equal(s_got, s_ref)
    rows.append(dict(base, param="scatter (idle rows bit-identical)", out_close=ok, status="ok" if ok else "FAIL"))
    return rows


def step_correctness(plan: Plan, deadline: float) -> list:
    rows = []
    calls = _method_calls(plan)
    for (B, N, C) in plan.check_shapes:
        for dtype in plan.dtypes:
            for p in plan.prefixes:
                if time.monotonic() > deadline:
                    rows.append({"check": "remaining cases", "shape": f"{B}x{N}x{C}", "status": "skipped",
                                 "note": "time box"})
                    return rows
                torch.manual_seed(B * 1000 + N + p)
                x = torch.randn(B, N, C, device=plan.device, dtype=dtype)
                attn = torch.rand(B, N, device=plan.device).softmax(-1)
                size = torch.randint(1, 4, (B, N), device=plan.device).float()
                for name, param, fn in calls:
                    if name in ("evit", "bat") and p == 0:
                        continue  # these methods rank by the class token's attention
                    try:
                        rows.append(_check_method(name, param, fn, x, attn, size, p, dtype))
                    except StepTimeout:
                        raise
                    except Exception as exc:
                        rows.append({"check": name, "param": param, "dtype": harness.DTYPE_NAMES[dtype],
                                     "shape": f"{B}x{N}x{C}", "prefix": p, "status": "error",
                                     "note": harness.first_line(exc, 300)})
                try:
                    rows.extend(_check_idle(plan, B, N, C, p, dtype))
                except StepTimeout:
                    raise
                except Exception as exc:
                    rows.append({"check": "idle", "dtype": harness.DTYPE_NAMES[dtype], "shape": f"{B}x{N}x{C}",
                                 "prefix": p, "status": "error", "note": harness.first_line(exc, 300)})
    return rows


_EXT_CHECK = r"""
import torch, fastprune, fastprune._ext as e
dev = "cuda" if torch.cuda.is_available() else "cpu"
ok = e.cuda_available() if dev == "cuda" else e.available()
print("extension", dev, ok, e.cuda_load_error() if dev == "cuda" else e.load_error())
if ok:
    x = torch.randn(8, 197, 768, device=dev, dtype=torch.float16); a = torch.rand(8, 197, device=dev)
    got = fastprune.merge_tokens(x, a, 13, backend="auto"); ref = fastprune.merge_tokens(x, a, 13, backend="reference")
    same = (got.index == ref.index).float().mean().item()
    err = (got.x.float() - ref.x.float()).abs().max().item()
    print("RESULT", same, err)
"""


def step_cuda_ext(plan: Plan, seconds: float) -> list:
    """Build the CUDA C++ extension against this machine's torch and nvcc, then check it (subprocess)."""
    rows = []
    if not plan.dry_run:
        from torch.utils import cpp_extension

        nvcc = cpp_extension.CUDA_HOME
        start = time.monotonic()
        try:
            proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps",
                                   "-e", str(ROOT)], capture_output=True, text=True, timeout=max(10.0, seconds - 20),
                                  env={**os.environ, "FASTPRUNE_BUILD_CUDA": "1"}, cwd=ROOT)
            rows.append({"check": "cuda_ext build", "status": "ok" if proc.returncode == 0 else "error",
                         "param": f"CUDA_HOME={nvcc}", "note": f"{time.monotonic() - start:.0f} s; "
                         + (proc.stderr.strip().splitlines() or [""])[-1][:300]})
        except subprocess.TimeoutExpired:
            rows.append({"check": "cuda_ext build", "status": "skipped", "note": "build ran past its time box"})
            return rows
    else:
        rows.append({"check": "cuda_ext build", "status": "skipped", "note": "dry run: checking the CPU extension"})
    try:
        proc = subprocess.run([sys.executable, "-c", _EXT_CHECK], capture_output=True, text=True, timeout=60, cwd=ROOT)
        result = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
        if result:
            same, err = map(float, result[-1].split()[1:])
            rows.append({"check": "cuda_ext merge vs reference", "index_equal_frac": same, "max_abs_err": err,
                         "status": "ok" if same >= 0.98 and err < 0.05 else "FAIL"})
        else:
            rows.append({"check": "cuda_ext merge vs reference", "status": "skipped",
                         "note": (proc.stdout + proc.stderr).strip()[-300:]})
    except subprocess.TimeoutExpired:
        rows.append({"check": "cuda_ext merge vs reference", "status": "skipped", "note": "check timed out"})
    return rows


# --------------------------------------------------------------------------------------------------
# step 3: per-launch timings


def step_kernels(plan: Plan, copy_gbps: float, deadline: float) -> list:
    from benchmarks import kernels as kbench
    from benchmarks.ops import kernel_ops

    grid = [(b, "fp16", "fwd") for b in plan.kernel_batches] + [(b, "bf16", "fwd") for b in plan.kernel_batches]
    grid += [(plan.kernel_fp32_batch, "fp32", "fwd"), (plan.kernel_batches[-1], "bf16", "fwd+bwd")]
    rows = []
    for op in kernel_ops().values():
        providers, skipped = kbench.available_providers(op, plan.device, None)
        for name, reason in skipped.items():
            rows.append({"op": op.name, "provider": name, "status": "skipped", "note": reason})
        for batch, dname, mode in grid:
            if mode == "fwd+bwd" and op.name not in ("mstm_merge", "tome_merge"):
                continue
            for case in kbench.build_cases(op, plan.device, plan.kernel_shapes, [batch], [dname], [mode], ["13"],
                                           [0.62]):
                if time.monotonic() > deadline:
                    rows.append({"op": op.name, "batch": batch, "dtype": dname, "status": "skipped",
                                 "note": "time box"})
                    continue
                for row in kbench.run_case(op, case, providers, copy_gbps, plan.warmup_ms, plan.rep_ms):
                    row["roofline_us"] = row["bytes"] / (copy_gbps * 1e9) * 1e6
                    rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------------
# step 4: end to end


def _tiny_vit(device, dtype):
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=32, patch_size=4, embed_dim=48, depth=12, num_heads=3,
                             num_classes=10).to(device=device, dtype=dtype).eval()


def step_end_to_end(plan: Plan, deadline: float) -> list:
    import fastprune.patch
    from benchmarks import end_to_end as e2e

    bench_variants.register()
    name = "tiny_vit_depth12" if plan.dry_run else "vit_base_patch16_224"
    build = (lambda n, d, t: _tiny_vit(d, t)) if plan.dry_run else e2e.build_model
    matched = [(m, dict(o, r=2) if (plan.dry_run and m == "tome") else o) for m, o in MATCHED]
    probe = build(name, plan.device, plan.e2e_dtype)
    variants = [(None, {})] + matched
    for method, options in matched:
        if method == "idle":
            continue  # idling keeps every token: no slicing schedule stands for it
        r = fastprune.patch.reduction_schedule(probe, options["r"], method=method,
                                               **{k: v for k, v in options.items() if k != "r"})
        variants.append(("free", {"r": list(r), "label": f"free[{method}]"}))
    variants.append(("eager-tome", {"r": matched[0][1]["r"]}))
    del probe
    rows = []
    original_build = e2e.build_model
    e2e.build_model = build
    try:
        for compiled, chosen in ((False, variants), (True, variants[:3])):
            for method, options in chosen:
                if compiled and plan.dry_run:
                    rows.append({"model": name, "variant": options.get("label", method or "unreduced"),
                                 "compiled": True, "status": "skipped",
                                 "note": "dry run: inductor on 2 CPU cores takes minutes"})
                    continue
                if time.monotonic() > deadline:
                    rows.append({"model": name, "variant": options.get("label", method or "unreduced"),
                                 "compiled": compiled, "status": "skipped", "note": "time box"})
                    continue
                kwargs = {k: v for k, v in options.items() if k != "label"}
                got = e2e.run_model(name, [(method, kwargs)], plan.device, plan.e2e_dtype, plan.e2e_batch,
                                    compile_it=compiled, rep_ms=plan.rep_ms * 3, warmup_ms=plan.warmup_ms,
                                    compile_timeout=max(5.0, min(90.0, deadline - time.monotonic())))
                for row in got:
                    if compiled and not row.get("compiled"):
                        continue  # run_model times eager too; keep the compiled row only
                    row["variant"] = options.get("label", row["variant"])
                    rows.append(row)
    finally:
        e2e.build_model = original_build
    for compiled in (False, True):
        base = next((r for r in rows if r.get("variant") == "unreduced" and r.get("compiled") == compiled
                     and r.get("status") == "ok"), None)
        for r in rows:
            if base and r.get("compiled") == compiled and r.get("status") == "ok":
                r["speedup_vs_unreduced"] = r["images_per_s"] / base["images_per_s"]
                r["latency_speedup_vs_unreduced"] = base["latency_ms"] / r["latency_ms"]
    free = {r["variant"][5:-1]: r for r in rows if str(r.get("variant", "")).startswith("free[")
            and r.get("status") == "ok" and not r.get("compiled")}
    for r in rows:
        f = free.get(r.get("method"))
        if f and r.get("status") == "ok" and not r.get("compiled") and not str(r["variant"]).startswith("free["):
            r["overhead_vs_free"] = f["images_per_s"] / r["images_per_s"] - 1.0
    return rows


# --------------------------------------------------------------------------------------------------
# report


def _table(rows: list, columns: list) -> str:
    present = [c for c in columns if any(c in r for r in rows)]
    return harness.markdown_table(present, [[r.get(c, "") for c in present] for r in rows]) if rows else "(no rows)"


def _plot(e2e_rows: list, kernel_rows: list, path: pathlib.Path) -> Optional[pathlib.Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    ok = [r for r in e2e_rows if r.get("status") == "ok" and not r.get("compiled")]
    axes[0].barh([r["variant"] for r in ok], [r.get("speedup_vs_unreduced", 0) for r in ok])
    axes[0].axvline(1.0, color="k", lw=0.8)
    axes[0].set_xlabel("images/s vs unreduced (eager)")
    axes[0].set_title("end to end")
    fp = [r for r in kernel_rows if r.get("status") == "ok" and r.get("role") == "fastprune" and r.get("mode") == "fwd"]
    for op in sorted({r["op"] for r in fp}):
        pts = sorted((r["batch"], r["frac_copy_bw"]) for r in fp if r["op"] == op and r["dtype"] == "bf16")
        if pts:
            axes[1].plot([b for b, _ in pts], [f for _, f in pts], marker="o", label=op)
    axes[1].set_xscale("log")
    axes[1].set_xlabel("batch")
    axes[1].set_ylabel("fraction of copy bandwidth (bf16 fwd)")
    axes[1].set_title("kernels vs memory roofline")
    if fp:
        axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(out_dir: pathlib.Path, dry_run: bool, budget: float) -> dict:
    """Run every step, write the files, return ``{step: rows}`` (and ``"files"``)."""
    plan = Plan(dry_run)
    scale = budget / sum(BOXES.values())
    boxes = {k: v * scale for k, v in BOXES.items()}
    print(plan.describe(boxes), flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = harness.slug(harness.device_name(plan.device).split(" (")[0])
    stem = out_dir / f"gpu_check_{device}_{_dt.date.today().isoformat()}{'_dry-run' if dry_run else ''}"
    results, notes = {}, {}

    def step(name: str, fn: Callable[[float], list]) -> list:
        start = time.monotonic()
        deadline = start + boxes[name]
        print(f"== {name} (time box {boxes[name]:.0f} s)", flush=True)
        try:
            with time_box(boxes[name] + 15):  # hard stop shortly after the soft deadline
                rows = fn(deadline)
        except Exception as exc:
            rows = [{"status": "error", "note": harness.first_line(exc, 300)}]
            traceback.print_exc()
        notes[name] = f"{time.monotonic() - start:.1f} s"
        results[name] = rows
        bad = [r for r in rows if r.get("status") not in ("ok", "skipped", None)]
        print(f"   {len(rows)} rows, {len(bad)} not ok, {notes[name]}", flush=True)
        return rows

    env = step("env", lambda d: step_env(plan))
    copy_gbps = float(next((r["value"] for r in env if r["key"] == "copy_bandwidth_gbps"), 1.0))
    step("correctness", lambda d: step_correctness(plan, d))
    results["correctness"] = results["correctness"] + step("cuda_ext", lambda d: step_cuda_ext(plan, boxes["cuda_ext"]))
    step("kernels", lambda d: step_kernels(plan, copy_gbps, d))
    step("end_to_end", lambda d: step_end_to_end(plan, d))

    files = []
    for name in ("env", "correctness", "kernels", "end_to_end"):
        files.append(harness.write_csv(pathlib.Path(f"{stem}_{name}.csv"), results[name]))
    md = [f"# GPU check: {harness.device_name(plan.device)}, {_dt.date.today().isoformat()}"
          + (" (dry run: CPU, Triton interpreter, tiny shapes; not GPU results)" if dry_run else ""), ""]
    md += [f"Step times: {', '.join(f'{k} {v}' for k, v in notes.items())}.", ""]
    md += ["## 1. Environment", "", _table(env, ["key", "value"]), ""]
    md += ["## 2. Correctness (triton vs reference)", "",
           _table(results["correctness"], ["check", "param", "dtype", "shape", "prefix", "status", "out_close",
                                           "out_rows_close", "size_close", "index_equal_frac", "grad_rows_close",
                                           "deterministic", "lone_tokens", "lone_bit_identical", "nan_contained",
                                           "max_abs_err", "note"]), ""]
    md += ["## 3. Per-launch timings", "",
           _table(results["kernels"], ["op", "provider", "batch", "dtype", "mode", "r", "keep_rate", "status",
                                       "median_ms", "p20_ms", "p80_ms", "roofline_us", "frac_copy_bw",
                                       "speedup_vs_eager", "speedup_vs_reference", "check", "note"]), ""]
    try:
        from benchmarks import cost_model

        model_rows = cost_model.table([b for b in plan.kernel_batches if b in (1, plan.kernel_batches[-1])])
        md += ["### Cost model prediction for the MSTM merge launches (a model, `python -m benchmarks.cost_model`)",
               "", _table(model_rows, ["batch", "launch", "min_mb", "written_gflop", "memory_us", "serial_us",
                                       "predicted_us", "bound"]), ""]
    except Exception as exc:  # the model must not cost the run its report
        md += [f"(cost model failed: {harness.first_line(exc)})", ""]
    md += ["## 4. End to end", "",
           _table(results["end_to_end"], ["variant", "compiled", "status", "gflops_per_image", "images_per_s",
                                          "latency_ms", "speedup_vs_unreduced", "latency_speedup_vs_unreduced",
                                          "overhead_vs_free", "note"]), ""]
    md_path = pathlib.Path(f"{stem}.md")
    md_path.write_text("\n".join(md))
    files.append(md_path)
    png = _plot(results["end_to_end"], results["kernels"], pathlib.Path(f"{stem}.png"))
    if png:
        files.append(png)
    results["files"] = files
    print("wrote:\n  " + "\n  ".join(map(str, files)), flush=True)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny shapes (CI)")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(harness.RESULTS_DIR),
                        help="output folder (default: $OUT, else benchmarks/results)")
    parser.add_argument("--budget", type=float, default=None,
                        help="total seconds of the time boxes (default 420 on a GPU, 240 for a dry run)")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA GPU here: run with --dry-run to rehearse on the CPU")
    budget = args.budget or (240.0 if args.dry_run else 420.0)
    results = run(pathlib.Path(args.out), args.dry_run, budget)
    missing = [str(f) for f in results["files"] if not f.is_file() or f.stat().st_size == 0]
    if len(results["files"]) != 6 or missing:
        print(f"expected 6 non-empty files (4 CSV, Markdown, PNG); missing or empty: {missing}", flush=True)
        return 2
    steps_with_rows = [k for k in ("env", "correctness", "kernels", "end_to_end")
                       if any(r.get("status") in ("ok", "FAIL") or "key" in r for r in results[k])]
    if len(steps_with_rows) != 4:
        print(f"steps that produced no result rows: "
              f"{sorted({'env', 'correctness', 'kernels', 'end_to_end'} - set(steps_with_rows))}", flush=True)
        return 2
    failed = [r for step in ("correctness",) for r in results[step] if r.get("status") in ("FAIL", "error")]
    if failed:
        print(f"{len(failed)} correctness rows failed", flush=True)
    return 1 if failed and not args.dry_run else 0


if __name__ == "__main__":
    sys.exit(main())
