"""Evaluation settings: the ``METHOD:R[:KEY=VALUE...]`` mini-language, patching, FLOP counting.

* ``none``: the unreduced model.
* ``METHOD:R[:KEY=VALUE...]``, e.g. ``merge:13``, ``merge:0.9``, ``merge:13:metric=x:prop_attn=off``.
  ``R`` is an int, a keep rate in (0, 1], or a per-block list where ``V*K`` repeats ``V`` K times and
  ``A..B`` is the ramp ``A, A+-1, ..., B`` (``merge:0*2,21..12``). Option values ``true/on/yes`` and
  ``false/off/no`` become bools, numbers int/float, anything else stays a string.

GFLOPs are counted with ``FlopCounterMode`` on a float32 CPU copy of the model (2 x multiply-adds of
convolutions and matrix products, attention included), the token reduction through its PyTorch
reference.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Union

import torch

from .. import flops, patch
from ..schedules import RSpec

__all__ = ["Setting", "parse_setting", "format_value", "apply_setting", "revert_setting", "count_gflops",
           "setting_gflops", "RECOMMENDED_SETTING", "DEFAULT_SETTINGS"]

#: Recommended off-the-shelf MSTM merge (chosen on the 500 sample images, see the README): no
#: merging in blocks 0-1, then 21, 20, ..., 12 tokens per block; matching on the tokens ``x``, merge
#: weights size x class attention, proportional attention on.
RECOMMENDED_SETTING = "merge:0*2,21..12:metric=x:weight=size_attn"
#: Default ``--settings``: the baseline and the recommended merge.
DEFAULT_SETTINGS = ("none", RECOMMENDED_SETTING)
#: ATen ops whose FLOPs are the attention's ``q k^T`` and ``attn v`` products.
_ATTENTION_OPS = ("bmm", "baddbmm", "matmul", "_scaled_dot_product")


@dataclass
class Setting:
    """One evaluated configuration: ``method`` ("none" or a patch method), ``r`` (int, keep rate or
    per-block list; None for "none") and the patch ``options``."""

    method: str = "none"
    r: Optional[RSpec] = None
    options: Dict[str, Any] = field(default_factory=dict)
    text: str = "none"

    @property
    def reduces(self) -> bool:
        return self.method != "none"

    def r_label(self) -> str:
        """The r / keep rate column: ``13``, ``ρ=0.9``, or a compact list ``0*2,21..12``."""
        if self.r is None:
            return "-"
        if isinstance(self.r, float):
            return f"ρ={self.r:g}"
        if isinstance(self.r, list):
            return _run_length(self.r)
        return str(self.r)

    def method_label(self) -> str:
        if not self.options:
            return self.method
        return self.method + " (" + ", ".join(f"{k}={format_value(v)}" for k, v in self.options.items()) + ")"


def _run_length(values: Sequence[int]) -> str:
    """Compact per-block list: repeats as ``v*k``, ramps of 3+ steps of one as ``a..b``."""
    parts, i = [], 0
    while i < len(values):
        j = i
        while j < len(values) and values[j] == values[i]:
            j += 1
        if j - i > 1:
            parts.append(f"{values[i]}*{j - i}")
            i = j
            continue
        for step in (1, -1):
            j = i
            while j + 1 < len(values) and values[j + 1] - values[j] == step:
                j += 1
            if j - i >= 2:
                break
        if j - i >= 2:
            parts.append(f"{values[i]}..{values[j]}")
            i = j + 1
        else:
            parts.append(str(values[i]))
            i += 1
    return ",".join(parts)


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def _parse_value(text: str) -> Any:
    low = text.lower()
    if low in ("true", "on", "yes"):
        return True
    if low in ("false", "off", "no"):
        return False
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text


def _parse_r(text: str, setting: str) -> RSpec:
    try:
        if "," in text or "*" in text or ".." in text:
            values: List[int] = []
            for part in text.split(","):
                if ".." in part:  # a ramp a..b, both ends included
                    first, _, last = part.partition("..")
                    a, b = int(first), int(last)
                    values.extend(range(a, b + 1) if a <= b else range(a, b - 1, -1))
                    continue
                value, _, count = part.partition("*")
                values.extend([int(value)] * (int(count) if count else 1))
            if any(v < 0 for v in values):
                raise ValueError
            return values
        if any(c in text for c in ".eE"):
            rate = float(text)
            if not 0.0 < rate <= 1.0:
                raise ValueError
            return rate
        return int(text)
    except ValueError:
        raise ValueError(f"setting {setting!r}: r must be an int, a keep rate in (0, 1] or a per-block list "
                         f"of ints >= 0 like 0*3,16*9 or 0*2,21..12, got {text!r}") from None


def parse_setting(text: str) -> Setting:
    """Parse one ``--settings`` word: ``none`` or ``METHOD:R[:KEY=VALUE...]`` (see the module docstring).

    Raises:
        ValueError: malformed word (missing r, bad r, option without ``=``).
    """
    if not isinstance(text, str):
        raise TypeError(f"setting must be a str, got {type(text).__name__}")
    parts = text.strip().split(":")
    method = parts[0].strip().lower()
    if method == "none":
        if len(parts) > 1:
            raise ValueError(f"setting {text!r}: 'none' takes no r or options")
        return Setting(text="none")
    if not method or len(parts) < 2 or not parts[1]:
        raise ValueError(f"setting {text!r} must be 'none' or 'METHOD:R[:KEY=VALUE...]', e.g. 'merge:13'")
    r = _parse_r(parts[1].strip(), text)
    options = {}
    for part in parts[2:]:
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise ValueError(f"setting {text!r}: option {part!r} must be KEY=VALUE")
        options[key.strip()] = _parse_value(value.strip())
    return Setting(method, r, options, text)


def _sdpa_or_matmul_flops(counts: Dict[Any, int]) -> int:
    return sum(v for op, v in counts.items() if any(name in str(op) for name in _ATTENTION_OPS))


def count_gflops(model: torch.nn.Module, image: torch.Tensor) -> float:
    """GFLOPs of one forward pass of ``model`` on one image, counted with ``FlopCounterMode``.

    FLOPs are ``2 x`` multiply-adds of convolutions and matrix products (torch's counter). Attention
    counts the same whether it runs through ``F.scaled_dot_product_attention`` (every SDPA kernel is
    counted by :func:`fastprune.flops.sdpa_flops`, whatever torch's own counter knows) or through the
    explicit ``q @ k^T``/``attn @ v`` path. Work inside compiled custom operators (fastprune's C++ /
    Triton kernels) is NOT counted by torch's counter: use :func:`setting_gflops`, which counts the
    token reduction through its PyTorch reference.

    Args:
        model: any module taking ``[1, 3, H, W]``.
        image: ``[3, H, W]`` or ``[1, 3, H, W]``, on the model's device and dtype.

    Returns:
        GFLOPs (1e9 FLOPs) per image.

    Raises:
        ValueError: ``image`` of the wrong shape.
        RuntimeError: the model has attention blocks but no attention FLOPs were recorded (an SDPA
            kernel the counter does not know; count with the explicit path then).
    """
    if image.dim() == 3:
        image = image[None]
    if image.dim() != 4 or image.shape[0] != 1:
        raise ValueError(f"image must have shape [3, H, W] or [1, 3, H, W], got {tuple(image.shape)}")
    counter = flops.counter()
    with torch.no_grad(), counter:
        model(image)
    has_attention = any(hasattr(m, "qkv") for m in model.modules())
    if has_attention and _sdpa_or_matmul_flops(counter.get_flop_counts().get("Global", {})) == 0:
        raise RuntimeError("no attention FLOPs were counted: this torch's FlopCounterMode does not know the "
                           "attention kernel that ran; disable fused attention to count the explicit path")
    return counter.get_total_flops() / 1e9


def setting_gflops(model: torch.nn.Module, setting: Union[Setting, str], image: torch.Tensor) -> float:
    """GFLOPs per image of ``model`` under ``setting``, the same on every device and backend.

    Counted by :func:`count_gflops` on a float32 CPU copy of the model (so the table's GFLOPs do not
    depend on where the timing ran: on CUDA, for instance, proportional attention pads the head dim),
    with the token reduction run by its PyTorch reference (``backend="reference"`` when the method
    takes that option) so that its matrix products are visible to torch's counter. The reference
    computes the full ``[N, N]`` cosine-similarity matrix where the fused kernels only compare the
    tokens that are merged away with the kept ones, so the reduction's cost is an upper bound and
    the FLOP savings are, if anything, understated.

    Args:
        model: the (unpatched) timm model; not modified.
        setting: a :class:`Setting` or its text form.
        image: one preprocessed image ``[3, H, W]`` or ``[1, 3, H, W]`` (any device and dtype).

    Returns:
        GFLOPs (1e9 FLOPs) per image.
    """
    if isinstance(setting, str):
        setting = parse_setting(setting)
    counted = copy.deepcopy(model).to(device="cpu", dtype=torch.float32)
    image = image.to(device="cpu", dtype=torch.float32)
    if setting.reduces and "backend" in patch.registry.get_method(setting.method).defaults:
        setting = Setting(setting.method, setting.r, {**setting.options, "backend": "reference"}, setting.text)
    apply_setting(counted, setting)
    return count_gflops(counted, image)


def apply_setting(model: torch.nn.Module, setting: Setting) -> None:
    """Patch ``model`` with ``setting`` (nothing for ``"none"``)."""
    if setting.reduces:
        patch.timm(model, method=setting.method, r=setting.r, **setting.options)


def revert_setting(model: torch.nn.Module, setting: Setting) -> None:
    """Undo :func:`apply_setting`."""
    if setting.reduces:
        patch.revert(model)
