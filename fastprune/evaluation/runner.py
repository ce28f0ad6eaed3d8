"""Evaluation runs: every setting timed side by side on the same batches, and the results table."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .data import Images
from .fidelity import CONFIDENCE, bootstrap_indices, bootstrap_interval, kl_divergence, top1_agreement
from .settings import Setting, apply_setting, parse_setting, revert_setting, setting_gflops

__all__ = ["Result", "make_result", "evaluate_setting", "evaluate_settings", "compare", "format_table", "format_interval",
           "COLUMNS"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Result:
    """One row of the table. ``top1``/``top5``/``agree`` in percent, ``images_per_s`` over forward
    passes only, ``speedup`` and ``flops_reduction`` (percent) against the baseline, ``predictions``
    int64 ``[n]`` top-1 class per image, ``correct`` bool ``[n]`` whether it is the label, ``logits``
    and ``flip_logits`` float32 ``[n, classes]`` of the images and of their horizontal flips (None
    if not run).

    Against the baseline (:func:`compare`): ``agree`` and ``kl`` (mean KL(baseline || this), nats)
    over the images and their flips; ``*_ci`` paired bootstrap 95% intervals (percent points for
    ``top1_delta_ci`` and ``agree_ci``). top-1 and top-5 are on the unflipped images only."""

    setting: Setting
    gflops: float
    top1: float
    top5: float
    images_per_s: float
    predictions: torch.Tensor
    agree: float = 100.0
    speedup: float = 1.0
    flops_reduction: float = 0.0
    top1_delta: float = 0.0
    logits: Optional[torch.Tensor] = None
    flip_logits: Optional[torch.Tensor] = None
    correct: Optional[torch.Tensor] = None
    kl: float = 0.0
    top1_delta_ci: Tuple[float, float] = (0.0, 0.0)
    agree_ci: Tuple[float, float] = (100.0, 100.0)
    kl_ci: Tuple[float, float] = (0.0, 0.0)


def evaluate_setting(model: torch.nn.Module, images: Images, setting: Union[Setting, str] = "none", *,
                     device: Union[str, torch.device, None] = None, dtype: Optional[torch.dtype] = None,
                     warmup: int = 1, flip: bool = True, progress: bool = True) -> Result:
    """Evaluate one setting: patch ``model`` (unless "none"), count GFLOPs, run every batch, revert.

    Args:
        model: the timm model from :func:`load_model`; patched in place for the duration of the call
            and reverted afterwards (also on error).
        images: preprocessed images from :func:`load_images` (float32 CPU batches).
        setting: a :class:`Setting` or its text form (see :func:`parse_setting`).
        device, dtype: where and in what dtype to run; the model's own if None.
        warmup: untimed forward passes on the first batch before timing.
        flip: also run every batch mirrored left-right (untimed), for the fidelity metrics.
        progress: show a tqdm progress bar.

    Returns:
        :class:`Result` with GFLOPs per image, top-1 / top-5 in percent and images/s over the model
        forward passes only (decoding excluded; CUDA synchronised). Baseline-relative fields
        (``agree``, ``speedup``...) are filled in by :func:`compare`.
    """
    return evaluate_settings(model, images, [setting], device=device, dtype=dtype, warmup=warmup,
                             flip=flip, progress=progress)[0]


def evaluate_settings(model: torch.nn.Module, images: Images, settings: Sequence[Union[Setting, str]], *,
                      device: Union[str, torch.device, None] = None, dtype: Optional[torch.dtype] = None,
                      warmup: int = 1, flip: bool = True, progress: bool = True) -> List[Result]:
    """Evaluate several settings side by side, timing them interleaved batch by batch.

    Each setting's GFLOPs are counted and it is warmed up (``warmup`` forwards of the first batch);
    then for every batch each setting in turn is patched in, timed on that batch and reverted. The
    settings thus share the machine's conditions (other load, clock changes) and their images/s are
    comparable even on a busy machine. Patching and reverting are outside the timed region, and so
    is the forward of the flipped batch (``flip``).

    Arguments as in :func:`evaluate_setting`; returns one :class:`Result` per setting, in order
    (call :func:`compare` for the baseline-relative fields).
    """
    from tqdm import tqdm

    settings = [parse_setting(s) if isinstance(s, str) else s for s in settings]
    param = next(model.parameters())
    device = param.device if device is None else torch.device(device)
    dtype = param.dtype if dtype is None else dtype
    gflops = [setting_gflops(model, setting, images.batches[0][:1]) for setting in settings]
    for setting in settings:
        apply_setting(model, setting)
        try:
            with torch.inference_mode():
                for _ in range(warmup):
                    model(images.batches[0].to(device=device, dtype=dtype))
                _sync(device)
        finally:
            revert_setting(model, setting)
    elapsed = [0.0] * len(settings)
    logits: List[List[torch.Tensor]] = [[] for _ in settings]
    flipped: List[List[torch.Tensor]] = [[] for _ in settings]
    bar = tqdm(total=len(images.batches) * len(settings), desc="evaluating", unit="batch", disable=not progress,
               file=sys.stderr)
    with torch.inference_mode(), bar:
        for batch in images.batches:
            batch = batch.to(device=device, dtype=dtype)  # one batch at a time on the device
            for i, setting in enumerate(settings):
                apply_setting(model, setting)
                try:
                    _sync(device)
                    start = time.perf_counter()
                    out = model(batch)
                    _sync(device)
                    elapsed[i] += time.perf_counter() - start
                    if flip:
                        flipped[i].append(model(batch.flip(-1)).float().cpu())
                finally:
                    revert_setting(model, setting)
                logits[i].append(out.float().cpu())
                bar.update(1)
    return [make_result(setting, flops, torch.cat(chunks), images.labels, seconds,
                        torch.cat(flip_chunks) if flip else None)
            for setting, flops, seconds, chunks, flip_chunks in zip(settings, gflops, elapsed, logits, flipped)]


def make_result(setting: Setting, gflops: float, logits: torch.Tensor, labels: torch.Tensor, seconds: float,
                flip_logits: Optional[torch.Tensor] = None) -> Result:
    """The :class:`Result` of ``logits`` ``[n, classes]`` against ``labels`` ``[n]``, timed ``seconds``
    over the forward passes of the ``n`` images."""
    top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
    predictions = top5[:, 0]
    return Result(setting=setting, gflops=gflops, top1=100.0 * (predictions == labels).float().mean().item(),
                  top5=100.0 * (top5 == labels[:, None]).any(dim=1).float().mean().item(),
                  images_per_s=len(labels) / seconds, predictions=predictions, correct=predictions == labels,
                  logits=logits, flip_logits=flip_logits)


def _views(res: Result) -> List[torch.Tensor]:
    return [res.logits] + ([] if res.flip_logits is None else [res.flip_logits])


def compare(results: List[Result]) -> List[Result]:
    """Fill in the baseline-relative fields of every result against ``results[0]`` (in place).

    Agreement and KL are averaged over the views both results have (image, and flip if both ran it);
    without logits (results made by hand) agreement falls back to ``predictions``. The intervals
    resample images with one fixed seed, the same for every result; the interval of Δ top-1 needs
    ``correct`` (else it is the point estimate).
    """
    base = results[0]
    n = len(base.predictions)
    indices = bootstrap_indices(n)
    pct = lambda lo_hi: (100.0 * lo_hi[0], 100.0 * lo_hi[1])  # noqa: E731
    for res in results:
        res.speedup = res.images_per_s / base.images_per_s
        res.flops_reduction = 100.0 * (1.0 - res.gflops / base.gflops)
        res.top1_delta = res.top1 - base.top1
        if base.logits is None or res.logits is None:
            agree = (res.predictions == base.predictions).double().numpy()
            kl = np.zeros(n)
        else:
            pairs = list(zip(_views(base), _views(res)))
            agree = np.mean([top1_agreement(b, r) for b, r in pairs], axis=0)
            kl = np.mean([kl_divergence(b, r) for b, r in pairs], axis=0)
        res.agree, res.kl = 100.0 * float(agree.mean()), float(kl.mean())
        res.agree_ci, res.kl_ci = pct(bootstrap_interval(agree, indices)), bootstrap_interval(kl, indices)
        if base.correct is None or res.correct is None:
            res.top1_delta_ci = (res.top1_delta, res.top1_delta)
        else:
            delta = res.correct.double().numpy() - base.correct.double().numpy()
            res.top1_delta_ci = pct(bootstrap_interval(delta, indices))
    return results


_CI = f"{100 * CONFIDENCE:g}% CI"
COLUMNS = ("method", "r / keep rate", "GFLOPs", "FLOPs -%", "top-1", "Δ top-1", f"Δ top-1 {_CI}", "top-5",
           "agree %", f"agree {_CI}", "KL", f"KL {_CI}", "images/s", "speed-up")


def format_interval(low: float, high: float, digits: int = 1, sign: bool = False) -> str:
    """``[low, high]`` with ``digits`` decimals (and a leading sign if ``sign``)."""
    spec = f"{'+' if sign else ''}.{digits}f"
    return f"[{low:{spec}}, {high:{spec}}]"


def _row(res: Result) -> List[str]:
    return [res.setting.method_label(), res.setting.r_label(), f"{res.gflops:.3f}", f"{res.flops_reduction:.1f}",
            f"{res.top1:.1f}", f"{res.top1_delta:+.1f}", format_interval(*res.top1_delta_ci, sign=True),
            f"{res.top5:.1f}", f"{res.agree:.1f}", format_interval(*res.agree_ci), f"{res.kl:.4f}",
            format_interval(*res.kl_ci, digits=4), f"{res.images_per_s:.1f}", f"{res.speedup:.2f}x"]


def format_table(results: List[Result], markdown: bool = False) -> str:
    """The results as an aligned text table, or a Markdown table if ``markdown``."""
    rows = [list(COLUMNS)] + [_row(r) for r in results]
    if markdown:
        lines = ["| " + " | ".join(rows[0]) + " |", "|" + "|".join("---" if i < 2 else "---:"
                                                                   for i in range(len(COLUMNS))) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows[1:]]
        return "\n".join(lines)
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    fmt = lambda row: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
    return "\n".join([fmt(rows[0]), "  ".join("-" * w for w in widths)] + [fmt(row) for row in rows[1:]])
