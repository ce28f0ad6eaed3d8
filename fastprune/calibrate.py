"""Calibrate a token-reduction schedule for a model: per-block ``r`` and options, without labels.

:func:`calibrate` searches the per-block ``r`` (and the method's options) of ``"merge"`` (MSTM) or
``"tome"`` that keeps a timm ViT closest to its unreduced outputs on a few hundred unlabelled images,
at a FLOPs budget (a fraction of the unreduced GFLOPs, counted like the evaluation counts them,
:func:`~fastprune.evaluation.settings.setting_gflops`) or at a throughput measured on the model's
device. Closeness is the mean ``KL(unreduced || reduced)`` of the softmax outputs (top-1 agreement
is reported beside it). The unreduced logits are computed once. The search, deterministic:

1. **start** (``start="ramp"``, default): the best of a few ramps within the budget (``skip``
   blocks without reduction, then ``a, a + slope, ...``, ``a`` the smallest that fits); or
   ``start="greedy"``: from ``r = 0``, every step tries, for each block, the smallest increase of
   that block's ``r`` that saves ``step`` of the unreduced FLOPs (the last step: what is left to the
   budget) and keeps the one with the least KL increase per FLOP saved, until the budget is met
   (a throughput target always walks this path to find its budget);
2. **options**: the method's options (:data:`OPTION_GRIDS`) are tried on that schedule;
3. **refinement**: ``sweeps`` passes of moving ``move`` tokens between neighbouring blocks (the
   receiving block takes more if the budget needs it, the giving one gives back what it allows),
   kept when the KL falls.

The result is a :class:`~fastprune.evaluation.settings.Setting`: ``fastprune.patch.timm(model,
**setting)`` applies it, :func:`~fastprune.evaluation.settings.save_setting` /
:func:`~fastprune.evaluation.settings.load_setting` store it as JSON (``python -m fastprune.evaluate
--settings file:schedule.json``), ``setting.meta`` holds the calibration's figures, with the uniform
schedule (the smallest constant ``r`` within the same budget) for comparison.

Command line: ``python -m fastprune.calibrate --model M --images DIR --flops 0.6 -o schedule.json``.
"""
from __future__ import annotations

import argparse
import itertools
import pathlib
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch

from . import patch
from .evaluation.calibration import CalibrationSearch, calibration_batches, schedule_setting
from .evaluation.data import DTYPES, SPLITS, add_model_arguments, default_data_dir, device_label, load_model
from .evaluation.settings import Setting, parse_options, save_setting, setting_gflops

__all__ = ["calibrate", "calibration_batches", "uniform_setting", "OPTION_GRIDS", "METHODS", "SEARCHES",
           "RAMP_SKIPS", "RAMP_SLOPES", "DEFAULT_STEP",
           "DEFAULT_MOVE", "DEFAULT_SWEEPS", "build_parser", "main"]

#: Methods whose per-block ``r`` list is searched, and the options tried for each (every combination).
OPTION_GRIDS: Dict[str, Dict[str, tuple]] = {
    "merge": {"metric": ("x", "keys"), "weight": ("size_attn", "size")},
    "tome": {"metric": ("keys", "x")},
}
METHODS = tuple(OPTION_GRIDS)
#: Options a per-block ``r`` search cannot use (they read ``r`` their own way), with their allowed value.
_FIXED_OPTIONS = {"merge": {"schedule": None}, "tome": {"schedule": "constant"}}
#: Greedy step (fraction of the unreduced FLOPs), tokens per refinement move, refinement sweeps.
DEFAULT_STEP = 0.025
#: Start of the search: "ramp" (the best of a few ramps, :data:`RAMP_SKIPS` x :data:`RAMP_SLOPES`)
#: or "greedy" (per-block greedy steps).
SEARCHES = ("ramp", "greedy")
RAMP_SKIPS = (0, 1, 2, 3)
RAMP_SLOPES = (-2, -1, 0, 1)
DEFAULT_MOVE = 2
DEFAULT_SWEEPS = 1


