"""Timer, copy-bandwidth probe, run metadata and result files shared by the benchmark scripts.

Timing follows one rule on every device: each call of the function is timed on its own and the
run reports the median and the 20th / 80th percentiles, in milliseconds.

* CUDA: :func:`triton.testing.do_bench` (CUDA events, L2 cache flushed before every call).
* CPU: :func:`time.perf_counter` around each call after a warm-up. The Triton interpreter is never
  timed: on a CPU machine Triton providers are skipped.
"""
from __future__ import annotations

import csv
import dataclasses
import datetime as _dt
import os
import pathlib
import platform
import re
import sys
import time
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import torch

#: Where the CSVs, plots and summaries go.
RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


@dataclasses.dataclass(frozen=True)
class Timing:
    """Per-call wall time of a benchmarked function, in milliseconds, over ``n`` timed calls (0: not reported)."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    n: int


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cpu_bench(fn: Callable[[], object], grad_to_none: Optional[Sequence[torch.Tensor]], warmup_ms: float,
               rep_ms: float, min_reps: int, max_reps: int) -> Timing:
    start = time.perf_counter()
    fn()
    while (time.perf_counter() - start) * 1e3 < warmup_ms:
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or (time.perf_counter() - start) * 1e3 < rep_ms):
        if grad_to_none is not None:
            for t in grad_to_none:
                t.grad = None
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return _summarize(times)


def _summarize(times_ms: Sequence[float]) -> Timing:
    p20, p50, p80 = np.quantile(np.asarray(times_ms, dtype=np.float64), [0.2, 0.5, 0.8])
    return Timing(float(p50), float(p20), float(p80), len(times_ms))


def bench(fn: Callable[[], object], device: torch.device | str, *,
          grad_to_none: Optional[Sequence[torch.Tensor]] = None, warmup_ms: float = 25.0, rep_ms: float = 100.0,
          min_reps: int = 5, max_reps: int = 10_000) -> Timing:
    """Time ``fn()`` on ``device``: median and 20th/80th percentiles of single-call times (ms).

    Args:
        fn: the work to time; it must synchronise nothing itself.
        device: where ``fn`` runs. CUDA uses ``triton.testing.do_bench`` (``warmup_ms``/``rep_ms``
            are its ``warmup``/``rep`` budgets); CPU uses a perf_counter loop that warms up for
            ``warmup_ms`` then times calls until ``rep_ms`` have passed and at least ``min_reps``
            calls (at most ``max_reps``) were made.
        grad_to_none: tensors whose ``.grad`` is reset before each call (forward+backward runs).

    Returns:
        :class:`Timing` in milliseconds.

    Raises:
        ValueError: unknown device type.
    """
    device = torch.device(device)
    if device.type == "cuda":
        import triton.testing

        with torch.cuda.device(device):
            try:  # every single-call time, to report the exact count too
                times = triton.testing.do_bench(fn, warmup=int(warmup_ms), rep=int(rep_ms),
                                                grad_to_none=grad_to_none, return_mode="all")
            except (AssertionError, TypeError):  # a triton without return_mode="all": its quantiles
                p20, p50, p80 = triton.testing.do_bench(fn, warmup=int(warmup_ms), rep=int(rep_ms),
                                                        grad_to_none=grad_to_none, quantiles=[0.2, 0.5, 0.8])
                return Timing(float(p50), float(p20), float(p80), 0)
        return _summarize(times)
    if device.type == "cpu":
        return _cpu_bench(fn, grad_to_none, warmup_ms, rep_ms, min_reps, max_reps)
    raise ValueError(f"device must be 'cpu' or 'cuda', got {device}")


def copy_bandwidth_gbps(device: torch.device | str, nbytes: int | None = None, rep_ms: float = 200.0) -> float:
    """Copy bandwidth of ``device`` in GB/s (1e9 bytes/s), measured now with ``dst.copy_(src)``.

    A copy of ``nbytes`` reads and writes ``nbytes`` each, so the rate is ``2 * nbytes / median``.
    Defaults: 1 GiB on CUDA, 256 MiB on CPU (well beyond the last-level cache). This is the
    roofline the kernel rows are compared against.
    """
    device = torch.device(device)
    if nbytes is None:
        nbytes = (1 << 30) if device.type == "cuda" else (256 << 20)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = bench(lambda: dst.copy_(src), device, warmup_ms=50.0, rep_ms=rep_ms, min_reps=5)
    del src, dst
    return 2 * nbytes / (t.median_ms * 1e-3) / 1e9


def device_name(device: torch.device | str) -> str:
    """Human-readable device name: the CUDA device name, or the CPU model with the thread count."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def slug(text: str) -> str:
    """File-name-safe lower-case version of ``text``."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60]


def versions() -> dict:
    """Versions of the libraries a result depends on (``"n/a"`` when one is not importable)."""
    out = {"torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton

        out["triton"] = triton.__version__
    except Exception:  # pragma: no cover - triton missing on some platforms
        out["triton"] = "n/a"
    try:
        import fastprune

        out["fastprune"] = getattr(fastprune, "__version__", "unknown")
    except Exception:
        out["fastprune"] = "n/a"
    try:
        import timm

        out["timm"] = timm.__version__
    except Exception:
        out["timm"] = "n/a"
    try:
        import subprocess

        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=pathlib.Path(__file__).parent,
                             capture_output=True, text=True, timeout=5).stdout.strip()
        out["git"] = sha or "n/a"
    except Exception:
        out["git"] = "n/a"
    return out


def run_metadata(device: torch.device | str) -> dict:
    """Columns repeated on every CSV row: timestamp, device, thread count and library versions."""
    device = torch.device(device)
    v = versions()
    return {
        "timestamp": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": device_name(device),
        "device_type": device.type,
        "threads": torch.get_num_threads(),
        "torch": v["torch"], "triton": v["triton"], "fastprune": v["fastprune"], "timm": v["timm"],
        "python": v["python"], "git": v["git"],
    }


def result_stem(kind: str, device: torch.device | str, when: Optional[_dt.datetime] = None) -> pathlib.Path:
    """``benchmarks/results/<kind>_<device>_<YYYYmmdd-HHMMSS>``: the common stem of one run's files."""
    when = when or _dt.datetime.now()
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    return RESULTS_DIR / f"{kind}_{slug(device_name(device))}_{when.strftime('%Y%m%d-%H%M%S')}"


