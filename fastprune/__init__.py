"""fastprune: fused kernels for token reduction in Vision Transformers.

Front door: :func:`merge` / :func:`merge_tokens` (MSTM merging), :func:`cls_attention` (the class
token's attention row without the N x N map), and :mod:`fastprune.patch` (timm drop-in).
"""
from .attention import cls_attention, proportional_attention
from .functional import merge, merge_tokens
from .reference import Merged
from . import tome  # noqa: E402,F401  (ToMe; registers method="tome" with fastprune.patch)
from . import idle  # noqa: E402,F401  (IdleViT; registers method="idle" with fastprune.patch)
from . import evit, bat  # noqa: E402,F401  (EViT, BAT; register method="evit" and "bat" with fastprune.patch)

__all__ = ["merge", "merge_tokens", "Merged", "cls_attention", "proportional_attention", "patch"]


def __getattr__(name):
    # ``fastprune.patch`` (the timm drop-in) imports timm: loaded on first use, not with the package.
    if name == "patch":
        import importlib

        return importlib.import_module(".patch", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
__version__ = "0.1.0"
