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
