"""MSTM, the front door: :func:`merge` and :func:`merge_tokens`, with input checks and backend dispatch."""
from __future__ import annotations

from typing import Optional

import torch

from . import _checks, _ext, backends
from .reference import MERGE_WEIGHTS, Merged, mstm_merge

#: MSTM's backends (it has every one: Triton, C++/CUDA C++ and the reference).
BACKENDS = backends.BACKENDS


def merge_tokens(x: torch.Tensor, attn: torch.Tensor, r: int, *, size: Optional[torch.Tensor] = None,
                 metric: Optional[torch.Tensor] = None, num_prefix_tokens: int = 1, weight: str = "size",
                 backend: str = "auto") -> Merged:
    """Merge the ``r`` least-attended tokens into their most similar kept token (MSTM).

    Semantics from "Multi-Scale And Token Mergence: Make Your ViT More Efficient" (Bian et al.,
    2023), step by step in :func:`fastprune.reference.mstm_merge`: keep the ``N - p - r`` non-prefix
    tokens with the largest class attention (ties: lower index); merge each of the ``r`` others into
    the kept token it is most cosine-similar to on ``metric``, as a weighted average; sizes add up.
    Prefix tokens pass through untouched. Output order: prefix tokens, then kept tokens in their
    original order.

    Args:
        x: tokens ``[B, N, C]``, float32 / float16 / bfloat16, CPU or CUDA.
        attn: the class token's attention, ``[B, N]``, ``[B, H, N]`` (averaged over heads) or
            ``[B, H, N, N]`` (row 0 used, averaged over heads); any float dtype, on x's device.
            Prefix columns are ignored. Softmax probabilities or logits: only the ranking matters,
            unless ``weight="size_attn"``.
        r: number of tokens to remove, a Python int with ``0 <= r <= N - num_prefix_tokens - 1``.
        size: ``[B, N]`` or ``[B, N, 1]`` token sizes (patches per token, positive); ones if None.
        metric: ``[B, N, Cm]`` features for cosine matching (e.g. the head-mean of the keys);
            ``x`` if None. Matching is not differentiable: no gradient reaches ``metric``.
        num_prefix_tokens: ``p``, leading tokens never merged (class, distillation, registers).
        weight: ``"size"`` (size-weighted average, default) or ``"size_attn"`` (size x class
            attention, MSTM's importance weighting; then gradients also reach ``attn``).
        backend: ``"auto"`` (Triton kernels on CUDA; the C++ kernels on CPU, or the PyTorch
            reference with a one-time warning if the extension is not built), ``"triton"``,
            ``"cpp"`` (compiled C++ on CPU / CUDA C++ on CUDA), ``"cuda"`` (the CUDA C++ kernels) or
            ``"reference"``.

    Returns:
        :class:`~fastprune.Merged` ``(x, size, index)``: merged tokens ``[B, N - r, C]`` in x's dtype,
        sizes ``[B, N - r]`` float32, and ``index`` ``[B, N]`` int64, the output position every input
        token went into (use it to unmerge, pool or visualise; compose maps across layers with
        ``index_prev.gather(1, ...)``). With ``r == 0`` the tokens are returned unchanged (the same
        tensor object).

    Raises:
        TypeError: ``x``/``attn``/``size``/``metric`` not tensors or of an unsupported dtype, ``r`` or
            ``num_prefix_tokens`` not ints.
        ValueError: wrong ranks, B/N mismatch between ``x`` and ``attn``/``size``/``metric``, ``r`` or
            ``num_prefix_tokens`` out of range, tensors on different devices, unknown ``weight`` or
            ``backend``, ``backend="cuda"`` with CPU tensors.
        RuntimeError: ``backend="cpp"``/``"cuda"`` when the extension is not built.
    """
    p, scores, size = _checks.check_attention_inputs(x, attn, size, num_prefix_tokens)
    B, N, _ = x.shape
    r = _checks.check_int(r, "r", 0, N - p - 1)
    metric = _checks.check_metric(metric, x)
    if weight not in MERGE_WEIGHTS:
        raise ValueError(f"weight must be 'size' or 'size_attn', got {weight!r}")
    backend = backends.resolve_backend(backend, x, BACKENDS)

    if r == 0:
        size = torch.ones(B, N, dtype=torch.float32, device=x.device) if size is None else size
        index = torch.arange(N, device=x.device).expand(B, N)
        return Merged(x, size, index)
    if backend == "triton":
        from .kernels.merge import mstm_merge_triton

        return mstm_merge_triton(x, scores, r, size=size, metric=metric, num_prefix_tokens=p, weight=weight)
    if backend == "cpp":
        return _ext.mstm_merge_cpp(x, scores, r, size=size, metric=metric, num_prefix_tokens=p, weight=weight)
    return mstm_merge(x, scores, r, size=size, metric=metric, num_prefix_tokens=p, weight=weight)


def merge(x: torch.Tensor, attn: torch.Tensor, r: int, **kwargs) -> torch.Tensor:
    """Merge ``r`` tokens of ``x`` by MSTM and return only the tokens ``[B, N - r, C]``.

    Same arguments, semantics and errors as :func:`merge_tokens`, which also returns the merged
    sizes and the position map.
    """
    return merge_tokens(x, attn, r, **kwargs).x


def unmerge(tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The full token grid back: every original position gets the token it was merged into.

    ``out[b, i] = tokens[b, index[b, i]]``. ``index`` is a method's position map (``Merged.index``)
    or a map composed over blocks (``index_prev.gather(1, index)``; a patched model's
    ``fastprune.patch.state(model).index``), so ``O(N)`` memory, never an ``N x N`` matrix.
    Differentiable in ``tokens`` (a token's gradient is the sum over the positions it fills).

    Args:
        tokens: ``[B, N', C]`` reduced tokens, float32 / float16 / bfloat16.
        index: ``[B, N0]`` int64 positions in ``[0, N')``, on ``tokens``' device.

    Returns:
        ``[B, N0, C]`` in ``tokens``' dtype.

    Raises:
        TypeError: ``tokens`` or ``index`` not tensors, ``index`` not int64, unsupported dtype.
        ValueError: wrong ranks, batch mismatch, different devices, an entry outside ``[0, N')``
            (checked asynchronously on CUDA).
    """
    _checks.check_tokens(tokens, "tokens")
    if not isinstance(index, torch.Tensor) or index.dtype != torch.int64:
        raise TypeError(f"index must be an int64 tensor [B, N0], got "
                        f"{index.dtype if isinstance(index, torch.Tensor) else type(index).__name__}")
    if index.dim() != 2 or index.shape[0] != tokens.shape[0]:
        raise ValueError(f"index must have shape [B, N0] with B={tokens.shape[0]}, got {tuple(index.shape)}")
    _checks.check_same_device(tokens, index, "index")
    n = tokens.shape[1]
    _checks.check_all((index >= 0) & (index < n), f"index entries must be in [0, {n}) (the tokens' N)",
                      lambda: f"got min {int(index.min())}, max {int(index.max())}")
    return tokens.gather(1, index[..., None].expand(-1, -1, tokens.shape[2]))
