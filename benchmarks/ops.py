"""Registry of the fused operations the kernel benchmarks time, and of the providers of each.

An operation (:class:`KernelOp`) says how to build its inputs for one :class:`Case`, how many bytes
its kernel must move, and which providers compute it:

* ``fastprune-*`` — fastprune's kernels: ``-triton`` (CUDA only), ``-cuda`` / ``-cpp`` (the compiled
  extension's CUDA and C++ kernels); skipped, with the reason, when not importable or not runnable
  on the device (Triton is never timed in the interpreter);
* ``reference`` — :mod:`fastprune.reference`, the specification;
* ``eager*`` — the eager PyTorch op chains of :mod:`benchmarks.eager` (none for BAT, which has no
  official code: its reference is the baseline).

Operations: the MSTM merge (``fastprune.merge``), class attention (``cls_attention``), ToMe, EViT
and BAT. IdleViT's gather/scatter and token-cut kernels are not covered yet.

Every provider returns the operation's canonical output (for the merge: the merged tokens
``[B, N - r, C]``; for class attention: the non-prefix columns ``[B, N - p]``), so that outputs can be
checked against the reference before timing. Adding an operation is one ``KernelOp(...)`` in
:func:`kernel_ops`.
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
from typing import Callable, Optional

import torch

from . import eager
from .harness import first_line

#: Prefix tokens in every benchmarked ViT (the class token).
NUM_PREFIX_TOKENS = 1


@dataclasses.dataclass(frozen=True)
class Shape:
    """A ViT's token geometry: ``N`` tokens (patches + class token) of width ``C`` in ``H`` heads."""

    key: str
    name: str
    N: int
    C: int
    H: int

    @property
    def head_dim(self) -> int:
        return self.C // self.H


