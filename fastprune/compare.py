"""Every token-reduction method at matched FLOPs: fastprune's methods against ToMe, on real images.

``python -m fastprune.compare`` (or ``python -m fastprune.evaluate --compare``) answers "at equal
FLOPs, which method loses the least top-1?" for off-the-shelf pretrained ViTs (no fine-tuning):

1. **Anchors.** ToMe (Bolya et al., ICLR 2023) with a constant ``r`` per block, ``r = 8`` and
   ``r = 13`` by default (``--anchors``), gives the FLOPs levels.
2. **FLOPs matching.** For every other method a one-parameter family of settings (:class:`Family`,
   :func:`default_families`) is searched by bisection for the member whose GFLOPs per image, counted
   by :func:`fastprune.evaluate.setting_gflops` (torch's ``FlopCounterMode`` on one image, the token
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
   GFLOPs, FLOPs -%, top-1, Δ top-1, top-5, images/s, speed-up, device. Below each table, the best
   method at each level (highest top-1 among the non-ToMe rows) and whether it loses less top-1 than
   ToMe there.

Accuracy on the project's 500 sample images is only meaningful relative to the same model unreduced
(see the data README). images/s are for the device and thread count printed in the table.
"""
from __future__ import annotations

import argparse
import math
import numbers
import platform
import sys
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from . import evaluate as _ev

__all__ = [
    "Family", "Match", "ComparisonRow", "ModelComparison", "DEFAULT_MODELS", "DEFAULT_ANCHORS",
    "DEFAULT_TOLERANCE", "FAMILY_NAMES", "default_families", "anchor_setting", "match_parameter",
    "match_family", "match_all", "compare_model", "run", "format_comparison", "best_rows",
    "device_label", "build_parser", "main",
]

#: Models compared by default (both have weights in the data directory).
DEFAULT_MODELS = ("vit_tiny_patch16_224", "deit_tiny_patch16_224")
#: ToMe ``r`` values whose FLOPs are the levels compared by default.
DEFAULT_ANCHORS = (8, 13)
#: Largest accepted relative GFLOPs difference between a matched setting and its anchor.
DEFAULT_TOLERANCE = 0.02
#: Step of the keep-rate grid searched for the keep-rate families.
KEEP_RATE_STEP = 0.01
#: Families of :func:`default_families`, in table order.
FAMILY_NAMES = ("merge", "merge-paper", "evit", "bat", "idle", "idle-noreselect")
#: Blocks without merging at the start of the recommended MSTM shape.
MERGE_SKIP_BLOCKS = 2
MATCH_SIDES = ("closest", "at-most")


# --------------------------------------------------------------------------------------------------
# Families of settings and FLOPs matching
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Family:
    """A one-parameter family of settings of one method.

    Attributes:
        name: short name (``"merge"``, ``"evit"``, ...; see :data:`FAMILY_NAMES`).
        label: the method column of the table.
        params: the candidate parameter values, sorted ascending.
        make: ``param -> setting text`` (``fastprune.evaluate`` syntax, e.g. ``"evit:0.55"``).
        flops_increase: True if GFLOPs grow with the parameter (keep rates), False if they fall
            (tokens removed).
    """

    name: str
    label: str
    params: Tuple
    make: Callable
    flops_increase: bool

    def setting(self, param) -> "_ev.Setting":
        """The :class:`fastprune.evaluate.Setting` of one member."""
        return _ev.parse_setting(self.make(param))


def _rate_text(rho: float) -> str:
    """A keep rate as setting text that parses back as a float: ``0.5``, ``0.55``, ``1.0``."""
    text = f"{rho:.6f}".rstrip("0")
    return text + "0" if text.endswith(".") else text


def _keep_rates(step: float = KEEP_RATE_STEP) -> Tuple[float, ...]:
    n = int(round(1.0 / step))
    return tuple(round(i * step, 6) for i in range(1, n + 1))