def _grow(search: CalibrationSearch, method: str, r: List[int], options: Dict[str, Any], block: int,
          need: int) -> Optional[List[int]]:
    """``r`` with block ``block`` removing the fewest more tokens whose estimated saving is >= ``need``
    FLOPs (as many as it can if none is); None if the block cannot remove more."""
    before, best = search.estimate(r), None
    for extra in itertools.count(1):
        cand = r.copy()
        cand[block] += extra
        cand = search.applied(method, cand, options)
        if cand[block] <= (best[block] if best else r[block]):
            return best  # clipped: no more tokens to take here
        best = cand
        if before - search.estimate(cand) >= need:
            return best


def _fit(search: CalibrationSearch, method: str, r: List[int], options: Dict[str, Any], target: int,
         block: int) -> Optional[List[int]]:
    """``r`` with ``block`` (then the blocks after it, then those before) removing more until the
    FLOPs are <= ``target``; None if it cannot."""
    r = list(r)
    for b in list(range(block, search.depth)) + list(range(block - 1, -1, -1)):
        while search.flops(schedule_setting(method, r, options)) > target:
            cand = r.copy()
            cand[b] += 1
            cand = search.applied(method, cand, options)
            if cand[b] <= r[b]:
                break
            r = cand
        else:
            return r
    return r if search.flops(schedule_setting(method, r, options)) <= target else None


def _greedy(search: CalibrationSearch, method: str, options: Dict[str, Any], step: float,
            done: Callable[[Setting], bool]) -> List[int]:
    r = [0] * search.depth
    while not done(schedule_setting(method, r, options)):
        current = schedule_setting(method, r, options)
        flops, kl = search.flops(current), search.kl(current)
        need = int(step * search.base) if search.target is None else min(int(step * search.base), flops - search.target)
        best, best_score = None, None
        for block in range(search.depth):
            cand = _grow(search, method, r, options, block, need)
            if cand is None:
                continue
            if search.target is not None and flops - need <= search.target:  # the last step: land in budget
                cand = _fit(search, method, cand, options, search.target, block)
                if cand is None:
                    continue
            saved = flops - search.flops(schedule_setting(method, cand, options))
            if saved <= 0:
                continue
            score = (search.kl(schedule_setting(method, cand, options)) - kl) / saved
            if best_score is None or score < best_score:  # ties: the lower block
                best, best_score = cand, score
        if best is None:
            raise ValueError(f"the target cannot be reached with method {method!r}: every block already "
                             f"removes all it can (at {flops / search.base:.3f} of the unreduced FLOPs)")
        r = best
    return r


def _move(search: CalibrationSearch, method: str, r: List[int], options: Dict[str, Any], src: int, dst: int,
          tokens: int, target: int) -> Optional[List[int]]:
    """``tokens`` of block ``src``'s reduction moved to block ``dst``, refitted to the budget."""
    if r[src] < tokens:
        return None
    cand = r.copy()
    cand[src] -= tokens
    cand[dst] += tokens
    cand = _fit(search, method, search.applied(method, cand, options), options, target, dst)
    if cand is None:
        return None
    while cand[src] > 0:  # give back what the budget allows
        less = cand.copy()
        less[src] -= 1
        less = search.applied(method, less, options)
        if search.flops(schedule_setting(method, less, options)) > target:
            break
        cand = less
    return None if cand == r else cand


def _refine(search: CalibrationSearch, method: str, r: List[int], options: Dict[str, Any], target: int,
            sweeps: int, tokens: int) -> List[int]:
    for _ in range(sweeps):
        improved = False
        for i in range(search.depth - 1):
            for src, dst in ((i + 1, i), (i, i + 1)):
                cand = _move(search, method, r, options, src, dst, tokens, target)
                if cand is not None and search.kl(schedule_setting(method, cand, options)) < \
                        search.kl(schedule_setting(method, r, options)):
                    r, improved = cand, True
        if not improved:
            break
    return r