def write_csv(path: pathlib.Path, rows: Iterable[dict]) -> pathlib.Path:
    """Write dict rows to ``path`` with the union of their keys as header, in first-seen order."""
    rows = list(rows)
    fields: list[str] = []
    for row in rows:
        for key in row:
            if key not in fields:
                fields.append(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return path


def read_csv(path: pathlib.Path) -> list:
    """Rows of a results CSV with numbers parsed back (int, float) and ``True``/``False`` as bools."""
    def parse(value: str):
        if value in ("True", "False"):
            return value == "True"
        for cast in (int, float):
            try:
                return cast(value)
            except ValueError:
                pass
        return value

    with open(path, newline="") as f:
        return [{k: parse(v) for k, v in row.items()} for row in csv.DictReader(f)]


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub Markdown table; floats are printed with 3 significant digits."""
    def fmt(v):
        if isinstance(v, float):
            if v != v:
                return "–"
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def first_line(exc: BaseException, limit: int = 200) -> str:
    """``Type: message`` of an exception on one line, truncated: what error rows record."""
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ").replace("\r", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def set_threads(threads: Optional[int]) -> None:
    """Pin torch's intra-op CPU threads (and OMP) so that CPU runs are reproducible."""
    if threads:
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        torch.set_num_threads(threads)


def write_results(stem: pathlib.Path, rows: list, md: str, plot: Optional[str] = None) -> None:
    """Write ``<stem>.csv`` and ``<stem>.md``, draw ``benchmarks.plots.<plot>(rows, stem)`` (None: no
    plots), print the paths and the Markdown."""
    csv_path = write_csv(stem.with_suffix(".csv"), rows)
    stem.with_suffix(".md").write_text(md + "\n")
    print(f"\nwrote {csv_path}\n      {stem.with_suffix('.md')}")
    if plot is not None:
        from . import plots

        for path in getattr(plots, plot)(rows, stem):
            print(f"      {path}")
    print()
    print(md)


def setup(device: str, threads: Optional[int]) -> torch.device:
    """Set the CPU threads and return the device; exits if CUDA is asked for and absent."""
    set_threads(threads)
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda requested but CUDA is not available")
    return device