def merge_ramp(a: int, depth: int, skip: int = MERGE_SKIP_BLOCKS) -> str:
    """The recommended MSTM shape as per-block ``r`` text: ``skip`` blocks without merging, then
    ``a, a-1, ..., a-(depth-skip-1)`` (``"0*2,21..12"`` for ``a = 21``, 12 blocks)."""
    last = a - (depth - skip - 1)
    if last < 0:
        raise ValueError(f"a must be >= {depth - skip - 1} for a ramp over {depth - skip} blocks, got {a}")
    head = f"0*{skip}," if skip > 0 else ""
    return head + (f"{a}..{last}" if last != a else f"{a}")


def default_families(depth: int = 12, num_patches: int = 196, *,
                     keep_rate_step: float = KEEP_RATE_STEP) -> List[Family]:
    """The families compared against ToMe, in table order (see the module docstring).

    Args:
        depth: number of blocks of the model (the MSTM ramp spans blocks ``2 .. depth-1``).
        num_patches: non-prefix tokens entering the first block (largest useful ramp start ``a``).
        keep_rate_step: grid step of the keep rates ``rho`` in ``(0, 1]``.

    Returns:
        list of :class:`Family`.

    Raises:
        ValueError: ``depth`` too small for the ramp (``< MERGE_SKIP_BLOCKS + 1``), ``num_patches < 1``,
            ``keep_rate_step`` not in ``(0, 0.5]``.
    """
    for name, value in (("depth", depth), ("num_patches", num_patches)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if depth < MERGE_SKIP_BLOCKS + 1:
        raise ValueError(f"depth must be >= {MERGE_SKIP_BLOCKS + 1}, got {depth}")
    if num_patches < 1:
        raise ValueError(f"num_patches must be >= 1, got {num_patches}")
    if isinstance(keep_rate_step, bool) or not isinstance(keep_rate_step, numbers.Real) \
            or not 0.0 < keep_rate_step <= 0.5:
        raise ValueError(f"keep_rate_step must be in (0, 0.5], got {keep_rate_step!r}")
    rates = _keep_rates(keep_rate_step)
    first_a = depth - MERGE_SKIP_BLOCKS - 1
    ramp = tuple(range(first_a, max(first_a, num_patches) + 1))
    return [
        Family("merge", "merge (MSTM, recommended shape)", ramp,
               lambda a: f"merge:{merge_ramp(a, depth)}:metric=x:weight=size_attn", flops_increase=False),
        Family("merge-paper", "merge (MSTM, schedule=paper)", rates,
               lambda rho: f"merge:{_rate_text(rho)}:schedule=paper", flops_increase=True),
        Family("evit", "evit", rates, lambda rho: f"evit:{_rate_text(rho)}", flops_increase=True),
        Family("bat", "bat", rates, lambda rho: f"bat:{_rate_text(rho)}", flops_increase=True),
        Family("idle", "idle", rates, lambda rho: f"idle:{_rate_text(rho)}", flops_increase=True),
        Family("idle-noreselect", "idle (reselect=off, not the paper's rule)", rates,
               lambda rho: f"idle:{_rate_text(rho)}:reselect=off", flops_increase=True),
    ]


def anchor_setting(r: int) -> str:
    """The anchor setting text: ToMe with ``r`` tokens merged in every block (``"tome:13"``)."""
    return f"tome:{r}"


@dataclass
class Match:
    """The member of a family matched to an anchor.

    Attributes:
        family: the searched :class:`Family`.
        anchor: the anchor's ToMe ``r``.
        target: the anchor's GFLOPs per image.
        param: the chosen parameter value.
        setting: its setting text.
        gflops: its GFLOPs per image.
        evaluated: every ``{param: GFLOPs}`` the search counted.
        reachable: False if the target lies outside the family's GFLOPs range (``param`` is then
            the nearest end).
    """

    family: Family
    anchor: int
    target: float
    param: Union[int, float]
    setting: str
    gflops: float
    evaluated: Dict = field(default_factory=dict)
    reachable: bool = True

    @property
    def relative_error(self) -> float:
        """``(gflops - target) / target``."""
        return (self.gflops - self.target) / self.target


def match_parameter(params: Sequence, gflops_of: Callable, target: float, *, increasing: bool,
                    side: str = "closest") -> Tuple[int, bool, Dict]:
    """Bisection over a sorted parameter grid whose GFLOPs are monotone in the parameter.

    Finds the crossing of ``target`` with ``O(log len(params))`` calls of ``gflops_of`` (memoised),
    then takes the closest of the two bracketing members (``side="closest"``) or the one with the
    most GFLOPs not above ``target`` (``side="at-most"``).

    Args:
        params: candidate parameter values, sorted ascending (at least one).
        gflops_of: ``param -> GFLOPs``; non-decreasing in the parameter if ``increasing``, else
            non-increasing.
        target: the GFLOPs to match (> 0).
        increasing: direction of the monotonicity.
        side: ``"closest"`` or ``"at-most"``.

    Returns:
        ``(index of the chosen parameter, reachable, {param: GFLOPs} evaluated)``; ``reachable`` is
        False when ``target`` lies outside ``[min, max]`` of the family's GFLOPs (or, for
        ``"at-most"``, below every member), and the index is then the nearest end.

    Raises:
        ValueError: empty ``params``, ``target`` not a positive finite number, unknown ``side``.
    """
    if len(params) == 0:
        raise ValueError("params must not be empty")
    if isinstance(target, bool) or not isinstance(target, numbers.Real) or not math.isfinite(target) \
            or target <= 0:
        raise ValueError(f"target must be a positive number of GFLOPs, got {target!r}")
    if side not in MATCH_SIDES:
        raise ValueError(f"side must be one of {MATCH_SIDES}, got {side!r}")
    seen: Dict = {}

    def g(i: int) -> float:
        p = params[i]
        if p not in seen:
            seen[p] = float(gflops_of(p))
        return seen[p]

    # key(i) is non-decreasing in i: GFLOPs, or minus GFLOPs for a decreasing family
    sign = 1.0 if increasing else -1.0
    key = lambda i: sign * g(i)
    t = sign * target
    lo, hi = 0, len(params) - 1
    ends = (g(lo), g(hi))
    reachable = min(ends) <= target <= max(ends)
    if key(lo) >= t:  # target at or beyond the low-key end
        first = lo
    elif key(hi) < t:  # beyond the high-key end
        first = hi + 1
    else:  # invariant: key(lo) < t <= key(hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if key(mid) >= t:
                hi = mid
            else:
                lo = mid
        first = hi  # the first index with key >= t
    candidates = [i for i in (first - 1, first) if 0 <= i < len(params)]
    if side == "closest":
        best = min(candidates, key=lambda i: (abs(g(i) - target), i))
    else:
        below = [i for i in candidates if g(i) <= target]
        if below:
            best = max(below, key=lambda i: (g(i), -i))
        else:
            best, reachable = min(candidates, key=lambda i: g(i)), False
    return best, reachable, seen


def match_family(model: torch.nn.Module, family: Family, target: float, image: torch.Tensor, *,
                 anchor: int = 0, side: str = "closest",
                 gflops_of: Optional[Callable[[str], float]] = None) -> Match:
    """The member of ``family`` whose GFLOPs per image on ``model`` are closest to ``target``.

    Args:
        model: the unpatched timm ViT (not modified; counted on a float32 CPU copy).
        family: the :class:`Family` to search.
        target: the anchor's GFLOPs per image.
        image: one preprocessed image ``[3, H, W]`` or ``[1, 3, H, W]`` (token counts, hence FLOPs, do
            not depend on its content).
        anchor: the anchor's ToMe ``r`` (recorded in the :class:`Match`).
        side: ``"closest"`` or ``"at-most"`` (see :func:`match_parameter`).
        gflops_of: ``setting text -> GFLOPs``; :func:`fastprune.evaluate.setting_gflops` on ``model``
            and ``image`` if None (pass a memoised one to share counts between anchors).

    Returns:
        :class:`Match`.
    """
    if gflops_of is None:
        gflops_of = lambda text: _ev.setting_gflops(model, text, image)
    i, reachable, seen = match_parameter(family.params, lambda p: gflops_of(family.make(p)), target,
                                         increasing=family.flops_increase, side=side)
    param = family.params[i]
    return Match(family, anchor, float(target), param, family.make(param), seen[param], dict(seen), reachable)


def _check_anchors(anchors) -> List[int]:
    if isinstance(anchors, (str, bytes)) or not isinstance(anchors, Sequence) or len(anchors) == 0:
        raise ValueError(f"anchors must be a non-empty sequence of ToMe r values, got {anchors!r}")
    out = []
    for r in anchors:
        if isinstance(r, bool) or not isinstance(r, numbers.Integral):
            raise TypeError(f"anchors must be ints (ToMe's r), got {type(r).__name__} ({r!r})")
        if r < 1:
            raise ValueError(f"anchors must be ToMe r values >= 1, got {r}")
        out.append(int(r))
    return out


def _check_tolerance(tolerance) -> float:
    if isinstance(tolerance, bool) or not isinstance(tolerance, numbers.Real) or not 0 < tolerance < 1:
        raise ValueError(f"tolerance must be a relative GFLOPs difference in (0, 1), got {tolerance!r}")
    return float(tolerance)


def _select_families(families: Optional[Sequence[Family]], names: Optional[Sequence[str]],
                     model: torch.nn.Module) -> List[Family]:
    if families is None:
        families = default_families(len(model.blocks), int(model.patch_embed.num_patches))
    families = list(families)
    if names is not None:
        known = {f.name: f for f in families}
        unknown = [n for n in names if n not in known]
        if unknown or len(names) == 0:
            raise ValueError(f"methods must be a non-empty list of {sorted(known)}, got {list(names)!r}")
        families = [known[n] for n in names]
    return families


def match_all(model: torch.nn.Module, image: torch.Tensor, anchors: Sequence[int] = DEFAULT_ANCHORS, *,
              families: Optional[Sequence[Family]] = None, methods: Optional[Sequence[str]] = None,
              side: str = "closest") -> Tuple[Dict[int, float], List[Match]]:
    """Match every family to every anchor on one model.

    Args:
        model: the unpatched timm ViT.
        image: one preprocessed image (see :func:`match_family`).
        anchors: ToMe ``r`` values (ints >= 1).
        families: the families; :func:`default_families` for the model's depth if None.
        methods: names of the families to keep (all if None).
        side: ``"closest"`` or ``"at-most"``.

    Returns:
        ``({anchor r: anchor GFLOPs}, [Match per anchor, per family])``.

    Raises:
        TypeError/ValueError: bad ``anchors`` (empty, not ints, < 1), unknown ``methods``.
    """
    anchors = _check_anchors(anchors)
    families = _select_families(families, methods, model)
    cache: Dict[str, float] = {}

    def gflops_of(text: str) -> float:
        if text not in cache:
            cache[text] = _ev.setting_gflops(model, text, image)
        return cache[text]

    # one image through a small model: a single thread is as fast, and immune to a busy machine
    # (two OpenMP threads on two loaded cores can be 40x slower than one)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        targets = {r: gflops_of(anchor_setting(r)) for r in anchors}
        matches = [match_family(model, fam, targets[r], image, anchor=r, side=side, gflops_of=gflops_of)
                   for r in anchors for fam in families]
    finally:
        torch.set_num_threads(threads)
    return targets, matches


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
    result: "_ev.Result"
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


def device_label(device: Union[str, torch.device]) -> str:
    """The device column: the GPU's name, or the CPU model (``/proc/cpuinfo``) and torch's thread count."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    name = name or platform.processor() or platform.machine() or "CPU"
    return f"{name}, {torch.get_num_threads()} threads"


def compare_model(model: torch.nn.Module, images: "_ev.Images", anchors: Sequence[int] = DEFAULT_ANCHORS, *,
                  model_name: str = "", families: Optional[Sequence[Family]] = None,
                  methods: Optional[Sequence[str]] = None, tolerance: float = DEFAULT_TOLERANCE,
                  side: str = "closest", device: Union[str, torch.device, None] = None,
                  dtype: Optional[torch.dtype] = None, warmup: int = 1, progress: bool = True) -> ModelComparison:
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
        device, dtype, warmup, progress: as :func:`fastprune.evaluate.evaluate_settings`.

    Returns:
        :class:`ModelComparison`.

    Raises:
        TypeError/ValueError: bad ``anchors``, ``methods``, ``tolerance`` or ``side``.
    """
    tolerance = _check_tolerance(tolerance)
    anchors = _check_anchors(anchors)
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
    results = _ev.compare(_ev.evaluate_settings(model, images, unique, device=device, dtype=dtype,
                                                warmup=warmup, progress=progress))
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


def _setting_cell(result: "_ev.Result") -> str:
    setting = result.setting
    if not setting.reduces:
        return "-"
    parts = [setting.r_label()] + [f"{k}={_ev._format_value(v)}" for k, v in setting.options.items()]
    return ", ".join(parts)


COLUMNS = ("FLOPs level", "method", "setting", "GFLOPs", "FLOPs -%", "top-1", "Δ top-1", "top-5", "images/s",
           "speed-up", "device")


def _row_cells(row: ComparisonRow, device: str) -> List[str]:
    res = row.result
    level = "-" if row.level is None else f"ToMe r={row.level}"
    return [level, row.label, _setting_cell(res), f"{res.gflops:.3f}", f"{res.flops_reduction:.1f}",
            f"{res.top1:.1f}", f"{res.top1_delta:+.1f}", f"{res.top5:.1f}", f"{res.images_per_s:.1f}",
            f"{res.speedup:.2f}x", device]


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
    parser.add_argument("--limit", type=int, default=None, help="only the first N images, sorted by file name")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help="largest relative GFLOPs difference to the anchor (default: %(default)s)")
    parser.add_argument("--match", choices=MATCH_SIDES, default="closest",
                        help="closest GFLOPs, or the most GFLOPs not above the anchor's (default: closest)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(_ev.DTYPES), default="float32")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (torch.set_num_threads)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers for decoding the images")
    parser.add_argument("--warmup", type=int, default=1, help="untimed warm-up batches per setting")
    parser.add_argument("--markdown", action="store_true", help="print the tables as Markdown")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def run(args: argparse.Namespace) -> List[ModelComparison]:
    """Run the comparison the parsed command line asks for; one :class:`ModelComparison` per model."""
    anchors = _check_anchors(args.anchors)
    tolerance = _check_tolerance(args.tolerance)
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    data_dir = _ev.default_data_dir() if args.data is None else args.data
    dtype = _ev.DTYPES[args.dtype]
    out = []
    for name in args.models:
        model = _ev.load_model(name, data_dir=data_dir, device=args.device, dtype=dtype)
        images = _ev.load_images(data_dir, model, limit=args.limit, batch_size=args.batch_size,
                                 workers=args.workers, progress=not args.no_progress)
        out.append(compare_model(model, images, anchors, model_name=name, methods=args.methods,
                                 tolerance=tolerance, side=args.match, device=args.device, warmup=args.warmup,
                                 progress=not args.no_progress))
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
        title = (f"{comp.model_name} on {comp.num_images} images, {args.dtype}, batch {args.batch_size}, "
                 f"{comp.device}; methods matched to ToMe's GFLOPs within {100 * comp.tolerance:g}%")
        print(f"### {title}\n" if args.markdown else title)
        print(format_comparison(comp, markdown=args.markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
