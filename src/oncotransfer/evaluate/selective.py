"""Selective prediction: how accurate the model is on the share of images it answers (coverage) when it abstains
on the rest, least trusted first. Pure functions on arrays (the figure is ``plots.plot_risk_coverage``)."""
from __future__ import annotations

from typing import Any

import numpy as np

from oncotransfer.errors import DataError

COVERAGES = tuple(round(0.05 * k, 2) for k in range(1, 21))
"""The coverage grid of metrics.json's ``selective`` block: 5%, 10%, ..., 100% of the images answered."""


def answered(coverage: float, n: int) -> int:
    """How many of ``n`` images a coverage answers: at least one, rounded up (90% of 15 answers 14)."""
    return max(1, int(np.ceil(round(coverage * n, 9))))


def accuracy_at_coverage(correct: np.ndarray, score: np.ndarray, coverages: np.ndarray | list[float] = COVERAGES
                         ) -> np.ndarray:
    """Accuracy on the ``answered(c, N)`` images with the highest ``score``, for each coverage ``c``.

    Images tied in score at the cut count at the tie group's mean accuracy (the expectation over every order of
    the ties), so the curve does not depend on row order. A NaN score ranks last (answered only at full coverage)."""
    correct = np.asarray(correct, dtype=float).reshape(-1)
    s = np.asarray(score, dtype=float).reshape(-1)
    if correct.size == 0 or s.shape != correct.shape:
        raise DataError(f"selective: {s.size} scores for {correct.size} predictions; need the same, at least one")
    s = np.where(np.isnan(s), -np.inf, s)
    order = np.argsort(-s, kind="stable")
    neg, hits = -s[order], np.concatenate([[0.0], np.cumsum(correct[order])])
    k = np.array([answered(c, correct.size) for c in coverages])
    lo = np.searchsorted(neg, neg[k - 1], side="left")  # the tie group holding the k-th image: [lo, hi)
    hi = np.searchsorted(neg, neg[k - 1], side="right")
    right = hits[lo] + (k - lo) * (hits[hi] - hits[lo]) / (hi - lo)
    return right / k


def _ci(correct: np.ndarray, score: np.ndarray, coverage: float, n_boot: int, seed: int) -> list[float] | None:
    """Bootstrap 95% interval of the accuracy at one coverage (images resampled with replacement)."""
    if n_boot <= 0:
        return None
    rng = np.random.default_rng(seed)
    vals = [accuracy_at_coverage(correct[i], score[i], [coverage])[0]
            for i in (rng.integers(0, correct.size, correct.size) for _ in range(n_boot))]
    lo, hi = np.percentile(vals, [2.5, 97.5])
    return [float(lo), float(hi)]


def selective_summary(y_true: np.ndarray, y_prob: np.ndarray, confidence: np.ndarray,
                      ood_score: np.ndarray | None = None, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """metrics.json's ``selective`` block: accuracy (of ``argmax y_prob``) over the coverage grid, images
    answered by ``confidence`` (highest first) and, when given, by ``ood_score`` (lowest, most usual, first);
    the accuracy at 90% coverage by each, with a bootstrap 95% CI by confidence (``n_boot`` resamples)."""
    y_true = np.asarray(y_true).astype(int).reshape(-1)
    correct = (np.asarray(y_prob, dtype=float).argmax(axis=1) == y_true).astype(float)
    conf = np.asarray(confidence, dtype=float).reshape(-1)
    by_conf = accuracy_at_coverage(correct, conf)
    out: dict[str, Any] = {"coverage": list(COVERAGES), "accuracy_by_confidence": by_conf.tolist(),
                           "accuracy_by_ood": None,
                           "accuracy_at_90_coverage": float(accuracy_at_coverage(correct, conf, [0.9])[0]),
                           "accuracy_at_90_coverage_ci95": _ci(correct, conf, 0.9, n_boot, seed),
                           "accuracy_at_90_coverage_by_ood": None, "n": int(correct.size)}
    if ood_score is not None:
        usual = -np.asarray(ood_score, dtype=float).reshape(-1)
        out["accuracy_by_ood"] = accuracy_at_coverage(correct, usual).tolist()
        out["accuracy_at_90_coverage_by_ood"] = float(accuracy_at_coverage(correct, usual, [0.9])[0])
    return out
