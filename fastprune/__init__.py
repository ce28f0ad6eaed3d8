"""fastprune: fused kernels for token reduction in Vision Transformers.

Front door: :func:`merge` / :func:`merge_tokens` (MSTM merging), :func:`cls_attention` (the class
token's attention row without the N x N map), and :mod:`fastprune.patch` (timm drop-in).
"""
from .functional import merge, merge_tokens
from .reference import Merged

__all__ = ["merge", "merge_tokens", "Merged"]
__version__ = "0.1.0"
