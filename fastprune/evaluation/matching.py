"""Methods matched to ToMe's FLOPs: one-parameter families of settings, searched by bisection.

ToMe with a constant ``r`` (the *anchor*) sets a FLOPs level; every other method's family
(:func:`default_families`) is searched for the member whose counted GFLOPs
(:func:`~fastprune.evaluation.settings.setting_gflops`) are closest to the anchor's
(:func:`match_family`). FLOPs are monotone in every family parameter, which makes bisection valid.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from .settings import Setting, parse_setting, setting_gflops

__all__ = ["Family", "Match", "DEFAULT_ANCHORS", "DEFAULT_TOLERANCE", "FAMILY_NAMES", "KEEP_RATE_STEP",
           "MERGE_SKIP_BLOCKS", "MATCH_SIDES", "merge_ramp", "default_families", "anchor_setting",
           "match_parameter", "match_family", "match_all", "check_anchors", "check_tolerance"]

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

    def setting(self, param) -> Setting:
        """The :class:`fastprune.evaluate.Setting` of one member."""
        return parse_setting(self.make(param))


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
        gflops_of = lambda text: setting_gflops(model, text, image)
    i, reachable, seen = match_parameter(family.params, lambda p: gflops_of(family.make(p)), target,
                                         increasing=family.flops_increase, side=side)
    param = family.params[i]
    return Match(family, anchor, float(target), param, family.make(param), seen[param], dict(seen), reachable)


def check_anchors(anchors) -> List[int]:
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


def check_tolerance(tolerance) -> float:
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
    anchors = check_anchors(anchors)
    families = _select_families(families, methods, model)
    cache: Dict[str, float] = {}

    def gflops_of(text: str) -> float:
        if text not in cache:
            cache[text] = setting_gflops(model, text, image)
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
