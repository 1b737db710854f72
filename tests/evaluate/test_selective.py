"""Selective prediction (accuracy against coverage) on hand-made cases with known answers."""
from __future__ import annotations

import numpy as np
import pytest

from oncotransfer.evaluate.selective import COVERAGES, accuracy_at_coverage, answered, selective_summary


def test_answered_rounds_up_and_never_answers_none():
    assert answered(0.9, 15) == 14 and answered(0.9, 10) == 9 and answered(0.05, 10) == 1 and answered(1.0, 7) == 7
    assert answered(0.01, 3) == 1


def test_accuracy_at_coverage_answers_the_most_confident_first():
    correct = np.array([1, 1, 0, 1, 0])
    score = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    np.testing.assert_allclose(accuracy_at_coverage(correct, score, [0.2, 0.4, 0.6, 0.8, 1.0]),
                               [1, 1, 2 / 3, 3 / 4, 3 / 5])
    perm = np.array([3, 0, 4, 2, 1])  # row order does not matter
    np.testing.assert_allclose(accuracy_at_coverage(correct[perm], score[perm], [0.6]), [2 / 3])


def test_ties_at_the_cut_count_at_their_mean_accuracy():
    correct, score = np.array([1, 0, 1, 1]), np.array([0.9, 0.9, 0.5, 0.5])
    # 1 answered from a tie of one right and one wrong: 0.5; 3 answered: 1 + one of the (right, right) tie
    np.testing.assert_allclose(accuracy_at_coverage(correct, score, [0.25, 0.5, 0.75, 1.0]), [0.5, 0.5, 2 / 3, 0.75])
    np.testing.assert_allclose(accuracy_at_coverage(correct[::-1], score[::-1], [0.25]), [0.5])
    # a NaN score is answered last
    np.testing.assert_allclose(accuracy_at_coverage(np.array([0, 1]), np.array([np.nan, 0.1]), [0.5]), [1.0])


def test_selective_summary_by_confidence_and_by_ood_score():
    y_true = np.array([0, 0, 1, 1, 0, 1, 0, 1, 0, 1])
    y_prob = np.array([[0.9, 0.1]] * 5 + [[0.2, 0.8]] * 5)  # rows 0-4 say 0, rows 5-9 say 1
    y_prob[:, 0] -= np.linspace(0, 0.05, 10)  # distinct confidences, highest first for rows 0-4
    y_prob[:, 1] = 1 - y_prob[:, 0]
    conf = y_prob.max(1)
    correct = (y_prob.argmax(1) == y_true).astype(float)  # wrong: rows 2, 3, 6, 8
    ood = np.array([0.1, 0.2, 5.0, 6.0, 0.3, 0.4, 7.0, 0.5, 8.0, 0.6])  # the wrong ones are the unusual ones
    s = selective_summary(y_true, y_prob, conf, ood, n_boot=0)
    assert s["coverage"] == list(COVERAGES) and s["n"] == 10 and s["accuracy_by_confidence"][-1] == 0.6
    np.testing.assert_allclose(s["accuracy_by_confidence"], accuracy_at_coverage(correct, conf, COVERAGES))
    assert s["accuracy_at_90_coverage"] == pytest.approx(accuracy_at_coverage(correct, conf, [0.9])[0])
    cov = np.array(COVERAGES)
    np.testing.assert_allclose(np.array(s["accuracy_by_ood"])[cov <= 0.6], 1.0)  # 6 usual ones, all right
    assert s["accuracy_at_90_coverage_by_ood"] == pytest.approx(6 / 9)  # 9 answered: the 6 right, 3 wrong
    assert s["accuracy_at_90_coverage_ci95"] is None
    plain = selective_summary(y_true, y_prob, conf, None, n_boot=200)
    assert plain["accuracy_by_ood"] is None and plain["accuracy_at_90_coverage_by_ood"] is None
    lo, hi = plain["accuracy_at_90_coverage_ci95"]
    assert 0 <= lo <= plain["accuracy_at_90_coverage"] <= hi <= 1
