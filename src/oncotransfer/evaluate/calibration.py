"""The expected calibration error and reliability bins: pure functions on arrays (temperature fitting is
``train.temperature``)."""
from __future__ import annotations

import numpy as np

from oncotransfer.errors import DataError


def reliability_bins(y_true: np.ndarray, y_prob: np.ndarray, n_bins: int = 15
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per equal-width bin of top-label confidence: (count, mean confidence, accuracy); empty bins are NaN."""
    y_true = np.asarray(y_true).astype(int).reshape(-1)
    p = np.asarray(y_prob, dtype=float)
    if p.ndim != 2 or len(p) != len(y_true) or n_bins < 1:
        raise DataError(f"calibration: y_prob must be (N, C) with N = {len(y_true)} labels, n_bins >= 1")
    conf, correct = p.max(axis=1), (p.argmax(axis=1) == y_true).astype(float)
    # bins (lo, hi]: confidence 1.0 falls in the last bin, 0 (impossible for a top label) in the first
    idx = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(idx, conf, n_bins) / count
        acc = np.bincount(idx, correct, n_bins) / count
    return count, mean_conf, acc


def expected_calibration_error(y_true: np.ndarray, y_prob: np.ndarray, n_bins: int = 15) -> float:
    """Top-label ECE: sum over equal-width confidence bins of |bin| / N * |accuracy - mean confidence|."""
    count, conf, acc = reliability_bins(y_true, y_prob, n_bins)
    if count.sum() == 0:
        raise DataError("expected_calibration_error: no predictions")
    full = count > 0
    return float(np.sum(count[full] / count.sum() * np.abs(acc[full] - conf[full])))


_BOOT_CHUNK_CELLS = 8_000_000  # resampled rows drawn at once: bounds memory at ~64 MB (as evaluate.metrics)


def ece_bootstrap_ci(y_true: np.ndarray, y_prob: np.ndarray, n_bins: int = 15, n_boot: int = 1000,
                     seed: int = 0) -> list[float] | None:
    """Bootstrap 95% interval of the ECE (``n_boot`` resamples of the images; None for ``n_boot`` 0). The same
    ``seed`` draws the same resamples for the same N, so intervals before and after scaling are paired."""
    if n_boot <= 0:
        return None
    y_true = np.asarray(y_true).astype(int).reshape(-1)
    p = np.asarray(y_prob, dtype=float)
    if p.ndim != 2 or len(p) != len(y_true) or len(p) == 0:
        raise DataError(f"calibration: y_prob must be (N, C) with N = {len(y_true)} labels, N >= 1")
    conf, correct = p.max(axis=1), (p.argmax(axis=1) == y_true).astype(float)
    idx = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)  # as reliability_bins
    n, rng, eces = len(p), np.random.default_rng(seed), []
    per_chunk, left = max(1, _BOOT_CHUNK_CELLS // n), n_boot
    while left > 0:
        k = min(left, per_chunk)
        rows = rng.integers(0, n, size=(k, n))
        flat = (idx[rows] + n_bins * np.arange(k)[:, None]).ravel()
        # ECE = sum over bins |sum(correct) - sum(confidence)| / N: per-bin sums of each resample at once
        gap = (np.bincount(flat, correct[rows].ravel(), k * n_bins)
               - np.bincount(flat, conf[rows].ravel(), k * n_bins)).reshape(k, n_bins)
        eces.append(np.abs(gap).sum(axis=1) / n)
        left -= k
    lo, hi = np.percentile(np.concatenate(eces), [2.5, 97.5])
    return [float(lo), float(hi)]
