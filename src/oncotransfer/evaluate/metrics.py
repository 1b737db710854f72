"""Classification metrics as plain, JSON-serialisable dicts (pure functions, no I/O)."""
from __future__ import annotations

import math
import warnings
from typing import Any, Sequence

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    precision_score,
    recall_score,
    roc_auc_score,
)

from oncotransfer.errors import DataError

# Rows of bootstrap indices drawn at once: bounds memory at ~64 MB for large test sets.
_BOOT_CHUNK_CELLS = 8_000_000


def _check_inputs(y_true: np.ndarray, y_prob: np.ndarray, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.asarray(y_true)
    y_prob = np.asarray(y_prob, dtype=float)
    c = len(classes)
    if y_true.ndim != 1 or y_true.size == 0:
        raise DataError(f"metrics: y_true must be a non-empty 1-D array of class indices (got shape {y_true.shape})")
    if y_prob.ndim != 2 or y_prob.shape != (y_true.size, c):
        raise DataError(f"metrics: y_prob has shape {y_prob.shape}, expected ({y_true.size}, {c}) "
                        f"for {c} classes {classes}; pass one probability column per class")
    if not np.issubdtype(y_true.dtype, np.integer) or y_true.min() < 0 or y_true.max() >= c:
        raise DataError(f"metrics: y_true must hold integer class indices in 0..{c - 1} for classes {classes}")
    return y_true.astype(int), y_prob


def resolve_positive(classes: list[str], positive_classes: list[str] | None) -> list[str] | None:
    """Names of the positive classes for the binary view, or None when there is none."""
    if not positive_classes:
        return [classes[1]] if len(classes) == 2 else None
    unknown = [p for p in positive_classes if p not in classes]
    if unknown:
        raise DataError(f"evaluate.positive_classes: unknown class name(s) {unknown}; "
                        f"valid class names are {classes}")
    pos = [c for c in classes if c in positive_classes]  # class order, no duplicates
    if len(pos) == len(classes):
        raise DataError(f"evaluate.positive_classes: {pos} names every class, so nothing is negative; "
                        f"leave at least one of {classes} out")
    return pos


def _roc_auc(y_true: np.ndarray, y_prob: np.ndarray) -> float | None:
    c = y_prob.shape[1]
    if c == 2:
        if np.unique(y_true).size < 2:
            return None
        return float(roc_auc_score(y_true == 1, y_prob[:, 1]))
    # Macro one-vs-rest over the classes that have both positives and negatives; equals
    # sklearn's multi_class="ovr" when every class is present, and does not raise otherwise.
    aucs = [roc_auc_score(y_true == k, y_prob[:, k]) for k in range(c)
            if 0 < np.sum(y_true == k) < y_true.size]
    return float(np.mean(aucs)) if aucs else None


def _bootstrap_ci(correct: np.ndarray, n_boot: int, seed: int) -> list[float]:
    rng = np.random.default_rng(seed)
    n = correct.size
    per_chunk = max(1, _BOOT_CHUNK_CELLS // n)
    accs: list[np.ndarray] = []
    left = n_boot
    while left > 0:
        k = min(left, per_chunk)
        idx = rng.integers(0, n, size=(k, n))
        accs.append(correct[idx].mean(axis=1))
        left -= k
    lo, hi = np.percentile(np.concatenate(accs), [2.5, 97.5])
    return [float(lo), float(hi)]


def _binary_view(y_true: np.ndarray, y_prob: np.ndarray, classes: list[str], pos: list[str]) -> dict[str, Any]:
    idx = [classes.index(p) for p in pos]
    truth = np.isin(y_true, idx)
    pred = y_prob[:, idx].sum(axis=1) >= 0.5
    cm = confusion_matrix(truth, pred, labels=[False, True])
    tn, fp = int(cm[0, 0]), int(cm[0, 1])
    return {
        "positive_classes": pos,
        "precision": float(precision_score(truth, pred, zero_division=0)),
        "recall": float(recall_score(truth, pred, zero_division=0)),
        "specificity": tn / (tn + fp) if tn + fp else 0.0,
        "f1": float(f1_score(truth, pred, zero_division=0)),
        "accuracy": float(accuracy_score(truth, pred)),
        "confusion_matrix": cm.astype(int).tolist(),
    }


def classification_metrics(y_true: np.ndarray, y_prob: np.ndarray, classes: list[str],
                           positive_classes: list[str] | None = None, bootstrap: int = 1000,
                           seed: int = 0) -> dict[str, Any]:
    """Accuracy, balanced accuracy, per-class scores, confusion matrix, ROC-AUC, bootstrap CI and a
    positive-vs-rest view, from integer labels ``y_true`` (N,) and probabilities ``y_prob`` (N, C)."""
    y_true, y_prob = _check_inputs(y_true, y_prob, classes)
    pos = resolve_positive(classes, positive_classes)
    labels = list(range(len(classes)))
    y_pred = y_prob.argmax(axis=1)
    correct = (y_pred == y_true).astype(float)
    prec, rec, f1, sup = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    with warnings.catch_warnings():
        # "y_pred contains classes not in y_true" is expected on small folds.
        warnings.simplefilter("ignore")
        bal = float(balanced_accuracy_score(y_true, y_pred))
    return {
        "n": int(y_true.size),
        "accuracy": float(correct.mean()),
        "balanced_accuracy": bal,
        "per_class": {name: {"precision": float(prec[k]), "recall": float(rec[k]),
                             "f1": float(f1[k]), "support": int(sup[k])}
                      for k, name in enumerate(classes)},
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).astype(int).tolist(),
        "roc_auc": _roc_auc(y_true, y_prob),
        "accuracy_ci95": _bootstrap_ci(correct, bootstrap, seed) if bootstrap > 0 else None,
        "binary": _binary_view(y_true, y_prob, classes, pos) if pos else None,
    }


def summarise(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample sd, n and a 95% t-interval (normal 1.96 without scipy) of ``values``."""
    x = np.asarray([float(v) for v in values], dtype=float)
    if x.size == 0:
        raise DataError("summarise: no values to summarise; pass at least one number")
    n, mean = int(x.size), float(x.mean())
    if n == 1:
        return {"mean": mean, "sd": 0.0, "n": 1, "ci95": [mean, mean]}
    sd = float(x.std(ddof=1))
    try:
        from scipy.stats import t
        q = float(t.ppf(0.975, n - 1))
    except ImportError:
        q = 1.96
    half = q * sd / math.sqrt(n)
    return {"mean": mean, "sd": sd, "n": n, "ci95": [mean - half, mean + half]}


def _lookup(d: dict[str, Any], key: str) -> Any:
    """``d["a"]["b"]`` for key ``"a.b"``; None when any level is missing."""
    for part in key.split("."):
        if not isinstance(d, dict):
            return None
        d = d.get(part)
    return d


def fold_summary(per_fold: list[dict[str, Any]],
                 keys: Sequence[str] = ("accuracy", "balanced_accuracy", "roc_auc")) -> dict[str, Any]:
    """``summarise`` each key over folds, skipping None/NaN; dotted keys such as ``binary.recall``
    reach nested values. A key with no values maps to None."""
    out: dict[str, Any] = {}
    for key in keys:
        vals = [v for v in (_lookup(f, key) for f in per_fold)
                if v is not None and not (isinstance(v, float) and math.isnan(v))]
        out[key] = summarise(vals) if vals else None
    return out
