"""PNG plots of benchmark results (matplotlib, headless): speed-up vs batch and fraction of roofline.

``python -m benchmarks.plots RESULTS.csv ...`` re-draws the plots of saved runs (next to each CSV).
"""
from __future__ import annotations

import pathlib
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

_STYLES = ["-", "--", ":", "-."]
_MARKERS = ["o", "s", "^", "D", "v", "P"]


def _ok(rows):
    return [r for r in rows if r.get("status") == "ok"]


def _grid(rows):
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    fig, axes = plt.subplots(len(modes), len(dtypes), figsize=(max(6.5, 4.2 * len(dtypes)), 3.4 * len(modes)),
                             squeeze=False, sharex=True)
    return fig, axes, modes, dtypes


def _plot_metric(rows, metric, ylabel, title, path, providers, baseline=None):
    """One subplot per (mode, dtype); one line per (shape, provider); x = batch on a log2 axis."""
    fig, axes, modes, dtypes = _grid(rows)
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, mode in enumerate(modes):
        for j, dtype in enumerate(dtypes):
            ax = axes[i][j]
            for si, shape in enumerate(shapes):
                for pi, prov in enumerate(providers):
                    pts = sorted((r["batch"], r[metric]) for r in rows if r["mode"] == mode and r["dtype"] == dtype
                                 and r["shape"] == shape and r["provider"] == prov and r.get(metric) == r.get(metric))
                    if not pts:
                        continue
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], color=colors[si % len(colors)],
                            linestyle=_STYLES[pi % len(_STYLES)], marker=_MARKERS[pi % len(_MARKERS)],
                            label=f"{shape} · {prov}")
            if baseline is not None:
                ax.axhline(baseline, color="grey", linewidth=0.8)
            ax.set_xscale("log", base=2)
            batches = sorted({r["batch"] for r in rows})
            ax.set_xticks(batches)
            ax.set_xticklabels([str(b) for b in batches])
            ax.minorticks_off()
            ax.set_title(f"{mode}, {dtype}", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            if j == 0:
                ax.set_ylabel(ylabel)
            if i == len(modes) - 1:
                ax.set_xlabel("batch")
    handles, labels = {}, []
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(4, max(1, len(handles))),
               fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.04 + 0.025 * ((len(handles) + 3) // 4), 1, 0.92))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def kernel_plots(rows, stem: pathlib.Path) -> list:
    """For each operation: ``<stem>_<op>_speedup.png`` (speed-up over the eager chain vs batch; over the
    reference when the operation has no eager chain) and
    ``<stem>_<op>_roofline.png`` (achieved GB/s as a fraction of the measured copy bandwidth).

    Only the smallest ``r`` (the typical ``r = 13``) or the largest keep rate of each shape is plotted;
    the CSV has them all.
    """
    paths = []
    rows = _ok(rows)
    for op in dict.fromkeys(r["op"] for r in rows):
        op_rows = [r for r in rows if r["op"] == op]
        # One reduction amount per shape: the smallest r (typically 13) or the largest keep rate.
        chosen = {}
        for r in op_rows:
            if r.get("r", "") != "":
                chosen[r["shape"]] = min(chosen.get(r["shape"], r["r"]), r["r"])
            elif r.get("keep_rate", "") != "":
                chosen[r["shape"]] = max(chosen.get(r["shape"], r["keep_rate"]), r["keep_rate"])
        op_rows = [r for r in op_rows if r["shape"] not in chosen
                   or chosen[r["shape"]] in (r.get("r", ""), r.get("keep_rate", ""))]
        device = op_rows[0]["device"]
        name = "r" if any(r.get("r", "") != "" for r in op_rows) else "keep rate"
        rtxt = "" if not chosen else f"{name}: " + ", ".join(f"{v} ({k})" for k, v in chosen.items()) + "\n"
        # Speed-up over the eager chain, or over the reference for operations without one (BAT).
        eager_name = _first_eager(op_rows)
        metric, what = ("speedup_vs_eager", "the eager PyTorch chain") if eager_name else \
            ("speedup_vs_reference", "the PyTorch reference")
        baseline_name = eager_name or "reference"
        providers = list(dict.fromkeys(r["provider"] for r in op_rows))
        others = [p for p in providers if p != baseline_name]
        paths.append(_plot_metric(op_rows, metric, f"speed-up over {baseline_name}",
                                  f"{op}: speed-up over {what}\n{rtxt}{device}",
                                  stem.parent / f"{stem.name}_{op}_speedup.png", others, baseline=1.0))
        paths.append(_plot_metric(op_rows, "frac_copy_bw", "fraction of copy bandwidth",
                                  f"{op}: achieved / copy bandwidth ({op_rows[0]['copy_gbps']:.1f} GB/s)\n"
                                  f"{rtxt}{device}", stem.parent / f"{stem.name}_{op}_roofline.png", providers,
                                  baseline=1.0))
    return paths


def _first_eager(rows):
    return next((r["provider"] for r in rows if r["role"] == "eager"), None)


def end_to_end_plot(rows, stem: pathlib.Path) -> list:
    """``<stem>_throughput.png``: images/s per model and variant (bars), eager and compiled."""
    rows = [r for r in rows if r.get("status") == "ok" and r.get("images_per_s") == r.get("images_per_s")
            and r.get("images_per_s") is not None]
    if not rows:
        return []
    models = list(dict.fromkeys(r["model"] for r in rows))
    labels = list(dict.fromkeys(f"{r['variant']}{' +compile' if r['compiled'] else ''}" for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(max(4.5, 1.0 + 0.6 * len(labels)) * len(models), 4),
                             squeeze=False)
    for ax, model in zip(axes[0], models):
        vals = []
        for lab in labels:
            r = next((r for r in rows if r["model"] == model
                      and f"{r['variant']}{' +compile' if r['compiled'] else ''}" == lab), None)
            vals.append(r["images_per_s"] if r else 0.0)
        ax.bar(range(len(labels)), vals, color=["C0" if "compile" not in lab else "C1" for lab in labels])
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=7)
        ax.set_title(f"{model} (batch {rows[0]['throughput_batch']}, {rows[0]['dtype']})", fontsize=9)
        ax.set_ylabel("images / s")
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(f"End-to-end throughput — {rows[0]['device']}", fontsize=10)
    fig.tight_layout()
    path = stem.parent / f"{stem.name}_throughput.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]


def main(argv=None) -> list:
    """Re-draw the plots of the result CSVs named on the command line; returns the PNG paths."""
    from .harness import read_csv

    paths = []
    for name in (sys.argv[1:] if argv is None else argv):
        path = pathlib.Path(name)
        rows = read_csv(path)
        stem = path.with_suffix("")
        paths += end_to_end_plot(rows, stem) if path.name.startswith("end_to_end") else kernel_plots(rows, stem)
    for p in paths:
        print(p)
    return paths


if __name__ == "__main__":
    main()
