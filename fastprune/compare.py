"""Every token-reduction method at matched FLOPs: fastprune's methods against ToMe, on real images.

``python -m fastprune.compare`` (or ``python -m fastprune.evaluate --compare``) answers "at equal
FLOPs, which method loses the least top-1?" for off-the-shelf pretrained ViTs (no fine-tuning):

1. **Anchors.** ToMe (Bolya et al., ICLR 2023) with a constant ``r`` per block, ``r = 8`` and
   ``r = 13`` by default (``--anchors``), gives the FLOPs levels.
2. **FLOPs matching.** For every other method a one-parameter family of settings (:class:`Family`,
   :func:`default_families`) is searched by bisection for the member whose GFLOPs per image, counted
   by :func:`fastprune.evaluation.settings.setting_gflops` (torch's ``FlopCounterMode`` on one image, the token
   reduction through its PyTorch reference), are closest to the anchor's (:func:`match_family`). The
   achieved GFLOPs are in the table, so the match is visible; a member further than ``tolerance``
   (2% by default) from the anchor is left out with a note. The families:

   * ``merge``: MSTM (Bian et al., 2023) with the recommended shape ``0*2, a, a-1, ..., a-9`` (no
     merging in blocks 0-1, then a ramp down by one token per block), ``metric=x``,
     ``weight=size_attn``; ``a`` is tuned.
   * ``merge-paper``: MSTM with ``schedule="paper"``, merging at blocks 3, 6, 9 with keep rate ``rho``.
   * ``evit``: EViT (Liang et al., ICLR 2022), keep rate ``rho`` at blocks 3, 6, 9.
   * ``bat``: BAT (Long et al., CVPR 2023), keep rate ``rho`` at blocks 3, 6, 9.
   * ``idle``: IdleViT (Xu et al., 2023), keep rate ``rho`` of its stage schedule, default options
     (``reselect=True``, the paper's rule).
   * ``idle-noreselect``: IdleViT with ``reselect=False`` -- *not the paper's rule*: an idle token stays
     idle (see :mod:`fastprune.idle`).

   Keep rates are searched on a grid of step ``0.01``; FLOPs are monotone in every family parameter
   (checked by the tests), which is what makes bisection valid.
3. **Evaluation.** Per model, the unreduced baseline, the anchors and all matched settings run side by
   side in one :func:`fastprune.evaluate.evaluate_settings` call (timed interleaved batch by batch, so
   images/s are comparable), and one table per model is printed: FLOPs level, method, setting,
   GFLOPs, FLOPs -%, top-1, Δ top-1 (with its paired bootstrap 95% interval), top-5, agreement of
   top-1 with the unreduced model (with interval), mean KL(unreduced || reduced), images/s,
   speed-up, device (agreement and KL over every image and its horizontal flip, see
   :mod:`fastprune.evaluation.fidelity`). Below each table, the best
   method at each level (highest top-1 among the non-ToMe rows) and whether it loses less top-1 than
   ToMe there.

Accuracy on the project's 500 sample images is only meaningful relative to the same model unreduced
(see the data README). images/s are for the device and thread count printed in the table. The
images are the report half by default (``--split``, as in :mod:`fastprune.evaluate`).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from .evaluation.data import (DTYPES, Images, add_split_arguments, default_data_dir, device_label, load_images,
                              load_model)
from .evaluation.matching import (DEFAULT_ANCHORS, DEFAULT_TOLERANCE, FAMILY_NAMES, KEEP_RATE_STEP, MATCH_SIDES,
                                  MERGE_SKIP_BLOCKS, Family, Match, anchor_setting, check_anchors,
                                  check_tolerance, default_families, match_all, match_family, match_parameter,
                                  merge_ramp)
from .evaluation.runner import Result, compare as compare_results, evaluate_settings, format_interval
from .evaluation.settings import format_value

__all__ = [
    "Family", "Match", "ComparisonRow", "ModelComparison", "DEFAULT_MODELS", "DEFAULT_ANCHORS",
    "DEFAULT_TOLERANCE", "FAMILY_NAMES", "default_families", "anchor_setting", "match_parameter",
    "match_family", "match_all", "compare_model", "run", "format_comparison", "best_rows",
    "device_label", "build_parser", "main", "merge_ramp", "KEEP_RATE_STEP", "MERGE_SKIP_BLOCKS", "MATCH_SIDES",
]

#: Models compared by default (both have weights in the data directory).
DEFAULT_MODELS = ("vit_tiny_patch16_224", "deit_tiny_patch16_224")


# --------------------------------------------------------------------------------------------------
# Evaluation and table
# --------------------------------------------------------------------------------------------------

@dataclass
class ComparisonRow:
    """One table row: ``level`` (the anchor's ToMe ``r``, None for the baseline), ``label`` (method
    column), the evaluated :class:`fastprune.evaluate.Result`, and the :class:`Match` (None for the
    baseline and the anchors)."""

    level: Optional[int]
    label: str
    result: Result
    match: Optional[Match] = None

    @property
    def is_anchor(self) -> bool:
        return self.level is not None and self.match is None


@dataclass
class ModelComparison:
    """The comparison on one model: its rows (baseline first, then per level the ToMe anchor and the
    matched methods), the matches left out (beyond tolerance or unreachable), the device label and
    the number of images."""

    model_name: str
    rows: List[ComparisonRow]
    left_out: List[Match]
    device: str
    num_images: int
    tolerance: float = DEFAULT_TOLERANCE


def compare_model(model: torch.nn.Module, images: Images, anchors: Sequence[int] = DEFAULT_ANCHORS, *,
                  model_name: str = "", families: Optional[Sequence[Family]] = None,
                  methods: Optional[Sequence[str]] = None, tolerance: float = DEFAULT_TOLERANCE,
                  side: str = "closest", device: Union[str, torch.device, None] = None,
                  dtype: Optional[torch.dtype] = None, warmup: int = 1, flip: bool = True,
                  progress: bool = True) -> ModelComparison:
    """Match every family to every anchor, then evaluate all settings side by side on ``images``.

    The unreduced model, the ToMe anchors and the matched settings (each distinct setting once) run
    in one :func:`fastprune.evaluate.evaluate_settings` call; matches further than ``tolerance``
    from their anchor are left out of the evaluation (and listed in ``left_out``).

    Args:
        model: the timm model from :func:`fastprune.evaluate.load_model` (patched and reverted).
        images: preprocessed images from :func:`fastprune.evaluate.load_images`.
        anchors, families, methods, side: as :func:`match_all`.
        model_name: for the report.
        tolerance: largest accepted ``|GFLOPs / anchor GFLOPs - 1|``, in ``(0, 1)``.
        device, dtype, warmup, flip, progress: as :func:`fastprune.evaluate.evaluate_settings`.

    Returns:
        :class:`ModelComparison`.

    Raises:
        TypeError/ValueError: bad ``anchors``, ``methods``, ``tolerance`` or ``side``.
    """
    tolerance = check_tolerance(tolerance)
    anchors = check_anchors(anchors)
    if len(images) == 0:
        raise ValueError("images is empty")
    targets, matches = match_all(model, images.batches[0][0], anchors, families=families, methods=methods,
                                 side=side)
    kept = [m for m in matches if m.reachable and abs(m.relative_error) <= tolerance]
    left_out = [m for m in matches if m not in kept]
    texts = ["none"]
    for r in anchors:
        texts.append(anchor_setting(r))
        texts.extend(m.setting for m in kept if m.anchor == r)
    unique = list(dict.fromkeys(texts))
    results = compare_results(evaluate_settings(model, images, unique, device=device, dtype=dtype,
                                                warmup=warmup, flip=flip, progress=progress))
    by_text = dict(zip(unique, results))
    rows = [ComparisonRow(None, "none (unreduced)", by_text["none"])]
    for r in anchors:
        rows.append(ComparisonRow(r, "tome (ToMe)", by_text[anchor_setting(r)]))
        rows.extend(ComparisonRow(r, m.family.label, by_text[m.setting], m) for m in kept if m.anchor == r)
    param = next(model.parameters())
    where = device_label(param.device if device is None else device)
    return ModelComparison(model_name, rows, left_out, where, len(images.labels), tolerance)


def best_rows(comparison: ModelComparison) -> Dict[int, Tuple[ComparisonRow, ComparisonRow]]:
    """Per level, ``(ToMe anchor row, best other row)``: the best is the highest top-1, then the
    fewest GFLOPs, then the first in table order."""
    out = {}
    levels = list(dict.fromkeys(row.level for row in comparison.rows if row.level is not None))
    for level in levels:
        rows = [row for row in comparison.rows if row.level == level]
        anchor = next(row for row in rows if row.is_anchor)
        others = [row for row in rows if not row.is_anchor]
        if others:
            best = min(enumerate(others), key=lambda ir: (-ir[1].result.top1, ir[1].result.gflops, ir[0]))[1]
            out[level] = (anchor, best)
    return out


def _setting_cell(result: Result) -> str:
    setting = result.setting
    if not setting.reduces:
        return "-"
    parts = [setting.r_label()] + [f"{k}={format_value(v)}" for k, v in setting.options.items()]
    return ", ".join(parts)


COLUMNS = ("FLOPs level", "method", "setting", "GFLOPs", "FLOPs -%", "top-1", "Δ top-1", "Δ top-1 95% CI",
           "top-5", "agree %", "agree 95% CI", "KL", "images/s", "speed-up", "device")


def _row_cells(row: ComparisonRow, device: str) -> List[str]:
    res = row.result
    level = "-" if row.level is None else f"ToMe r={row.level}"
    return [level, row.label, _setting_cell(res), f"{res.gflops:.3f}", f"{res.flops_reduction:.1f}",
            f"{res.top1:.1f}", f"{res.top1_delta:+.1f}", format_interval(*res.top1_delta_ci, sign=True),
            f"{res.top5:.1f}", f"{res.agree:.1f}", format_interval(*res.agree_ci), f"{res.kl:.4f}",
            f"{res.images_per_s:.1f}", f"{res.speedup:.2f}x", device]


def format_comparison(comparison: ModelComparison, markdown: bool = False) -> str:
    """The comparison of one model as a text (or Markdown) table, then one line per level naming the
    best method and whether it loses less top-1 than ToMe, then the settings left out."""
    rows = [list(COLUMNS)] + [_row_cells(row, comparison.device) for row in comparison.rows]
    numeric = range(3, len(COLUMNS) - 1)
    if markdown:
        lines = ["| " + " | ".join(rows[0]) + " |",
                 "|" + "|".join("---:" if i in numeric else "---" for i in range(len(COLUMNS))) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows[1:]]
    else:
        widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
        fmt = lambda row: "  ".join(c.rjust(w) if i in numeric else c.ljust(w)
                                    for i, (c, w) in enumerate(zip(row, widths))).rstrip()
        lines = [fmt(rows[0]), "  ".join("-" * w for w in widths)] + [fmt(row) for row in rows[1:]]
    lines.append("")
    bullet = "- " if markdown else ""
    for level, (anchor, best) in best_rows(comparison).items():
        a, b = anchor.result, best.result
        verdict = "loses less top-1 than ToMe" if b.top1 > a.top1 else \
            ("ties ToMe" if b.top1 == a.top1 else "loses more top-1 than ToMe")
        lines.append(f"{bullet}At ToMe r={level} ({a.gflops:.3f} GFLOPs): best is {best.label} "
                     f"[{_setting_cell(b)}] at {b.gflops:.3f} GFLOPs, top-1 {b.top1:.1f} ({b.top1_delta:+.1f}) "
                     f"vs ToMe {a.top1:.1f} ({a.top1_delta:+.1f}): {verdict} "
                     f"({b.top1 - a.top1:+.1f} points).")
    for m in comparison.left_out:
        why = "cannot reach" if not m.reachable else f"off by {100 * m.relative_error:+.1f}%"
        lines.append(f"{bullet}Left out at ToMe r={m.anchor}: {m.family.label} {why} the anchor's "
                     f"{m.target:.3f} GFLOPs (nearest: {m.setting}, {m.gflops:.3f} GFLOPs).")
    return "\n".join(lines).rstrip("\n")


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fastprune.compare",
        description="Every token-reduction method at the FLOPs of ToMe (constant r per block), on pretrained "
                    "timm ViTs and a folder of labelled ImageNet images: GFLOPs, top-1, top-5, images/s. "
                    "Methods are matched to each anchor's GFLOPs by bisection over one parameter.")
    parser.add_argument("--models", "--model", nargs="+", default=list(DEFAULT_MODELS),
                        help=f"timm model names (default: {' '.join(DEFAULT_MODELS)})")
    parser.add_argument("--anchors", nargs="+", type=int, default=list(DEFAULT_ANCHORS),
                        help="ToMe r values whose GFLOPs are the levels (default: %(default)s)")
    parser.add_argument("--methods", nargs="+", default=None, choices=FAMILY_NAMES,
                        help="families to match (default: all)")
    parser.add_argument("--data", type=str, default=None,
                        help="data directory (default: $FASTPRUNE_DATA or ../shared/data next to the repository)")
    parser.add_argument("--limit", type=int, default=None,
                        help="only the first N images of the split, sorted by file name")
    add_split_arguments(parser)
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help="largest relative GFLOPs difference to the anchor (default: %(default)s)")
    parser.add_argument("--match", choices=MATCH_SIDES, default="closest",
                        help="closest GFLOPs, or the most GFLOPs not above the anchor's (default: closest)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (torch.set_num_threads)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers for decoding the images")
    parser.add_argument("--warmup", type=int, default=1, help="untimed warm-up batches per setting")
    parser.add_argument("--markdown", action="store_true", help="print the tables as Markdown")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def run(args: argparse.Namespace) -> List[ModelComparison]:
    """Run the comparison the parsed command line asks for; one :class:`ModelComparison` per model."""
    anchors = check_anchors(args.anchors)
    tolerance = check_tolerance(args.tolerance)
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    data_dir = default_data_dir() if args.data is None else args.data
    dtype = DTYPES[args.dtype]
    out = []
    for name in args.models:
        model = load_model(name, data_dir=data_dir, device=args.device, dtype=dtype)
        images = load_images(data_dir, model, limit=args.limit, split=args.split, batch_size=args.batch_size,
                             workers=args.workers, progress=not args.no_progress)
        out.append(compare_model(model, images, anchors, model_name=name, methods=args.methods,
                                 tolerance=tolerance, side=args.match, device=args.device, warmup=args.warmup,
                                 flip=not args.no_flip, progress=not args.no_progress))
        del model, images
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point (``python -m fastprune.compare``); returns the exit status (0 on
    success, 2 on bad arguments or missing data)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        comparisons = run(args)
    except (FileNotFoundError, ValueError, TypeError) as err:
        parser.error(str(err))  # exits with status 2
    for i, comp in enumerate(comparisons):
        if i:
            print()
        title = (f"{comp.model_name} on {comp.num_images} images (split {args.split}), {args.dtype}, batch {args.batch_size}, "
                 f"{comp.device}; methods matched to ToMe's GFLOPs within {100 * comp.tolerance:g}%")
        print(f"### {title}\n" if args.markdown else title)
        print(format_comparison(comp, markdown=args.markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
