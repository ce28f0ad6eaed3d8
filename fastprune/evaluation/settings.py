"""Evaluation settings: the ``METHOD:R[:KEY=VALUE...]`` mini-language, patching, FLOP counting.

* ``none``: the unreduced model.
* ``METHOD:R[:KEY=VALUE...]``, e.g. ``merge:13``, ``merge:0.9``, ``merge:13:metric=x:prop_attn=off``.
  ``R`` is an int, a keep rate in (0, 1], or a per-block list where ``V*K`` repeats ``V`` K times and
  ``A..B`` is the ramp ``A, A+-1, ..., B`` (``merge:0*2,21..12``). Option values ``true/on/yes`` and
  ``false/off/no`` become bools, numbers int/float, anything else stays a string.
* ``file:PATH``: a setting saved as JSON by :func:`save_setting` (e.g. by ``python -m
  fastprune.calibrate``), read back by :func:`load_setting`.

GFLOPs are counted with ``FlopCounterMode`` on a float32 CPU copy of the model (2 x multiply-adds of
convolutions and matrix products, attention included), the token reduction through its PyTorch
reference.
"""
from __future__ import annotations

import copy
import json
import os
import pathlib
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Union

import torch

from .. import flops, patch
from ..schedules import RSpec

__all__ = ["Setting", "parse_setting", "parse_options", "format_setting", "format_value", "apply_setting", "revert_setting",
           "count_gflops", "setting_gflops", "save_setting", "load_setting", "RECOMMENDED_SETTING",
           "DEFAULT_SETTINGS", "SETTING_FORMAT", "FILE_PREFIX"]

#: Recommended off-the-shelf MSTM merge (chosen on the 500 sample images, see the README): no
#: merging in blocks 0-1, then 21, 20, ..., 12 tokens per block; matching on the tokens ``x``, merge
#: weights size x class attention, proportional attention on.
RECOMMENDED_SETTING = "merge:0*2,23,21..13:metric=x:weight=size_attn"
#: Default ``--settings``: the baseline and the recommended merge.
DEFAULT_SETTINGS = ("none", RECOMMENDED_SETTING)
#: ATen ops whose FLOPs are the attention's ``q k^T`` and ``attn v`` products.
_ATTENTION_OPS = ("bmm", "baddbmm", "matmul", "_scaled_dot_product")
#: ``format`` field of a setting saved as JSON, and the setting word that reads one.
SETTING_FORMAT = "fastprune.setting/1"
FILE_PREFIX = "file:"


@dataclass
class Setting:
    """One evaluated configuration: ``method`` ("none" or a patch method), ``r`` (int, keep rate or
    per-block list; None for "none"), the patch ``options`` and ``meta`` (how it was made, e.g. the
    calibration's figures; saved with it, not used to patch).

    A reducing setting unpacks into :func:`fastprune.patch.timm`'s keywords:
    ``fastprune.patch.timm(model, **setting)`` is ``timm(model, method=..., r=..., **options)``.
    """

    method: str = "none"
    r: Optional[RSpec] = None
    options: Dict[str, Any] = field(default_factory=dict)
    text: str = "none"
    meta: Dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def reduces(self) -> bool:
        return self.method != "none"

    def patch_kwargs(self) -> Dict[str, Any]:
        """``{"method": ..., "r": ..., **options}`` for :func:`fastprune.patch.timm`.

        Raises:
            ValueError: the setting is "none" (nothing to patch).
        """
        if not self.reduces:
            raise ValueError("setting 'none' has nothing to patch")
        return {"method": self.method, "r": self.r, **self.options}

    def keys(self):
        return self.patch_kwargs().keys()

    def __getitem__(self, key: str) -> Any:
        return self.patch_kwargs()[key]

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-ready dict: ``format``, ``method``, ``r``, ``options``, ``meta``."""
        r = list(self.r) if isinstance(self.r, (list, tuple)) else self.r
        return {"format": SETTING_FORMAT, "method": self.method, "r": r, "options": dict(self.options),
                "meta": dict(self.meta)}

    @classmethod
    def from_dict(cls, data: Dict[str, Any], where: str = "setting") -> "Setting":
        """The inverse of :meth:`to_dict`; ``where`` names the source in errors.

        Raises:
            ValueError: not a fastprune setting, or a bad ``method``/``r``/``options``.
        """
        if not isinstance(data, dict) or data.get("format") != SETTING_FORMAT:
            raise ValueError(f"{where}: not a fastprune setting (expected a JSON object with "
                             f"\"format\": \"{SETTING_FORMAT}\")")
        method, r, options = data.get("method"), data.get("r"), data.get("options", {})
        if not isinstance(method, str) or not method:
            raise ValueError(f"{where}: method must be a non-empty str, got {method!r}")
        if not isinstance(options, dict):
            raise ValueError(f"{where}: options must be an object, got {options!r}")
        if method == "none":
            return cls(meta=dict(data.get("meta", {})))
        if isinstance(r, list):
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in r):
                raise ValueError(f"{where}: a per-block r must be a list of ints >= 0, got {r!r}")
        elif isinstance(r, bool) or not isinstance(r, (int, float)):
            raise ValueError(f"{where}: r must be an int, a keep rate or a per-block list, got {r!r}")
        options = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
        return cls(method, r, options, format_setting(method, r, options), dict(data.get("meta", {})))

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


def format_setting(method: str, r: Optional[RSpec], options: Dict[str, Any]) -> str:
    """The setting word ``METHOD:R[:KEY=VALUE...]`` of these fields (a per-block ``r`` run-length
    coded); :func:`parse_setting` reads it back for options that are bools, numbers or plain strings."""
    if method == "none":
        return "none"
    r_text = _run_length(list(r)) if isinstance(r, (list, tuple)) else repr(r) if isinstance(r, float) else str(r)
    return ":".join([method, r_text] + [f"{k}={format_value(v)}" for k, v in options.items()])


def save_setting(setting: "Setting", path: Union[str, os.PathLike]) -> pathlib.Path:
    """Write ``setting`` (with its ``meta``) as JSON to ``path``; returns the path."""
    path = pathlib.Path(path)
    text = json.dumps(setting.to_dict(), indent=2)
    text = re.sub(r"\[\s*(-?\d+(?:,\s*-?\d+)*)\s*\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)
    path.write_text(text + "\n")  # lists of ints on one line
    return path


def load_setting(path: Union[str, os.PathLike]) -> "Setting":
    """Read a setting written by :func:`save_setting`.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not JSON, or not a fastprune setting.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"setting file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"setting file {path}: not JSON ({err})") from None
    return Setting.from_dict(data, where=f"setting file {path}")


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
    """Parse one ``--settings`` word: ``none``, ``METHOD:R[:KEY=VALUE...]`` or ``file:PATH`` (see the
    module docstring).

    Raises:
        ValueError: malformed word (missing r, bad r, option without ``=``), or a bad setting file.
        FileNotFoundError: ``file:PATH`` names no file.
    """
    if not isinstance(text, str):
        raise TypeError(f"setting must be a str, got {type(text).__name__}")
    if text.strip().startswith(FILE_PREFIX):
        return load_setting(text.strip()[len(FILE_PREFIX):])
    parts = text.strip().split(":")
    method = parts[0].strip().lower()
    if method == "none":
        if len(parts) > 1:
            raise ValueError(f"setting {text!r}: 'none' takes no r or options")
        return Setting(text="none")
    if not method or len(parts) < 2 or not parts[1]:
        raise ValueError(f"setting {text!r} must be 'none' or 'METHOD:R[:KEY=VALUE...]', e.g. 'merge:13'")
    r = _parse_r(parts[1].strip(), text)
    return Setting(method, r, parse_options(parts[2:], f"setting {text!r}"), text)


