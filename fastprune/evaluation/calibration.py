"""The calibration search's state: calibration images, exact FLOPs of a schedule, its fidelity.

:class:`CalibrationSearch` holds what :func:`fastprune.calibrate.calibrate` needs at every step:
the unreduced logits (computed once), the FLOPs of a per-block schedule as the evaluation counts
them (:func:`~fastprune.evaluation.settings.setting_gflops`, assembled from memoised per-block
parts), the mean ``KL(unreduced || reduced)`` and top-1 agreement of a schedule, and its throughput.
"""
from __future__ import annotations

import copy
import os
import sys
import time
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .. import flops as flop_count
from .. import patch
from .data import load_unlabelled_images
from .fidelity import kl_divergence, top1_agreement
from .settings import Setting, format_setting, setting_gflops

__all__ = ["CalibrationSearch", "calibration_batches", "setting_key", "schedule_setting"]


def calibration_batches(images, model: Optional[torch.nn.Module] = None, *, limit: Optional[int] = None,
                        split: str = "all", batch_size: int = 32, progress: bool = True) -> List[torch.Tensor]:
    """The calibration images as float32 batches ``[b, 3, H, W]`` (at most ``limit`` images).

    Args:
        images: a folder of image files (preprocessed with timm's transform for ``model``; ``split``
            picks a half, :func:`~fastprune.evaluation.data.split_files`), a tensor ``[n, 3, H, W]``,
            or an iterable of batches (a ``DataLoader``): tensors, or tuples whose first item is the
            images (labels are ignored).

    Raises:
        TypeError: ``images`` of another type, or a batch that is not a 4-d float tensor.
        ValueError: no images, ``limit``/``batch_size`` not positive.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be an int >= 1, got {limit!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if isinstance(images, (str, os.PathLike)):
        if model is None:
            raise TypeError("images: a folder needs the model (its timm config gives the preprocessing)")
        return load_unlabelled_images(images, model, limit=limit, split=split, batch_size=batch_size,
                                      progress=progress)
    if isinstance(images, torch.Tensor):
        images = list(images[:limit].split(batch_size)) if images.dim() == 4 else [images]
    elif not isinstance(images, Iterable):
        raise TypeError(f"images must be a folder, a tensor [n, 3, H, W] or an iterable of batches, "
                        f"got {type(images).__name__}")
    batches, count = [], 0
    for item in images:
        batch = item[0] if isinstance(item, (tuple, list)) else item
        if not isinstance(batch, torch.Tensor) or batch.dim() != 4 or not batch.is_floating_point():
            raise TypeError(f"images: every batch must be a float tensor [b, 3, H, W], got "
                            f"{tuple(batch.shape) if isinstance(batch, torch.Tensor) else type(batch).__name__}")
        if limit is not None:
            batch = batch[:limit - count]
        if len(batch):
            batches.append(batch.float().cpu())
            count += len(batch)
        if limit is not None and count >= limit:
            break
    if not batches:
        raise ValueError("images: no calibration images")
    return batches


def setting_key(setting: Setting) -> tuple:
    """A hashable ``(method, r, options)`` of a setting (a memo key)."""
    r = tuple(setting.r) if isinstance(setting.r, (list, tuple)) else setting.r
    return setting.method, r, tuple(sorted(setting.options.items(), key=lambda kv: kv[0]))


def schedule_setting(method: str, r: Sequence[int], options: Dict[str, Any]) -> Setting:
    """The :class:`Setting` of a per-block ``r`` list."""
    return Setting(method, list(r), dict(options), format_setting(method, list(r), options))


class CalibrationSearch:
    """What every search step needs: exact FLOPs, a token-count FLOPs estimate, KL / agreement.

    Args:
        model: the unpatched timm ViT (patched and reverted for each evaluation).
        batches: calibration images, float32 ``[b, 3, H, W]`` (:func:`calibration_batches`).
        flip: also compare on the flipped images.
        progress: a tqdm bar of the evaluated schedules (``bar``).
    """

    def __init__(self, model: torch.nn.Module, batches: List[torch.Tensor], flip: bool, progress: bool):
        from tqdm import tqdm

        param = next(model.parameters())
        self.model, self.device, self.dtype = model, param.device, param.dtype
        self.batches = [b.to(device=self.device, dtype=self.dtype) for b in batches]
        self.flip = flip
        self.image = batches[0][:1]
        self.counted = copy.deepcopy(model).to(device="cpu", dtype=torch.float32)  # never patched
        self.depth = len(model.blocks)
        self.num_prefix = int(model.num_prefix_tokens)
        self.num_tokens = model.patch_embed.num_patches + self.num_prefix
        self.base = setting_gflops(self.counted, Setting(), self.image, by_module=True)[""]  # FLOPs, int
        self._flops: Dict[tuple, int] = {}
        self._body: Dict[Tuple[int, int], Tuple[int, int]] = {}
        self._reduction: Dict[tuple, int] = {}
        self._fidelity: Dict[tuple, Tuple[float, float]] = {}
        self.fixed = self.base - sum(self._block(l, self.num_tokens)[0] for l in range(self.depth))
        self.base_views = self._forward(None)
        self.target: Optional[int] = None  # FLOPs budget; None for a throughput target
        self.bar = tqdm(desc="calibrating", unit="eval", disable=not progress, file=sys.stderr)

    def _forward(self, setting: Optional[Setting]) -> List[torch.Tensor]:
        if setting is not None:
            patch.timm(self.model, **setting)
        try:
            with torch.inference_mode():
                views = [torch.cat([self.model(b).float().cpu() for b in self.batches])]
                if self.flip:
                    views.append(torch.cat([self.model(b.flip(-1)).float().cpu() for b in self.batches]))
        finally:
            if setting is not None:
                patch.revert(self.model)
        return views

    def fidelity(self, setting: Setting) -> Tuple[float, float]:
        """``(mean KL(unreduced || reduced) in nats, top-1 agreement in percent)`` over the views."""
        key = setting_key(setting)
        if key not in self._fidelity:
            views = self._forward(setting)
            kl = np.mean([kl_divergence(b, v).mean() for b, v in zip(self.base_views, views)])
            agree = np.mean([top1_agreement(b, v).mean() for b, v in zip(self.base_views, views)])
            self._fidelity[key] = (float(kl), 100.0 * float(agree))
            self.bar.update(1)
            self.bar.set_postfix(flops=f"{self.flops(setting) / self.base:.3f}", kl=f"{kl:.4f}")
        return self._fidelity[key]

    def kl(self, setting: Setting) -> float:
        return self.fidelity(setting)[0]

    def flops(self, setting: Setting) -> int:
        """FLOPs per image as the evaluation counts them (:func:`setting_gflops`), from memoised
        per-block parts: attention on ``N_l`` tokens, the reduction (which depends on ``N_l`` and the
        options only), the MLP on ``N_l - r_l``; a schedule with a reduction not seen yet is counted."""
        key = setting_key(setting)
        if key not in self._flops:
            predicted = self._predict(setting)
            self._flops[key] = self._count(setting) if predicted is None else predicted
        return self._flops[key]

    def _count(self, setting: Setting) -> int:
        counts = setting_gflops(self.counted, setting, self.image, by_module=True)
        options, n = setting_key(setting)[2], self.num_tokens
        for l, rl in enumerate(setting.r):
            if rl > 0:
                self._reduction[(setting.method, options, n)] = \
                    counts[f"blocks.{l}"] - self._attention(l, n) - self._block(l, n - rl)[1]
            n -= rl
        return counts[""]

    def _predict(self, setting: Setting) -> Optional[int]:
        options, n = setting_key(setting)[2], self.num_tokens
        total = self.estimate(setting.r)
        for rl in setting.r:
            if rl > 0:
                if (setting.method, options, n) not in self._reduction:
                    return None
                total += self._reduction[(setting.method, options, n)]
            n -= rl
        return total

    def _block(self, block: int, tokens: int) -> Tuple[int, int]:
        """FLOPs of unreduced block ``block`` on ``tokens`` tokens, and of its MLP (memoised)."""
        key = (block, tokens)
        if key not in self._body:
            counter = flop_count.counter()
            with torch.no_grad(), counter:
                self.counted.blocks[block](torch.zeros(1, tokens, self.counted.embed_dim))
            mlp = sum(sum(c.values()) for name, c in counter.get_flop_counts().items() if name.endswith(".mlp"))
            self._body[key] = (int(counter.get_total_flops()), int(mlp))
        return self._body[key]

    def _attention(self, block: int, tokens: int) -> int:
        total, mlp = self._block(block, tokens)
        return total - mlp

    def applied(self, method: str, r: Sequence[int], options: Dict[str, Any]) -> List[int]:
        """The per-block ``r`` the patch applies (clipped to what each block can remove)."""
        return patch.reduction_schedule(self.counted, list(r), method=method, **options)

    def estimate(self, r: Sequence[int]) -> int:
        """FLOPs of an applied schedule without the reduction's own cost (token counts only)."""
        total, n = self.fixed, self.num_tokens
        for l, rl in enumerate(r):
            total += self._attention(l, n) + self._block(l, n - rl)[1]
            n -= rl
        return total

    def throughput(self, setting: Setting, repeats: int = 3) -> float:
        """Images/s of the model under ``setting`` on the first batch (median of ``repeats`` timed runs)."""
        batch = self.batches[0]
        patch.timm(self.model, **setting)
        try:
            times = []
            with torch.inference_mode():
                for i in range(repeats + 1):
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
                    start = time.perf_counter()
                    self.model(batch)
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
                    if i:  # the first run is a warm-up
                        times.append(time.perf_counter() - start)
        finally:
            patch.revert(self.model)
        return len(batch) / float(np.median(times))