SHAPES = {s.key: s for s in (
    Shape("deit_s", "DeiT-S", 197, 384, 6),
    Shape("vit_b16", "ViT-B/16", 197, 768, 12),
    Shape("vit_l16_384", "ViT-L/16@384", 577, 1024, 16),
    Shape("vit_h14_518", "ViT-H/14@518", 1370, 1280, 16),
)}


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark point: an operation at one shape, batch, dtype, mode and reduction amount.

    ``r`` (tokens removed: merges) or ``keep_rate`` (pruning/fusion) is set for operations that
    take it, None otherwise.
    """

    op: str
    shape: Shape
    batch: int
    dtype: torch.dtype
    mode: str  # "fwd" or "fwd+bwd"
    r: Optional[int]
    device: torch.device
    keep_rate: Optional[float] = None

    @property
    def backward(self) -> bool:
        return self.mode == "fwd+bwd"


@dataclasses.dataclass
class Inputs:
    """Tensors of one case: ``kwargs`` for the providers, ``leaves`` that receive gradients."""

    kwargs: dict
    leaves: list


@dataclasses.dataclass
class Provider:
    """One implementation of an operation.

    Attributes:
        name: column name in the results (``fastprune-triton``, ``reference``, ``eager``...).
        role: ``"fastprune"``, ``"reference"`` or ``"eager"``: what the speed-ups are taken against.
        fn: ``fn(case, **inputs.kwargs) -> Tensor``, the operation's canonical output.
        why_not: ``why_not(device) -> str | None``: the reason this provider cannot run on the device,
            or None when it can. Evaluated once per run.
    """

    name: str
    role: str
    fn: Callable[..., torch.Tensor]
    why_not: Callable[[torch.device], Optional[str]] = lambda device: None


@dataclasses.dataclass
class KernelOp:
    """A fused operation to benchmark.

    Attributes:
        name: short name (``mstm_merge``...), used on the command line and in file names.
        title: what the operation is, for summaries.
        param: ``"r"`` (cases parametrised by the tokens removed), ``"keep_rate"`` or None.
        make_inputs: ``make_inputs(case) -> Inputs`` on ``case.device``.
        bytes_moved: ``bytes_moved(case) -> (forward bytes, backward bytes)``, the minimal traffic
            of a kernel for the operation: every input read once, every output written once.
        providers: implementations, fastprune's first.
        n_out: ``n_out(case)``, tokens after the reduction (for merges ``N - r``).
    """

    name: str
    title: str
    param: Optional[str]
    make_inputs: Callable[[Case], Inputs]
    bytes_moved: Callable[[Case], tuple[int, int]]
    providers: list
    n_out: Callable[[Case], int] = lambda case: case.shape.N - (case.r or 0)


def _elt(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _import(module: str, attr: str):
    """``module.attr`` or raise ImportError with a short message."""
    mod = importlib.import_module(module)
    if not hasattr(mod, attr):
        raise ImportError(f"{module} has no attribute {attr!r}")
    return getattr(mod, attr)


def _needs(device_type: str, module: str, attr: str, why_device: str) -> Callable[[torch.device], Optional[str]]:
    def why_not(device: torch.device) -> Optional[str]:
        if device.type != device_type:
            return why_device
        try:
            _import(module, attr)
        except Exception as exc:  # ImportError, build errors of a JIT-compiled extension, ...
            return f"{module}.{attr} not available ({first_line(exc, 160)})"
        return None

    return why_not


_TRITON_NEEDS_CUDA = "Triton kernels are only timed on a CUDA device (the interpreter is never timed)"


def _ext_why_not(device_type: str) -> Callable[[torch.device], Optional[str]]:
    """The compiled extension (``fastprune._ext``): its C++ kernels on CPU, its CUDA kernels on CUDA."""
    def why_not(device: torch.device) -> Optional[str]:
        if device.type != device_type:
            return f"the extension's {device_type.upper()} kernels are benchmarked on {device_type} runs only"
        try:
            ext = importlib.import_module("fastprune._ext")
        except Exception as exc:
            return f"fastprune._ext not importable ({first_line(exc, 160)})"
        if device_type == "cuda" and not ext.cuda_available():
            return f"CUDA extension not built ({ext.cuda_load_error()})"
        if not ext.available():
            return f"C++ extension not built ({ext.load_error()})"
        return None

    return why_not


# ---------------------------------------------------------------------------------------------
# MSTM merge: fastprune.merge(x, attn, r)
# ---------------------------------------------------------------------------------------------

def _merge_inputs(case: Case) -> Inputs:
    B, N, C = case.batch, case.shape.N, case.shape.C
    x = torch.randn(B, N, C, device=case.device).to(case.dtype)
    # A class-attention-like score: a softmax over the tokens, float32 as cls_attention returns it.
    scores = (2 * torch.randn(B, N, device=case.device)).softmax(dim=-1)
    x.requires_grad_(case.backward)
    return Inputs({"x": x, "scores": scores}, [x] if case.backward else [])


def _merge_bytes(case: Case) -> tuple[int, int]:
    """Forward: read x and the scores; write merged x, sizes (fp32) and the index map (int64).
    Backward: read grad of merged x and the index map; write grad x."""
    B, N, C, r = case.batch, case.shape.N, case.shape.C, case.r
    e = _elt(case.dtype)
    fwd = B * N * C * e + B * N * 4 + B * (N - r) * C * e + B * (N - r) * 4 + B * N * 8
    bwd = B * (N - r) * C * e + B * N * 8 + B * N * C * e
    return fwd, bwd


def _merge_triton(case, x, scores):
    import fastprune

    return fastprune.merge_tokens(x, scores, case.r, num_prefix_tokens=NUM_PREFIX_TOKENS, backend="triton").x


def _merge_cpp(case, x, scores):
    from fastprune._ext import mstm_merge_cpp

    return mstm_merge_cpp(x, scores, case.r, num_prefix_tokens=NUM_PREFIX_TOKENS).x


def _merge_reference(case, x, scores):
    from fastprune.reference import mstm_merge

    return mstm_merge(x, scores, case.r, num_prefix_tokens=NUM_PREFIX_TOKENS).x


def _merge_eager(case, x, scores):
    return eager.mstm_merge_eager(x, scores, case.r, num_prefix_tokens=NUM_PREFIX_TOKENS)


# ---------------------------------------------------------------------------------------------
# Class attention: fastprune.attention.cls_attention(q, k)
# ---------------------------------------------------------------------------------------------

def _cls_inputs(case: Case) -> Inputs:
    """q, k ``[B, H, N, d]`` as timm's Attention makes them: strided views of one qkv tensor."""
    B, N, H, d = case.batch, case.shape.N, case.shape.H, case.shape.head_dim
    qkv = torch.randn(B, N, 3, H, d, device=case.device).to(case.dtype).requires_grad_(case.backward)
    q, k, _ = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    return Inputs({"q": q, "k": k}, [qkv] if case.backward else [])


