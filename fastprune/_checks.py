"""Argument validation shared by every public entry point.

Each check raises ``TypeError`` (wrong type or dtype) or ``ValueError`` (wrong shape, range or
device) with a message that names the argument and says what was expected, so that bad input never
reaches a kernel.
"""
from __future__ import annotations

import numbers
from typing import Optional

import torch

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tokens(x, name: str = "x") -> None:
    """``x`` must be a ``[B, N, C]`` float32/float16/bfloat16 tensor with B, N, C >= 1."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [B, N, C], got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"{name} must have shape [B, N, C] (rank 3), got rank {x.dim()} with shape {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}")
    if min(x.shape) < 1:
        raise ValueError(f"{name} must have B, N, C >= 1, got shape {tuple(x.shape)}")


def check_same_device(x: torch.Tensor, other: torch.Tensor, name: str) -> None:
    if other.device != x.device:
        raise ValueError(f"{name} is on {other.device} but x is on {x.device}: they must be on the same device")


def is_integer(value) -> bool:
    """True for any ``numbers.Integral`` (Python or NumPy ints), False for bool and everything else."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_int(value, name: str, low: int, high: int) -> int:
    """``value`` must be a ``numbers.Integral`` (not bool) in ``[low, high]``; returns it as ``int``.

    Tensors are refused (reading one would synchronise with the device): pass ``int(t)``.
    """
    if not is_integer(value):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    value = int(value)
    if not low <= value <= high:
        raise ValueError(f"{name} must satisfy {low} <= {name} <= {high}, got {value}")
    return value


def check_float_tensor(value, name: str, shape_text: str = "") -> None:
    """``value`` must be a floating-point tensor (``TypeError`` otherwise); ``shape_text`` (e.g.
    ``" of shape [B, N]"``) goes into the message."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor{shape_text}, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")


def cls_scores(attn, x: torch.Tensor, name: str = "attn") -> torch.Tensor:
    """Validate the class token's attention and reduce it to float32 ``[B, N]`` scores.

    Accepted forms: ``[B, N]``; ``[B, H, N]`` (mean over heads); ``[B, H, N, N]`` (row 0, the class
    query, then mean over heads). The head mean is taken in float32.
    """
    check_float_tensor(attn, name)
    check_same_device(x, attn, name)
    B, N, _ = x.shape
    if attn.dim() == 2:
        scores = attn
    elif attn.dim() == 3:
        scores = attn.float().mean(dim=1) if attn.shape[0] == B and attn.shape[2] == N else attn
    elif attn.dim() == 4:
        if attn.shape[2] != N or attn.shape[3] != N:
            raise ValueError(f"{name} of rank 4 must have shape [B, H, N, N] with N={N}, got {tuple(attn.shape)}")
        scores = attn[:, :, 0, :].float().mean(dim=1)
    else:
        raise ValueError(f"{name} must have shape [B, N], [B, H, N] or [B, H, N, N], got rank {attn.dim()} "
                         f"with shape {tuple(attn.shape)}")
    if scores.dim() != 2 or scores.shape[0] != B or scores.shape[1] != N:
        raise ValueError(f"{name} must match x's batch B={B} and token count N={N} "
                         f"([B, N], [B, H, N] or [B, H, N, N]), got shape {tuple(attn.shape)}")
    return scores.float()


def check_size(size: Optional[torch.Tensor], x: torch.Tensor, name: str = "size") -> Optional[torch.Tensor]:
    """``size`` is None or a floating ``[B, N]`` / ``[B, N, 1]`` tensor of finite sizes > 0.

    Returns float32 ``[B, N]``. A non-positive or non-finite size raises ``ValueError`` (on CUDA
    through ``torch._assert_async``, without a host synchronisation: the error then surfaces at the
    next synchronising call as a device-side assertion).
    """
    if size is None:
        return None
    check_float_tensor(size, name, " of shape [B, N] or [B, N, 1]")
    check_same_device(x, size, name)
    B, N, _ = x.shape
    if size.dim() == 3 and size.shape[-1] == 1:
        size = size.squeeze(-1)
    if size.dim() != 2 or size.shape[0] != B or size.shape[1] != N:
        raise ValueError(f"{name} must have shape [B, N] or [B, N, 1] with B={B}, N={N}, got {tuple(size.shape)}")
    size = size.float()
    check_positive_finite(size, name)
    return size


class _LibrarySizes:
    """While ``depth > 0``, sizes come from the library itself (the patch passes the sizes its own
    reductions produced, sums of positive sizes), so :func:`check_positive_finite` skips their value
    check: no extra launches or host synchronisations per block. Shapes are still checked."""

    depth = 0


LIBRARY_SIZES = _LibrarySizes()


def check_positive_finite(values: torch.Tensor, name: str) -> None:
    """Every element of ``values`` must be finite and > 0 (``ValueError``; asynchronous on CUDA).

    Skipped while :data:`LIBRARY_SIZES` is active (sizes the library produced)."""
    if LIBRARY_SIZES.depth > 0:
        return
    ok = (values > 0) & torch.isfinite(values)
    check_all(ok, f"{name} must be finite and > 0 everywhere",
              lambda: f"got {int((~ok).sum())} value(s) that are not (e.g. {values[~ok].flatten()[0].item()})")


def check_all(ok: torch.Tensor, message: str, details=None) -> None:
    """``ValueError(message)`` unless every element of ``ok`` is True; on CUDA (and under
    ``torch.compile``) ``torch._assert_async``, so no host synchronisation and no graph break.
    ``details()`` (CPU only) adds what was found."""
    if ok.is_cuda or torch.compiler.is_compiling():
        torch._assert_async(ok.all(), message)
    elif not bool(ok.all()):
        raise ValueError(message + (f", {details()}" if details is not None else ""))


def check_metric(metric: Optional[torch.Tensor], x: torch.Tensor, name: str = "metric") -> torch.Tensor:
    """``metric`` is None (use ``x``) or a floating ``[B, N, Cm]`` tensor on x's device."""
    if metric is None:
        return x
    if not isinstance(metric, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [B, N, Cm], got {type(metric).__name__}")
    if metric.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {metric.dtype}")
    check_same_device(x, metric, name)
    if metric.dim() != 3 or metric.shape[0] != x.shape[0] or metric.shape[1] != x.shape[1] or metric.shape[2] < 1:
        raise ValueError(f"{name} must have shape [B, N, Cm] with B={x.shape[0]}, N={x.shape[1]}, "
                         f"got {tuple(metric.shape)}")
    return metric


def check_attention_inputs(x, attn, size, num_prefix_tokens) -> tuple:
    """The inputs of every class-attention method: tokens ``x``, class attention ``attn``, ``size``
    and ``num_prefix_tokens``. Returns ``(p, scores [B, N] float32, size [B, N] float32 or None)``."""
    check_tokens(x)
    p = check_int(num_prefix_tokens, "num_prefix_tokens", 0, x.shape[1] - 1)
    return p, cls_scores(attn, x), check_size(size, x)


def check_choice(value, name: str, choices) -> None:
    """``value`` must be one of ``choices``; raises ``ValueError`` naming ``name`` otherwise."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
