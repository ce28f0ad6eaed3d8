"""Benchmark-only patch methods: the "free" reduction, the eager op chains, and profiled reducers.

* ``free``: keep the first ``N - r`` tokens and pass their sizes on -- the same token schedule as a
  method, with a reduction that costs nothing. A method's time minus its free variant's is its
  overhead.
* ``eager-tome``, ``eager-merge``, ``eager-evit``: the published algorithms as eager PyTorch op
  chains (:mod:`benchmarks.eager`), sizes not tracked (sliced like ``free``).
* :func:`profiled`: a copy of a registered method whose reducer runs inside
  ``torch.profiler.record_function(REDUCE_RANGE)``, so a profile can say how much time the
  reduction takes; it also adds the reducer's wall time to :data:`REDUCE_SECONDS` (``perf_counter``,
  no profiler: meaningful on the CPU, where the reducer's work is done when it returns).

All registrations are for this process only (they never touch the library's built-in methods).
"""
from __future__ import annotations

import time

import torch

#: ToMe r=13 on ViT-B/16 and the other methods at the same FLOPs (matched on ViT-Ti/DeiT-Ti by
#: ``python -m fastprune.compare``; the same per-block keep rates apply to 197-token models).
MATCHED = [("tome", {"r": 13}), ("merge", {"r": 0.61, "schedule": "paper"}), ("evit", {"r": 0.62}),
           ("bat", {"r": 0.62}), ("idle", {"r": 0.66, "reselect": False})]
#: The eager op chain of each method that has one in :mod:`benchmarks.eager`.
EAGER = {"tome": "eager-tome", "merge": "eager-merge", "evit": "eager-evit"}
#: Name of the profiler range around a profiled reducer.
REDUCE_RANGE = "fastprune::reduce"
#: ``[seconds]`` the profiled reducers have run (wall clock), summed since it was last set to 0.
REDUCE_SECONDS = [0.0]


def _slice_index(x: torch.Tensor, n_out: int) -> torch.Tensor:
    return torch.arange(x.shape[1], device=x.device).clamp_max(n_out - 1).expand(x.shape[0], -1)


def _sliced(x: torch.Tensor, out: torch.Tensor, ctx) -> tuple:
    n_out = out.shape[1]
    return out, ctx.size[:, :n_out], _slice_index(x, n_out)


def register() -> None:
    """Register ``free`` and the ``eager-*`` methods (once per process)."""
    import fastprune.patch
    from benchmarks import eager

    if "free" in fastprune.patch.available_methods():
        return

    def free(x, ctx):
        return _sliced(x, x[:, :x.shape[1] - ctx.r], ctx)

    def eager_tome(x, ctx):
        return _sliced(x, eager.tome_merge_eager(x, ctx.r, ctx.num_prefix_tokens), ctx)

    def eager_merge(x, ctx):
        return _sliced(x, eager.mstm_merge_eager(x, ctx.cls_attn, ctx.r, ctx.num_prefix_tokens), ctx)

    def eager_evit(x, ctx):
        keep = x.shape[1] - ctx.num_prefix_tokens - 1 - ctx.r
        return _sliced(x, eager.evit_eager(x, ctx.cls_attn, keep, ctx.num_prefix_tokens), ctx)

    fastprune.patch.register_method("free", free)
    fastprune.patch.register_method("eager-tome", eager_tome, max_r=lambda n, p: (n - p) // 2)
    fastprune.patch.register_method("eager-merge", eager_merge, needs={"cls_attn"})
    fastprune.patch.register_method("eager-evit", eager_evit, needs={"cls_attn"},
                                    max_r=lambda n, p: max(n - p - 2, 0))


def profiled(name: str) -> str:
    """Register ``profiled-<name>``: method ``name`` with its reducer inside a profiler range.

    Raises:
        ValueError: ``name`` has no reducer (a block-forward method such as ``"idle"``).
    """
    import fastprune.patch
    from fastprune.patch.registry import get_method

    m = get_method(name)
    if m.reducer is None:
        raise ValueError(f"method {name!r} has no reducer to profile (it replaces the block forward)")
    new = f"profiled-{name}"
    reducer = m.reducer

    def wrapped(x, ctx):
        t0 = time.perf_counter()
        with torch.profiler.record_function(REDUCE_RANGE):
            out = reducer(x, ctx)
        REDUCE_SECONDS[0] += time.perf_counter() - t0
        return out

    fastprune.patch.register_method(new, wrapped, block_forward=m.block_forward, needs=m.needs,
                                    defaults=m.defaults, validate=m.validate, max_r=m.max_r,
                                    schedule=m.schedule, block_r=m.block_r, removes_tokens=m.removes_tokens,
                                    replace=True)
    return new
