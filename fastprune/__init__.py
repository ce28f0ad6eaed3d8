"""fastprune: fused kernels for token reduction in Vision Transformers.

Front door: :func:`merge` / :func:`merge_tokens` (MSTM merging), :func:`unmerge` (the full token
grid back from a position map), :func:`cls_attention` (the class token's attention row without the
N x N map), and :mod:`fastprune.patch` (timm drop-in).

The method modules :mod:`fastprune.tome` (ToMe), :mod:`fastprune.evit` (EViT), :mod:`fastprune.bat`
(BAT) and :mod:`fastprune.idle` (IdleViT), and :mod:`fastprune.patch`, are loaded on first use
(``fastprune.tome`` or ``import fastprune.tome``), not with the package: ``import fastprune`` does not
import timm. :mod:`fastprune.patch` registers every built-in method when it is first imported.
"""
import importlib as _importlib

from .attention import cls_attention, proportional_attention
from .functional import merge, merge_tokens, unmerge
from .reference import Merged

__all__ = ["merge", "merge_tokens", "unmerge", "Merged", "cls_attention", "proportional_attention", "patch"]

#: Submodules loaded on first attribute access (``fastprune.patch`` imports timm).
_LAZY_SUBMODULES = frozenset({"patch", "tome", "evit", "bat", "idle"})


def __getattr__(name):
    if name in _LAZY_SUBMODULES:
        return _importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | _LAZY_SUBMODULES)


__version__ = "0.1.0"
