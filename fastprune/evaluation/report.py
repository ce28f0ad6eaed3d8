"""The results table as a file (CSV or JSON) and as a picture (the accuracy frontier, PNG).

Every file row has the columns of the printed table (:data:`~fastprune.evaluation.runner.COLUMNS`)
with unrounded numbers (the intervals as their printed text), the setting's full text, and each
interval's ends as numbers (``<interval> low`` / ``<interval> high``).
"""
from __future__ import annotations

import csv
import json
import os
import pathlib
from typing import Any, Dict, List, Optional, Union

from .runner import COLUMNS, Result, format_interval

__all__ = ["result_rows", "write_results", "plot_frontier", "pareto_front", "OUTPUT_SUFFIXES"]

#: File endings :func:`write_results` writes.
OUTPUT_SUFFIXES = (".csv", ".json")


def result_rows(results: List[Result]) -> List[Dict[str, Any]]:
    """One dict per result: the table's columns (numbers unrounded), ``setting`` and the interval ends."""
    rows = []
    for res in results:
        values = [res.setting.method_label(), res.setting.r_label(), res.gflops, res.flops_reduction, res.top1,
                  res.top1_delta, format_interval(*res.top1_delta_ci, sign=True), res.top5, res.agree,
                  format_interval(*res.agree_ci), res.kl, format_interval(*res.kl_ci, digits=4), res.images_per_s,
                  res.speedup]
        row = dict(zip(COLUMNS, values))
        row["setting"] = res.setting.text
        for name, (low, high) in ((COLUMNS[6], res.top1_delta_ci), (COLUMNS[9], res.agree_ci),
                                  (COLUMNS[11], res.kl_ci)):
            row[f"{name} low"], row[f"{name} high"] = low, high
        rows.append(row)
    return rows


def write_results(results: List[Result], path: Union[str, os.PathLike],
                  meta: Optional[Dict[str, Any]] = None) -> pathlib.Path:
    """Write the table to ``path``: CSV (one row per setting) or JSON (``{**meta, "rows": [...]}``).

    Raises:
        ValueError: ``path`` ends neither in ``.csv`` nor in ``.json``.
    """
    path = pathlib.Path(path)
    if path.suffix.lower() not in OUTPUT_SUFFIXES:
        raise ValueError(f"--output {path}: expected a .csv or .json file")
    rows = result_rows(results)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".json":
        path.write_text(json.dumps({**(meta or {}), "rows": rows}, indent=1, ensure_ascii=False) + "\n")
    else:
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return path


def pareto_front(cost: List[float], value: List[float], lower_is_better: bool = True) -> List[int]:
    """Indices of the points no other point beats (cheaper or equal and at least as good, better in
    one), ordered by cost; ``lower_is_better`` False for a cost where more is better (images/s)."""
    sign = 1.0 if lower_is_better else -1.0
    order = sorted(range(len(cost)), key=lambda i: (sign * cost[i], -value[i]))
    front, best = [], float("-inf")
    for i in order:
        if value[i] > best:
            front.append(i)
            best = value[i]
    return front


def plot_frontier(results: List[Result], path: Union[str, os.PathLike], title: str = "") -> pathlib.Path:
    """Draw top-1 (with the Δ top-1 95% interval) against GFLOPs per image, and against images/s when
    the results were timed, one labelled point per setting and each panel's frontier; save as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = pathlib.Path(path)
    base = results[0].top1
    timed = all(r.images_per_s > 0 for r in results)
    panels = [("GFLOPs per image", [r.gflops for r in results], True)]
    if timed:
        panels.append(("images/s", [r.images_per_s for r in results], False))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.0 * len(panels), 4.5), squeeze=False)
    top1 = [r.top1 for r in results]
    errors = [[max(0.0, r.top1 - (base + r.top1_delta_ci[0])) for r in results],
              [max(0.0, base + r.top1_delta_ci[1] - r.top1) for r in results]]
    for ax, (label, x, lower) in zip(axes[0], panels):
        ax.errorbar(x, top1, yerr=errors, fmt="o", capsize=3, color="tab:blue", ecolor="tab:gray")
        front = pareto_front(x, top1, lower_is_better=lower)
        ax.plot([x[i] for i in front], [top1[i] for i in front], "-o", color="tab:orange", markersize=10,
                markerfacecolor="none", label="frontier")
        for xi, yi, res in zip(x, top1, results):
            ax.annotate(res.setting.text if res.setting.reduces else "none", (xi, yi), textcoords="offset points",
                        xytext=(4, 4), fontsize=7)
        ax.axhline(base, color="tab:gray", linestyle=":", linewidth=1, label="unreduced")
        ax.set_xlabel(label)
        ax.set_ylabel("top-1 % (bars: paired 95% CI of Δ top-1)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