def _ramp(search: CalibrationSearch, method: str, options: Dict[str, Any], budget: int) -> List[int]:
    """The best ramp within ``budget``: ``skip`` blocks without reduction, then ``a, a + slope, ...``
    (:data:`RAMP_SKIPS` x :data:`RAMP_SLOPES`), ``a`` the smallest that fits the budget."""
    def ramp(skip: int, slope: int, a: int) -> List[int]:
        return search.applied(method, [0] * skip + [max(0, a + slope * i) for i in range(search.depth - skip)],
                              options)

    best, best_kl = None, None
    for skip, slope in itertools.product(RAMP_SKIPS, RAMP_SLOPES):
        low, high = 0, search.num_tokens  # the first a that fits lies in (low, high]
        fits = lambda a: search.flops(schedule_setting(method, ramp(skip, slope, a), options)) <= budget  # noqa: E731
        if skip >= search.depth or not fits(high):
            continue
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (low, mid) if fits(mid) else (mid, high)
        r = ramp(skip, slope, high)
        kl = search.kl(schedule_setting(method, r, options))
        if best_kl is None or kl < best_kl:
            best, best_kl = r, kl
    if best is None:
        raise ValueError(f"the target cannot be reached with method {method!r} by any ramp")
    return best


def uniform_setting(search: CalibrationSearch, method: str, options: Dict[str, Any], target: int) -> Optional[Setting]:
    """The smallest constant ``r`` (as a per-block list) whose FLOPs are <= ``target``, or None."""
    low, high = 0, search.num_tokens - search.num_prefix  # invariant: high is within the budget, if any is
    fits = lambda value: search.flops(schedule_setting(method, search.applied(method, [value] * search.depth, options),
                                                options)) <= target  # noqa: E731
    if not fits(high):
        return None
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if fits(mid) else (mid, high)
    return schedule_setting(method, search.applied(method, [high] * search.depth, options), options)