def _cls_bytes(case: Case) -> tuple[int, int]:
    """Forward: read the class query ``[B, H, d]`` and the keys ``[B, H, N, d]``; write ``[B, N]`` fp32.
    Backward: read the grad ``[B, N]``, the class query and the keys; write their grads."""
    B, N, H, d = case.batch, case.shape.N, case.shape.H, case.shape.head_dim
    e = _elt(case.dtype)
    q_row, keys = B * H * d * e, B * H * N * d * e
    fwd = q_row + keys + B * N * 4
    bwd = B * N * 4 + 2 * (q_row + keys)
    return fwd, bwd


def _non_prefix(scores: torch.Tensor, N: int) -> torch.Tensor:
    """Canonical class-attention output: the non-prefix columns ``[B, N - p]`` (head mean taken)."""
    if scores.dim() == 3:  # [B, H, N]: per-head rows
        scores = scores.mean(dim=1)
    return scores[:, NUM_PREFIX_TOKENS:] if scores.shape[-1] == N else scores


def _cls_fastprune(case, q, k):
    fn = _import("fastprune.attention", "cls_attention")
    kwargs = {}
    if "num_prefix_tokens" in inspect.signature(fn).parameters:
        kwargs["num_prefix_tokens"] = NUM_PREFIX_TOKENS
    return _non_prefix(fn(q, k, **kwargs), case.shape.N)


def _cls_reference(case, q, k):
    fn = _import("fastprune.reference", "cls_attention")
    kwargs = {}
    if "num_prefix_tokens" in inspect.signature(fn).parameters:
        kwargs["num_prefix_tokens"] = NUM_PREFIX_TOKENS
    return _non_prefix(fn(q, k, **kwargs), case.shape.N)


def _cls_reference_why_not(device: torch.device) -> Optional[str]:
    try:
        _import("fastprune.reference", "cls_attention")
    except Exception as exc:
        return f"no PyTorch reference for class attention ({first_line(exc, 120)}); the full-map chain stands in"
    return None


def _cls_fastprune_why_not(device: torch.device) -> Optional[str]:
    try:
        _import("fastprune.attention", "cls_attention")
    except Exception as exc:
        return f"fastprune.attention.cls_attention not available ({first_line(exc, 160)})"
    return None


def _cls_full_map(case, q, k):
    return _non_prefix(eager.cls_attention_full_map(q, k), case.shape.N)


def _cls_row0(case, q, k):
    return _non_prefix(eager.cls_attention_row0(q, k), case.shape.N)


# ---------------------------------------------------------------------------------------------
# ToMe: fastprune.tome.tome_merge_tokens(x, r) (bipartite soft matching + size-weighted average)
# ---------------------------------------------------------------------------------------------

def _tome_inputs(case: Case) -> Inputs:
    x = torch.randn(case.batch, case.shape.N, case.shape.C, device=case.device).to(case.dtype)
    x.requires_grad_(case.backward)
    return Inputs({"x": x}, [x] if case.backward else [])


def _tome_bytes(case: Case) -> tuple[int, int]:
    """Forward: read x (also the matching metric here); write merged x, sizes (fp32), index (int64).
    Backward: read grad of merged x and the index map; write grad x."""
    B, N, C, r = case.batch, case.shape.N, case.shape.C, case.r
    e = _elt(case.dtype)
    fwd = B * N * C * e + B * (N - r) * C * e + B * (N - r) * 4 + B * N * 8
    bwd = B * (N - r) * C * e + B * N * 8 + B * N * C * e
    return fwd, bwd


def _tome_triton(case, x):
    from fastprune.tome import tome_merge_tokens

    return tome_merge_tokens(x, case.r, num_prefix_tokens=NUM_PREFIX_TOKENS, backend="triton").x


