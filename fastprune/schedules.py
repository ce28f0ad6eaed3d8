"""Schedules: how many tokens each block keeps, removes or idles, for every method.

One keep-count rule serves all keep rates: :func:`keep_count`, ``ceil(rho n)`` clipped to
``[1, n]``, with a tolerance so that ``0.7 * 10`` keeps 7 tokens, not 8. IdleViT's stage schedule
(``floor(N0 rho^stage)``, its paper's rule) is the one other count and lives here too.

Forms of ``r`` (:func:`check_r`): an int (every block removes ``r``), a list of ``depth`` ints
(block ``l`` removes ``r[l]``), or a float keep rate ``rho`` in ``(0, 1]``.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Union

import torch

from . import _checks

RSpec = Union[int, float, Sequence[int]]

#: ``ceil``/``floor`` tolerance: ``0.7 * 10`` is ``7.000000000000001`` in floating point.
COUNT_TOL = 1e-6

#: EViT's and BAT's reduction blocks (0-based) and keep rate for 12-block ViTs.
DEFAULT_LAYERS = (3, 6, 9)
DEFAULT_KEEP_RATE = 0.7
#: Blocks (0-based) where MSTM's ``schedule="paper"`` merges -- a choice: its paper does not state
#: them; these are EViT's and BAT's, the methods it compares against.
MSTM_PAPER_LAYERS = DEFAULT_LAYERS
#: Keep rate of MSTM's ``schedule="paper"`` when ``r`` is left at 0.
MSTM_PAPER_KEEP_RATE = DEFAULT_KEEP_RATE
#: Names accepted by :func:`tome_schedule`.
TOME_SCHEDULES = ("constant", "decreasing")
#: The recommended MSTM schedule for 12 blocks and 196 patches: no merging in blocks 0-1, then
#: 23, 21, 20, ..., 13 tokens per block (40.3% fewer FLOPs at ViT-Ti/16). Chosen on the tune half of
#: the sample images only: the lowest mean KL over ViT-Ti and DeiT-Ti among the candidate ramps that
#: save at least 40% of the FLOPs (README, "The main job").
RECOMMENDED_R = (0, 0, 23) + tuple(range(21, 12, -1))


def recommended_r(depth: int, num_patches: int) -> list[int]:
    """:data:`RECOMMENDED_R` for a model of ``depth`` blocks and ``num_patches`` patches.

    Block ``l`` takes the value at relative depth ``l / (depth - 1)`` of the 12-block table (linear
    interpolation); the values are then scaled so that they add up to the table's total times
    ``num_patches / 196`` (the same fraction of the tokens is merged in all) and rounded;
    ``depth=12, num_patches=196`` gives the table.

    Raises:
        ValueError: ``depth`` or ``num_patches`` < 1.
    """
    depth = _checks.check_int(depth, "depth", 1, 1 << 20)
    num_patches = _checks.check_int(num_patches, "num_patches", 1, 1 << 30)
    table, last = RECOMMENDED_R, len(RECOMMENDED_R) - 1
    raw = []
    for block in range(depth):
        t = block * last / (depth - 1) if depth > 1 else 0.0
        lo = min(int(t), last - 1)
        raw.append(table[lo] + (t - lo) * (table[lo + 1] - table[lo]))
    total = sum(raw)
    scale = sum(table) * (num_patches / 196) / total if total > 0 else 0.0
    return [math.floor(value * scale + 0.5 + COUNT_TOL) for value in raw]


def check_keep_rate(keep_rate, name: str = "keep_rate") -> float:
    """``keep_rate`` must be a real number (not bool) with ``0 < keep_rate <= 1``; returns a float."""
    if isinstance(keep_rate, torch.Tensor) and keep_rate.dim() == 0 and keep_rate.is_floating_point():
        keep_rate = float(keep_rate)
    if isinstance(keep_rate, bool) or not isinstance(keep_rate, numbers.Real):
        raise TypeError(f"{name} must be a float in (0, 1], got {type(keep_rate).__name__} ({keep_rate!r})")
    keep_rate = float(keep_rate)
    if not 0.0 < keep_rate <= 1.0:  # also rejects NaN
        raise ValueError(f"{name} must satisfy 0 < {name} <= 1, got {keep_rate}")
    return keep_rate


def keep_count(n: int, keep_rate: float) -> int:
    """``ceil(keep_rate * n)`` clipped to ``[1, n]``: the tokens a keep rate keeps out of ``n``."""
    return max(1, min(n, math.ceil(keep_rate * n - COUNT_TOL)))


def kept_count(num_tokens: int, num_prefix_tokens: int, keep_rate: float) -> int:
    """``K = keep_count(N - p, keep_rate)``, the attentive tokens EViT and BAT keep."""
    return keep_count(num_tokens - num_prefix_tokens, keep_rate)


def check_r(r, depth: int) -> RSpec:
    """Validate an ``r`` schedule: int >= 0, float keep rate in (0, 1], or a list of ``depth`` ints >= 0.

    Returns an int, a float or a tuple of ints.
    """
    if isinstance(r, bool):
        raise TypeError("r must be an int, a float keep rate in (0, 1] or a list of ints, got a bool")
    if isinstance(r, numbers.Integral):
        if r < 0:
            raise ValueError(f"r must be >= 0, got {r}")
        return int(r)
    if isinstance(r, numbers.Real):
        if not (0.0 < r <= 1.0) or math.isnan(r):
            raise ValueError(f"a float r is a keep rate and must satisfy 0 < r <= 1, got {r} "
                             "(pass an int to remove that many tokens per block)")
        return float(r)
    if isinstance(r, torch.Tensor):
        raise TypeError("r must be an int, a float or a list of ints, not a tensor")
    if isinstance(r, Sequence) and not isinstance(r, str):
        if len(r) != depth:
            raise ValueError(f"a per-block r list must have one entry per block (depth={depth}), got {len(r)}")
        out = []
        for i, ri in enumerate(r):
            if isinstance(ri, bool) or not isinstance(ri, numbers.Integral):
                raise TypeError(f"r[{i}] must be an int, got {type(ri).__name__} ({ri!r})")
            if ri < 0:
                raise ValueError(f"r[{i}] must be >= 0, got {ri}")
            out.append(int(ri))
        return tuple(out)
    raise TypeError(f"r must be an int, a float keep rate in (0, 1] or a list of ints, got {type(r).__name__}")


def generic_r(r: RSpec, block_index: int, num_tokens: int, num_prefix_tokens: int) -> int:
    """The tokens block ``block_index`` removes under a validated ``r``: ``r``, ``r[l]``, or
    ``n - keep_count(n, rho)`` with ``n = N_l - p`` for a keep rate (not clipped)."""
    if isinstance(r, float):
        n = num_tokens - num_prefix_tokens
        return n - keep_count(n, r)
    if isinstance(r, tuple):
        return r[block_index]
    return int(r)


# ---- EViT / BAT (and MSTM's paper schedule): a keep rate at a few blocks -------------------------

def parse_layers(layers, depth: Optional[int] = None) -> tuple:
    """The ``layers`` option: block indices (0-based) that reduce, as a sorted tuple of distinct ints.

    Accepts an iterable of ints or a comma-separated string (``"3,6,9"``). With ``depth``, every
    index must be ``< depth``.

    Raises:
        TypeError: not ints. ValueError: negative, repeated or ``>= depth`` indices.
    """
    if isinstance(layers, str):
        try:
            layers = [int(part) for part in layers.split(",") if part.strip()]
        except ValueError:
            raise ValueError(f"layers must be block indices like '3,6,9', got {layers!r}") from None
    if isinstance(layers, bool) or isinstance(layers, numbers.Integral):
        layers = [layers]
    try:
        layers = list(layers)
    except TypeError:
        raise TypeError(f"layers must be a sequence of block indices, got {type(layers).__name__}") from None
    for value in layers:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"layers must hold ints (0-based block indices), got {value!r}")
        if value < 0 or (depth is not None and value >= depth):
            raise ValueError(f"layers must be block indices in [0, {depth}), got {value}" if depth is not None
                             else f"layers must be >= 0, got {value}")
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers must not repeat a block, got {layers}")
    return tuple(sorted(int(v) for v in layers))


def layer_keep_rate(r, method: str) -> Optional[float]:
    """A layer-schedule method's ``r`` (EViT, BAT): a float keep rate, or None for ``r == 0``.

    Raises:
        TypeError: an int other than 0, or a per-block list.
    """
    if isinstance(r, float):
        return check_keep_rate(r, "r")
    if isinstance(r, numbers.Integral) and not isinstance(r, bool) and r == 0:
        return None
    raise TypeError(f"method {method!r} takes r = a float keep rate in (0, 1] applied at its reduction "
                    f"layers (e.g. r={DEFAULT_KEEP_RATE}), or 0 for no reduction; got {r!r}")


# ---- ToMe ------------------------------------------------------------------------------------------

def check_count(r, name: str = "r") -> int:
    """``r`` must be an int (any ``numbers.Integral``, not bool) ``>= 0``."""
    r = _checks.check_int(r, name, -2 ** 62, 2 ** 62)
    if r < 0:
        raise ValueError(f"{name} must be >= 0 (tokens merged in a block; clipped to (N - p) // 2), got {r}")
    return r


def tome_schedule(r: Union[int, Sequence[int]], num_layers: int, schedule: str = "constant") -> list[int]:
    """Tokens ToMe merges in every block: constant, per-layer, or a linearly decreasing ramp.

    * ``r`` an int, ``schedule="constant"``: ``r`` in every block.
    * ``r`` a list of ``num_layers`` ints: used as given (``schedule`` must be ``"constant"``).
    * ``r`` an int, ``schedule="decreasing"``: ``v_l = 2r (L - 1 - l) / (L - 1)``, rounded by
      largest remainder (ties: the earlier block), so the total is ``L r`` as for the constant
      schedule; ``[r]`` for ``L = 1``.

    Raises:
        TypeError: ``r`` neither an int nor a sequence of ints; ``num_layers`` not an int.
        ValueError: negative values, a list of the wrong length, unknown ``schedule``, or
            ``"decreasing"`` with a list.
    """
    L = _checks.check_int(num_layers, "num_layers", 1, 2 ** 31)
    if schedule not in TOME_SCHEDULES:
        raise ValueError(f"schedule must be one of {TOME_SCHEDULES}, got {schedule!r}")
    if isinstance(r, (list, tuple)):
        if schedule != "constant":
            raise ValueError(f"schedule={schedule!r} needs an int r, got a per-layer list")
        if len(r) != L:
            raise ValueError(f"r as a per-layer list must have num_layers={L} entries, got {len(r)}")
        return [check_count(v, f"r[{i}]") for i, v in enumerate(r)]
    if isinstance(r, torch.Tensor) and r.dim() == 1:
        return tome_schedule([int(v) for v in r.tolist()], L, schedule)
    r = check_count(r)
    if schedule == "constant" or L == 1:
        return [r] * L

    numerators = [2 * r * (L - 1 - l) for l in range(L)]  # v_l = numerators[l] / (L - 1)
    counts = [n // (L - 1) for n in numerators]
    missing = r * L - sum(counts)
    by_remainder = sorted(range(L), key=lambda l: (-(numerators[l] % (L - 1)), l))
    for l in by_remainder[:missing]:
        counts[l] += 1
    return counts


# ---- IdleViT -----------------------------------------------------------------------------------------

def idle_stage(layer: int, depth: int) -> int:
    """The stage of block ``layer`` in IdleViT's schedule: 0 (full block) or 1, 2, 3 (``rho^stage``).

    ``depth = 12``: blocks 0-2 stage 0, 3-5 stage 1, 6-8 stage 2, 9-11 stage 3 (the official code's
    evaluation schedule). Other depths (a choice): first idle block ``depth // 4``, then three equal
    stages.
    """
    first = depth // 4
    if layer < first:
        return 0
    return 1 + (3 * (layer - first)) // (depth - first)


def idle_keep_count(num_patches: int, keep_rate: float, stage: int) -> int:
    """``K = floor(N0 * rho^stage)`` clipped to ``[1, N0]`` (IdleViT's rule; ``stage = 0``: all ``N0``)."""
    if stage == 0:
        return num_patches
    return max(1, min(num_patches, math.floor(num_patches * keep_rate ** stage + COUNT_TOL)))


def idle_schedule(r: RSpec, depth: int, num_patches: int) -> list[int]:
    """Selected patch tokens per block, ``[K_0, ..., K_{depth-1}]`` (``K_l = num_patches``: full block).

    ``r`` a float ``rho``: ``K_l = idle_keep_count(N0, rho, idle_stage(l))``; an int: every block
    idles ``r`` tokens; a list: block ``l`` idles ``r[l]``. ``K >= 1`` always.

    Raises:
        TypeError/ValueError: ``r`` of the wrong type or out of range, a list of the wrong length,
            ``depth`` or ``num_patches`` not positive ints.
    """
    depth = _checks.check_int(depth, "depth", 1, 1 << 16)
    num_patches = _checks.check_int(num_patches, "num_patches", 1, 1 << 30)
    r = check_r(r, depth)
    if isinstance(r, float):
        return [idle_keep_count(num_patches, r, idle_stage(layer, depth)) for layer in range(depth)]
    if isinstance(r, int):
        return [max(1, num_patches - r)] * depth
    return [max(1, num_patches - ri) for ri in r]