def parse_options(parts: Sequence[str], where: str = "options") -> Dict[str, Any]:
    """``["KEY=VALUE", ...]`` as a dict, values converted as in a setting word; ``where`` names the
    source in errors.

    Raises:
        ValueError: an item without ``=`` or without a key.
    """
    options = {}
    for part in parts:
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{where}: option {part!r} must be KEY=VALUE")
        options[key.strip()] = _parse_value(value.strip())
    return options


def _sdpa_or_matmul_flops(counts: Dict[Any, int]) -> int:
    return sum(v for op, v in counts.items() if any(name in str(op) for name in _ATTENTION_OPS))


def count_gflops(model: torch.nn.Module, image: torch.Tensor, *, by_module: bool = False
                 ) -> Union[float, Dict[str, float]]:
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

        by_module: return ``{module path: FLOPs}`` (ints, not GFLOPs) instead: ``""`` the whole model,
            ``"blocks.3"``, ``"blocks.3.mlp"``...: every module whose forward ran, submodules included.

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
    if not by_module:
        return counter.get_total_flops() / 1e9
    out = {}
    for name, counts in counter.get_flop_counts().items():
        path = "" if name == "Global" else name.partition(".")[2]
        if name == "Global" or path:
            out[path] = int(sum(counts.values()))
    return out


def setting_gflops(model: torch.nn.Module, setting: Union[Setting, str], image: torch.Tensor, *,
                   by_module: bool = False) -> Union[float, Dict[str, float]]:
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
        by_module: FLOPs per module instead, as :func:`count_gflops` gives them.

    Returns:
        GFLOPs (1e9 FLOPs) per image.
    """
    if isinstance(setting, str):
        setting = parse_setting(setting)
    counted = copy.deepcopy(model).to(device="cpu", dtype=torch.float32)
    image = image.to(device="cpu", dtype=torch.float32)
    if setting.reduces and "backend" in patch.registry.get_method(setting.method).defaults:
        setting = Setting(setting.method, setting.r, {**setting.options, "backend": "reference"}, setting.text,
                          setting.meta)
    apply_setting(counted, setting)
    return count_gflops(counted, image, by_module=by_module)


def apply_setting(model: torch.nn.Module, setting: Setting) -> None:
    """Patch ``model`` with ``setting`` (nothing for ``"none"``)."""
    if setting.reduces:
        patch.timm(model, **setting)


def revert_setting(model: torch.nn.Module, setting: Setting) -> None:
    """Undo :func:`apply_setting`."""
    if setting.reduces:
        patch.revert(model)