def _tome_reference(case, x):
    from fastprune.tome import tome_merge_reference

    return tome_merge_reference(x, case.r, num_prefix_tokens=NUM_PREFIX_TOKENS).x


def _tome_eager(case, x):
    return eager.tome_merge_eager(x, case.r, num_prefix_tokens=NUM_PREFIX_TOKENS)


# ---------------------------------------------------------------------------------------------
# EViT: fastprune.evit.evit_tokens(x, attn, keep_rate) (keep the top-K, fuse the rest into one token)
# ---------------------------------------------------------------------------------------------

def _evit_keep(case: Case) -> int:
    from fastprune.evit import kept_count

    return kept_count(case.shape.N, NUM_PREFIX_TOKENS, case.keep_rate)


def _evit_bytes(case: Case) -> tuple[int, int]:
    """Forward: read x and the scores; write p + K + 1 tokens, their sizes (fp32) and the index map.
    Backward: read the output grad and the index map; write grad x and grad scores."""
    return _scored_reduction_bytes(case, NUM_PREFIX_TOKENS + _evit_keep(case) + 1)


def _scored_reduction_bytes(case: Case, n_out: int) -> tuple[int, int]:
    """Bytes of a reduction ranked by scores that writes ``n_out`` tokens: (forward, backward)."""
    B, N, C = case.batch, case.shape.N, case.shape.C
    e = _elt(case.dtype)
    fwd = B * N * C * e + B * N * 4 + B * n_out * C * e + B * n_out * 4 + B * N * 8
    bwd = B * n_out * C * e + B * N * 8 + B * N * C * e + B * N * 4
    return fwd, bwd


def _evit_triton(case, x, scores):
    from fastprune.evit import evit_tokens

    return evit_tokens(x, scores, case.keep_rate, num_prefix_tokens=NUM_PREFIX_TOKENS, backend="triton").x


def _evit_reference(case, x, scores):
    from fastprune.evit import evit_reference

    return evit_reference(x, scores, case.keep_rate, num_prefix_tokens=NUM_PREFIX_TOKENS).x


def _evit_eager(case, x, scores):
    return eager.evit_eager(x, scores, _evit_keep(case), num_prefix_tokens=NUM_PREFIX_TOKENS)


# ---------------------------------------------------------------------------------------------
# BAT: fastprune.bat.bat_tokens(x, attn, keep_rate) (decouple, match attentive, cluster inattentive)
# No eager chain: BAT has no official code, its PyTorch reference is the baseline.
# ---------------------------------------------------------------------------------------------

def _bat_out(case: Case) -> int:
    from fastprune.bat import bat_plan

    return bat_plan(case.shape.N, NUM_PREFIX_TOKENS, case.keep_rate).output_tokens(NUM_PREFIX_TOKENS)


def _bat_bytes(case: Case) -> tuple[int, int]:
    """Forward: read x (also the metric) and the scores; write the output tokens, sizes, index map.
    Backward: read the output grad and the index map; write grad x and grad scores."""
    return _scored_reduction_bytes(case, _bat_out(case))


def _bat_triton(case, x, scores):
    from fastprune.bat import bat_tokens

    return bat_tokens(x, scores, case.keep_rate, num_prefix_tokens=NUM_PREFIX_TOKENS, backend="triton").x


def _bat_reference(case, x, scores):
    from fastprune.bat import bat_reference

    return bat_reference(x, scores, case.keep_rate, num_prefix_tokens=NUM_PREFIX_TOKENS).x


def _module_why_not(module: str, attr: str) -> Callable[[torch.device], Optional[str]]:
    def why_not(device: torch.device) -> Optional[str]:
        try:
            _import(module, attr)
        except Exception as exc:
            return f"{module}.{attr} not available ({first_line(exc, 160)})"
        return None

    return why_not