def _check_fraction(value, name: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low < value < high:
        raise ValueError(f"{name} must be a number in ({low:g}, {high:g}), got {value!r}")
    return float(value)


def _check_options(method: str, options: Optional[Dict[str, Any]], search_options: bool) -> List[Dict[str, Any]]:
    """The option combinations to try for ``method`` (the user's first)."""
    options = dict(options or {})
    for key, allowed in _FIXED_OPTIONS[method].items():
        if key in options and options[key] != allowed:
            raise ValueError(f"options: {key}={options[key]!r} reads r its own way; calibrate searches a "
                             f"per-block r (leave {key} at {allowed!r})")
    defaults = patch.registry.get_method(method).defaults
    unknown = set(options) - set(defaults) - set(patch.COMMON_OPTIONS)
    if unknown:
        raise ValueError(f"options: unknown option(s) {sorted(unknown)} for method {method!r}")
    grid = {k: v for k, v in OPTION_GRIDS[method].items() if k not in options} if search_options else {}
    first = {**{k: defaults[k] for k in OPTION_GRIDS[method]}, **options}
    combos = [first] + [{**first, **dict(zip(grid, values))} for values in itertools.product(*grid.values())]
    unique = []
    for combo in combos:
        if combo not in unique:
            unique.append(combo)
    return unique


def calibrate(model: torch.nn.Module, images, *, flops: Optional[float] = None,
              images_per_s: Optional[float] = None, method: Union[str, Sequence[str]] = "merge",
              options: Optional[Dict[str, Any]] = None, search_options: bool = True, start: str = "ramp",
              step: float = DEFAULT_STEP,
              move: int = DEFAULT_MOVE, sweeps: int = DEFAULT_SWEEPS, limit: Optional[int] = None,
              split: str = "all", batch_size: int = 32, flip: bool = False, progress: bool = True) -> Setting:
    """Search the per-block ``r`` and options that keep ``model`` closest to its unreduced outputs.

    Args:
        model: an unpatched timm ``VisionTransformer`` in eval mode (left unpatched); it runs on its
            own device and dtype.
        images: unlabelled calibration images (:func:`calibration_batches`: a folder, a tensor
            ``[n, 3, H, W]`` or a ``DataLoader``).
        flops: the budget, a fraction in (0, 1) of the unreduced GFLOPs; or
        images_per_s: the throughput to reach, measured on the model's device on the first batch.
        method: ``"merge"`` (MSTM) or ``"tome"``, or several (the one with the lowest KL is returned).
        options: the method's options to hold fixed; the others of :data:`OPTION_GRIDS` are searched
            (unless ``search_options`` is False: then the defaults are used).
        start: "ramp" (default: the best ramp within the budget, see :data:`RAMP_SKIPS`) or "greedy"
            (per-block steps of ``step``) as the schedule the options and the refinement start from.
        step: FLOPs a greedy step saves, as a fraction of the unreduced FLOPs, in (0, 0.5].
        move: tokens a refinement move takes from one block to its neighbour (int >= 1).
        sweeps: refinement passes (int >= 0).
        limit, split, batch_size: which calibration images and in what batches.
        flip: also compare on the horizontally flipped images (twice the work).
        progress: show a tqdm progress bar of the evaluated schedules.

    Returns:
        A :class:`~fastprune.evaluation.settings.Setting` with a per-block ``r`` list; its ``meta``
        has ``gflops``, ``base_gflops``, ``flops_fraction``, ``kl``, ``agreement``, ``images``, the
        target, the ``uniform`` schedule's figures, and ``images_per_s`` for a throughput target.

    Raises:
        TypeError: ``model`` not a timm ``VisionTransformer``; bad ``images``.
        ValueError: not exactly one of ``flops`` / ``images_per_s``, either out of range, an unknown
            ``method``, a bad option, ``step``/``move``/``sweeps`` out of range, a patched model, or a
            target no schedule reaches.
    """
    if (flops is None) == (images_per_s is None):
        raise ValueError("give exactly one target: flops=<fraction of the unreduced FLOPs> or images_per_s=<float>")
    if flops is not None:
        flops = _check_fraction(flops, "flops", 0.0, 1.0)
    elif isinstance(images_per_s, bool) or not isinstance(images_per_s, (int, float)) or not images_per_s > 0:
        raise ValueError(f"images_per_s must be a number > 0, got {images_per_s!r}")
    methods = [method] if isinstance(method, str) else list(method)
    if not methods or any(m not in METHODS for m in methods):
        raise ValueError(f"method must be one of {METHODS} (or a list of them), got {method!r}")
    if start not in SEARCHES:
        raise ValueError(f"start must be one of {SEARCHES}, got {start!r}")
    step = _check_fraction(step, "step", 0.0, 0.5 + 1e-12)
    for name, value, low in (("move", move, 1), ("sweeps", sweeps, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if patch.is_patched(model):
        raise ValueError("model: already patched by fastprune.patch.timm; revert it before calibrating")
    patch.reduction_schedule(model, 0)  # TypeError/ValueError for a model the patch does not take
    combos = {m: _check_options(m, options, search_options) for m in methods}
    batches = calibration_batches(images, model, limit=limit, split=split, batch_size=batch_size,
                                  progress=progress)
    search = CalibrationSearch(model, batches, flip, progress)
    search.target = None if flops is None else int(flops * search.base)
    results = []
    with search.bar:
        for m in methods:
            results.append(_calibrate_method(search, m, combos[m], start, step, move, sweeps, images_per_s))
    best = min(results, key=lambda s: s.meta["kl"])
    best.meta.update(images=sum(len(b) for b in batches), flip=flip, evaluations=len(search._fidelity),
                     target={"flops": flops} if flops is not None else {"images_per_s": images_per_s},
                     searched=[{"method": s.method, "text": s.text, "kl": s.meta["kl"]} for s in results])
    return best


def _calibrate_method(search: CalibrationSearch, method: str, combos: List[Dict[str, Any]], start: str, step: float,
                      move: int, sweeps: int, images_per_s: Optional[float]) -> Setting:
    options = combos[0]
    if images_per_s is None:
        done = lambda s: search.flops(s) <= search.target  # noqa: E731
    else:
        done = lambda s: search.throughput(s) >= images_per_s  # noqa: E731
    if start == "greedy" or search.target is None:  # a throughput target: the greedy path finds the budget
        r = _greedy(search, method, options, step, done)
    budget = search.flops(schedule_setting(method, r, options)) if search.target is None else search.target
    if start == "ramp":
        r = _ramp(search, method, options, budget)
    for combo in combos[1:]:  # the options, on the greedy schedule (refitted to the budget)
        cand = _fit(search, method, search.applied(method, r, combo), combo, budget, search.depth - 1)
        if cand is not None and search.kl(schedule_setting(method, cand, combo)) < search.kl(schedule_setting(method, r, options)):
            r, options = cand, combo
    r = _refine(search, method, r, options, budget, sweeps, move)
    setting = schedule_setting(method, r, options)
    kl, agree = search.fidelity(setting)
    flops = setting_gflops(search.counted, setting, search.image, by_module=True)[""]
    if flops != search.flops(setting):
        raise RuntimeError(f"calibrate: predicted {search.flops(setting)} FLOPs for {setting.text}, counted {flops} "
                           "(a reduction whose FLOPs depend on more than its token count?)")
    setting.meta.update(gflops=flops / 1e9, base_gflops=search.base / 1e9, flops_fraction=flops / search.base,
                        kl=kl, agreement=agree)
    uniform = uniform_setting(search, method, options, budget)
    if uniform is not None:
        u_kl, u_agree = search.fidelity(uniform)
        setting.meta["uniform"] = {"text": uniform.text, "gflops": search.flops(uniform) / 1e9, "kl": u_kl,
                                   "agreement": u_agree}
    if images_per_s is not None:
        setting.meta["images_per_s"] = search.throughput(setting)
    return setting


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fastprune.calibrate",
        description=__doc__.split("\n\n")[0] + " Writes JSON for python -m fastprune.evaluate --settings file:PATH.")
    add_model_arguments(parser)
    parser.add_argument("--images", type=pathlib.Path, required=True, help="folder of calibration images (no labels)")
    parser.add_argument("--split", choices=SPLITS, default="all",
                        help="which images of the folder: 'tune' (even positions of the sorted names), 'report' "
                             "(odd) or 'all' (default: %(default)s); --limit applies within it")
    parser.add_argument("--limit", type=int, default=None, help="only the first N images")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--flops", type=float, help="budget: fraction of the unreduced FLOPs, e.g. 0.6")
    target.add_argument("--images-per-s", type=float, help="target throughput on --device, images/s")
    parser.add_argument("--method", nargs="+", default=["merge"], choices=METHODS,
                        help="method(s) to search; the lowest KL is kept (default: merge)")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="hold a method option fixed (e.g. --option weight=size_attn)")
    parser.add_argument("--no-option-search", action="store_true", help="use the method's default options")
    parser.add_argument("--start", choices=SEARCHES, default="ramp",
                        help="schedule the search starts from: the best ramp, or greedy per-block steps (default: ramp)")
    parser.add_argument("--step", type=float, default=DEFAULT_STEP,
                        help="FLOPs saved per greedy step, fraction of the unreduced (default: %(default)s)")
    parser.add_argument("--move", type=int, default=DEFAULT_MOVE, help="tokens per refinement move (default: %(default)s)")
    parser.add_argument("--sweeps", type=int, default=DEFAULT_SWEEPS, help="refinement sweeps (default: %(default)s)")
    parser.add_argument("--flip", action="store_true", help="compare on the flipped images too")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("-o", "--output", type=pathlib.Path, required=True, help="JSON file to write")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns the exit status (0, or 2 on bad arguments or missing data)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.threads is not None:
            if args.threads < 1:
                raise ValueError(f"--threads must be >= 1, got {args.threads}")
            torch.set_num_threads(args.threads)
        data_dir = default_data_dir() if args.data is None else args.data
        model = load_model(args.model, args.weights, data_dir=data_dir, device=args.device, dtype=DTYPES[args.dtype])
        start = time.perf_counter()
        setting = calibrate(model, args.images, flops=args.flops, images_per_s=args.images_per_s,
                            method=args.method, options=parse_options(args.option, "--option"),
                            search_options=not args.no_option_search, start=args.start, step=args.step, move=args.move,
                            sweeps=args.sweeps, limit=args.limit, split=args.split, batch_size=args.batch_size,
                            flip=args.flip, progress=not args.no_progress)
    except (FileNotFoundError, ValueError, TypeError) as err:
        parser.error(str(err))
    meta = setting.meta
    meta.update(model=args.model, images_folder=str(args.images), split=args.split,
                device=device_label(args.device, cpu_model=False), seconds=round(time.perf_counter() - start, 1))
    save_setting(setting, args.output)
    print(f"{args.model}: {setting.text}")
    print(f"  {meta['gflops']:.3f} GFLOPs ({100 * (1 - meta['flops_fraction']):.1f}% fewer), KL {meta['kl']:.4f}, "
          f"agreement {meta['agreement']:.1f}% on {meta['images']} calibration images")
    if "uniform" in meta:
        u = meta["uniform"]
        print(f"  uniform {u['text']}: {u['gflops']:.3f} GFLOPs, KL {u['kl']:.4f}, agreement {u['agreement']:.1f}%")
    print(f"  written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
