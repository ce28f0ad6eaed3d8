"""fastprune's benchmark suite.

Two command-line entry points, each runnable unchanged on a CPU machine or a CUDA GPU:

* ``python -m benchmarks.kernels`` — every fused operation (MSTM merge, class attention, ...) timed
  for fastprune's kernel against the PyTorch reference and the eager PyTorch op chain that authors
  of these methods write, with bytes moved, achieved GB/s and the fraction of the copy bandwidth
  measured in the same run.
* ``python -m benchmarks.end_to_end`` — timm ViTs (random weights): images/s and batch-1 latency,
  unreduced and with fastprune's token reduction, GFLOPs per image, eager and ``torch.compile``.

Both write a CSV, PNG plots and a Markdown summary under ``benchmarks/results/``. The module
``benchmarks.harness`` holds the timer, the bandwidth probe and the run metadata; ``benchmarks.ops``
the registry of operations and their providers; ``benchmarks.eager`` the eager baselines.
``pytest benchmarks/ --benchmark-only`` runs the same kernels at small shapes with pytest-benchmark.
"""