def kernel_ops() -> dict:
    """All benchmarked operations by name. Add a new fused operation here."""
    ops = [
        KernelOp(
            name="mstm_merge",
            title="MSTM merge (fastprune.merge): top-k by cls attention, cosine matching, weighted merge",
            param="r",
            make_inputs=_merge_inputs,
            bytes_moved=_merge_bytes,
            providers=[
                Provider("fastprune-triton", "fastprune", _merge_triton,
                         _needs("cuda", "fastprune.kernels.merge", "mstm_merge_triton", _TRITON_NEEDS_CUDA)),
                Provider("fastprune-cpp", "fastprune", _merge_cpp, _ext_why_not("cpu")),
                Provider("fastprune-cuda", "fastprune", _merge_cpp, _ext_why_not("cuda")),
                Provider("reference", "reference", _merge_reference),
                Provider("eager", "eager", _merge_eager),
            ],
        ),
        KernelOp(
            name="cls_attention",
            title="Class attention (fastprune.attention.cls_attention): the class token's softmax row, head mean",
            param=None,
            make_inputs=_cls_inputs,
            bytes_moved=_cls_bytes,
            providers=[
                Provider("fastprune", "fastprune", _cls_fastprune, _cls_fastprune_why_not),
                Provider("reference", "reference", _cls_reference, _cls_reference_why_not),
                Provider("eager", "eager", _cls_full_map),
                Provider("eager-row0", "eager", _cls_row0),
            ],
        ),
        KernelOp(
            name="tome_merge",
            title="ToMe merge (fastprune.tome): bipartite soft matching, size-weighted average",
            param="r",
            make_inputs=_tome_inputs,
            bytes_moved=_tome_bytes,
            providers=[
                Provider("fastprune-triton", "fastprune", _tome_triton,
                         _needs("cuda", "fastprune.kernels.tome", "tome_merge_triton", _TRITON_NEEDS_CUDA)),
                Provider("reference", "reference", _tome_reference,
                         _module_why_not("fastprune.tome", "tome_merge_reference")),
                Provider("eager", "eager", _tome_eager),
            ],
        ),
        KernelOp(
            name="evit",
            title="EViT fusion (fastprune.evit): keep the top-K by cls attention, fuse the rest into one token",
            param="keep_rate",
            make_inputs=_merge_inputs,
            bytes_moved=_evit_bytes,
            providers=[
                Provider("fastprune-triton", "fastprune", _evit_triton,
                         _needs("cuda", "fastprune.kernels.evit", "evit_triton", _TRITON_NEEDS_CUDA)),
                Provider("reference", "reference", _evit_reference,
                         _module_why_not("fastprune.evit", "evit_reference")),
                Provider("eager", "eager", _evit_eager),
            ],
            n_out=lambda case: NUM_PREFIX_TOKENS + _evit_keep(case) + 1,
        ),
        KernelOp(
            name="bat",
            title="BAT (fastprune.bat): decouple by cls attention, match attentive, DPC-kNN cluster the rest",
            param="keep_rate",
            make_inputs=_merge_inputs,
            bytes_moved=_bat_bytes,
            providers=[
                Provider("fastprune-triton", "fastprune", _bat_triton,
                         _needs("cuda", "fastprune.kernels.bat", "bat_triton", _TRITON_NEEDS_CUDA)),
                Provider("reference", "reference", _bat_reference,
                         _module_why_not("fastprune.bat", "bat_reference")),
            ],
            n_out=_bat_out,
        ),
    ]
    return {op.name: op for op in ops}


def resolve_r(spec: str, N: int, op: str = "mstm_merge") -> int:
    """``r`` from a spec: an int, or ``"n/4"`` for a quarter of the tokens.

    Clipped to what the operation can remove: ``N - p - 1`` for the MSTM merge, ``(N - p) // 2``
    for ToMe (one merge per A token).

    Raises:
        ValueError: a spec that is neither an int nor ``n/4``, or ``r < 1``.
    """
    text = str(spec).strip().lower()
    try:
        r = N // 4 if text in ("n/4", "quarter") else int(text)
    except ValueError:
        raise ValueError(f"r must be an int or 'n/4', got {spec!r}") from None
    if r < 1:
        raise ValueError(f"r must be >= 1, got {spec!r}")
    limit = (N - NUM_PREFIX_TOKENS) // 2 if op == "tome_merge" else N - NUM_PREFIX_TOKENS - 1
    return min(r, limit)
