"""Temperature scaling, fitted on validation logits only: pure functions on arrays.

The caller decides which rows are validation rows, and never passes test rows."""
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
