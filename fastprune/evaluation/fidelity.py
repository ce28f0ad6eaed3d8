"""Fidelity to the unreduced model, and paired bootstrap intervals.

With a few hundred images a paired top-1 difference has a standard error of about a point, so the
table also reports how closely the reduced model follows the unreduced one, which varies much less:

- **agreement**: the share of views whose top-1 class equals the unreduced model's;
- **KL**: mean ``KL(p_unreduced || p_reduced)`` of the softmax outputs, in nats.

Both are taken over every image and its horizontal flip (two views per image). Intervals are paired
percentile bootstraps over images: one fixed set of resampled image indices (:data:`BOOTSTRAP_SEED`)
is applied to every setting and every metric, and a resampled image carries both of its views.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np
import torch

__all__ = ["BOOTSTRAP_SAMPLES", "BOOTSTRAP_SEED", "CONFIDENCE", "kl_divergence", "top1_agreement",
           "bootstrap_indices", "bootstrap_interval"]

#: Bootstrap resamples, their seed and the interval's coverage.
BOOTSTRAP_SAMPLES = 2000
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95


def kl_divergence(base_logits: torch.Tensor, logits: torch.Tensor) -> np.ndarray:
    """``KL(softmax(base_logits) || softmax(logits))`` per row, in nats, computed in float64.

    Args:
        base_logits, logits: ``[n, classes]``.

    Returns:
        float64 ``[n]``, each >= 0 (0 where the rows give the same distribution).
    """
    if base_logits.shape != logits.shape or base_logits.dim() != 2:
        raise ValueError(f"logits must both be [n, classes], got {tuple(base_logits.shape)} and {tuple(logits.shape)}")
    log_p = torch.log_softmax(base_logits.double(), dim=1)
    log_q = torch.log_softmax(logits.double(), dim=1)
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=1)
    return kl.clamp_min(0.0).numpy()


def top1_agreement(base_logits: torch.Tensor, logits: torch.Tensor) -> np.ndarray:
    """1.0 where the rows' top-1 classes are equal, else 0.0; float64 ``[n]``."""
    if base_logits.shape != logits.shape or base_logits.dim() != 2:
        raise ValueError(f"logits must both be [n, classes], got {tuple(base_logits.shape)} and {tuple(logits.shape)}")
    return (base_logits.argmax(dim=1) == logits.argmax(dim=1)).double().numpy()


def bootstrap_indices(n: int, samples: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """``[samples, n]`` image indices drawn with replacement from ``range(n)``, the same for a given
    ``(n, samples, seed)``; share them between settings so that their intervals are paired."""
    if n < 1 or samples < 1:
        raise ValueError(f"need n >= 1 and samples >= 1, got n={n}, samples={samples}")
    return np.random.default_rng(seed).integers(0, n, size=(samples, n))


def bootstrap_interval(values: np.ndarray, indices: np.ndarray,
                       confidence: float = CONFIDENCE) -> Tuple[float, float]:
    """Percentile bootstrap interval of the mean of the per-image ``values`` ``[n]``.

    Args:
        values: one number per image (a paired difference, or a view-averaged metric).
        indices: resamples from :func:`bootstrap_indices` for ``n = len(values)``.
        confidence: coverage, in (0, 1).

    Returns:
        ``(low, high)`` of the resampled means.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or indices.ndim != 2 or indices.shape[1] != len(values):
        raise ValueError(f"values [n] and indices [samples, n] disagree: {values.shape}, {indices.shape}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    means = values[indices].mean(axis=1)
    tail = 100.0 * (1.0 - confidence) / 2.0
    low, high = np.percentile(means, [tail, 100.0 - tail])
    return float(low), float(high)
