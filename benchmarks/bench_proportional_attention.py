"""Proportional attention on SDPA: extra q/k column vs additive float mask vs the explicit formula.

Times ``fastprune.attention.proportional_attention`` with ``impl="column"``, ``"mask"`` and
``"explicit"`` against plain ``F.scaled_dot_product_attention`` without any bias (the floor), for
DeiT-Ti/S/B-like shapes (N = 197 tokens, head dim 64, 3/6/12 heads) at batch 1 and 32, and prints a
table of medians (``torch.utils.benchmark``, adaptive autorange; the lowest median over a few
interleaved rounds, so that a busy machine does not favour one provider). The fastest of column/mask is what
``impl="auto"`` should pick on that device type (``fastprune.attention._DEFAULT_IMPL``).

Usage::

    python benchmarks/bench_proportional_attention.py [--device cpu|cuda] [--dtype float32|float16|bfloat16]
        [--batch 1 32] [--tokens 197] [--threads 2] [--rounds 3] [--csv results.csv]

On CUDA, compare fp16/bf16 (flash attention is only eligible there, and only without a float mask).
"""
from __future__ import annotations

import argparse
import csv
import platform

import torch
import torch.nn.functional as F
from torch.utils import benchmark

from fastprune.attention import proportional_attention

#: name -> (heads, head dim): the DeiT/ViT Tiny, Small and Base attention shapes.
MODELS = {"DeiT-Ti": (3, 64), "DeiT-S": (6, 64), "DeiT-B": (12, 64)}
PROVIDERS = ("sdpa (no bias)", "column", "mask", "explicit")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def time_ms(stmt: str, env: dict, min_run_time: float) -> float:
    timer = benchmark.Timer(stmt=stmt, globals=env, num_threads=torch.get_num_threads())
    return timer.adaptive_autorange(min_run_time=min_run_time).median * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--tokens", type=int, default=197)
    parser.add_argument("--min-run-time", type=float, default=0.3, help="seconds per measurement")
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved rounds over the providers; the lowest median is reported "
                             "(guards against noise from other processes)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (torch.set_num_threads); default: torch's choice")
    parser.add_argument("--csv", default=None, help="append rows to this CSV file")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    rows = []
    print(f"device: {device_name(device)}; torch {torch.__version__}; dtype {args.dtype}; N = {args.tokens}")
    header = f"{'model':8} {'B':>3} " + " ".join(f"{p:>15}" for p in PROVIDERS) + "   (median ms)"
    print(header)
    for name, (heads, head_dim) in MODELS.items():
        for batch in args.batch:
            shape = (batch, heads, args.tokens, head_dim)
            q, k, v = (torch.randn(shape, device=device, dtype=dtype) for _ in range(3))
            size = torch.randint(1, 8, (batch, args.tokens), device=device).to(torch.float32)
            env = dict(F=F, pa=proportional_attention, q=q, k=k, v=v, size=size)
            stmts = {
                "sdpa (no bias)": "F.scaled_dot_product_attention(q, k, v)",
                "column": "pa(q, k, v, size, impl='column')",
                "mask": "pa(q, k, v, size, impl='mask')",
                "explicit": "pa(q, k, v, size, impl='explicit')",
            }
            if device.type == "cuda":
                stmts = {p: s + "; torch.cuda.synchronize()" for p, s in stmts.items()}
                env["torch"] = torch
            medians = {p: float("inf") for p in stmts}
            for _ in range(args.rounds):
                for p, s in stmts.items():
                    medians[p] = min(medians[p], time_ms(s, env, args.min_run_time))
            print(f"{name:8} {batch:>3} " + " ".join(f"{medians[p]:>15.3f}" for p in PROVIDERS))
            rows.extend(dict(device=device_name(device), torch=torch.__version__, dtype=args.dtype, model=name,
                             batch=batch, tokens=args.tokens, heads=heads, head_dim=head_dim, provider=p,
                             median_ms=round(medians[p], 4)) for p in PROVIDERS)
    if args.csv:
        with open(args.csv, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            if f.tell() == 0:
                writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
