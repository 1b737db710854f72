"""Temperature scaling (fitted on validation logits only) and the expected calibration error.

Pure functions on arrays: the caller decides which rows are validation rows, and never passes test rows.
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar

from oncotransfer.errors import DataError

T_MIN, T_MAX = 0.05, 20.0
"""Bounds of the fitted temperature: outside them the validation set is too small or separable to say more."""


def _nll(logits: np.ndarray, y: np.ndarray, sigmoid: bool, t: float) -> float:
    z = logits / t
    if sigmoid:
        # -log sigmoid(z) for y = 1, -log(1 - sigmoid(z)) = -log sigmoid(-z) for y = 0; logaddexp is stable
        s = np.where(y == 1, -z, z)
        return float(np.mean(np.logaddexp(0.0, s)))
    z = z - z.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(z).sum(axis=1))
    return float(np.mean(log_norm - z[np.arange(len(y)), y]))


def fit_temperature(logits: np.ndarray, y: np.ndarray, sigmoid: bool) -> float:
    """The T in [T_MIN, T_MAX] minimising the NLL of softmax(logits / T) (or sigmoid(logit / T)).

    The NLL is convex in 1/T, hence unimodal in log T, so a bounded 1-D (Brent) search on log T finds the
    optimum; it is deterministic. ``logits``: (N, C), or (N,) / (N, 1) for a one-logit sigmoid head."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(y).astype(int).reshape(-1)
    if sigmoid:
        z = z.reshape(-1)
    elif z.ndim != 2:
        raise DataError(f"fit_temperature: softmax logits must be (N, C), got shape {z.shape}")
    if len(z) == 0 or len(z) != len(y):
        raise DataError(f"fit_temperature: {len(z)} logits for {len(y)} labels; need the same, at least one")
    res = minimize_scalar(lambda log_t: _nll(z, y, sigmoid, float(np.exp(log_t))),
                          bounds=(np.log(T_MIN), np.log(T_MAX)), method="bounded", options={"xatol": 1e-6})
    return float(np.exp(res.x))


def scale_probabilities(logits: np.ndarray, sigmoid: bool, temperature: float = 1.0) -> np.ndarray:
    """(N, C) probabilities of ``logits / temperature``; a sigmoid head's one logit gives two columns."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    if sigmoid:
        p = 1.0 / (1.0 + np.exp(-z.reshape(-1)))
        return np.stack([1 - p, p], axis=1)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


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
