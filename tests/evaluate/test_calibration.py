"""Temperature scaling and ECE on hand-made cases with known answers."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.special import expit, softmax

from oncotransfer.evaluate.calibration import ece_bootstrap_ci, expected_calibration_error
from oncotransfer.train.temperature import T_MAX, T_MIN, fit_temperature


def _binary(conf: float, n: int, n_correct: int) -> tuple[np.ndarray, np.ndarray]:
    """n predictions of class 1 with confidence ``conf``, ``n_correct`` of them right."""
    prob = np.tile([1 - conf, conf], (n, 1))
    y = np.r_[np.ones(n_correct, int), np.zeros(n - n_correct, int)]
    return y, prob


def test_ece_is_zero_when_confidence_matches_accuracy():
    y1, p1 = _binary(0.7, 100, 70)
    y2, p2 = _binary(0.9, 50, 45)
    y = np.r_[y1, y2]
    assert expected_calibration_error(y, np.r_[p1, p2]) == pytest.approx(0.0, abs=1e-12)
    assert expected_calibration_error(np.arange(3), np.eye(3)) == pytest.approx(0.0)  # confidence 1, all right


def test_ece_of_overconfident_predictions():
    y, p = _binary(0.9, 100, 60)  # says 90%, right 60% of the time
    assert expected_calibration_error(y, p) == pytest.approx(0.3)
    # two bins: |0.95 - 1.0| on half the rows, |0.65 - 0.5| on the other half
    y1, p1 = _binary(0.95, 10, 10)
    y2, p2 = _binary(0.65, 10, 5)
    assert expected_calibration_error(np.r_[y1, y2], np.r_[p1, p2]) == pytest.approx(0.5 * 0.05 + 0.5 * 0.15)
    # one bin holding both (0.5, 1]: |mean confidence 0.8 - accuracy 0.75|
    assert expected_calibration_error(np.r_[y1, y2], np.r_[p1, p2], n_bins=1) == pytest.approx(0.05)


def test_ece_top_label_for_three_classes():
    prob = np.array([[0.6, 0.3, 0.1], [0.2, 0.6, 0.2], [0.1, 0.3, 0.6], [0.6, 0.2, 0.2]])
    y = np.array([0, 1, 2, 1])  # confidence 0.6 everywhere, 3 of 4 right
    assert expected_calibration_error(y, prob) == pytest.approx(0.15)


def _synthetic(n: int, c: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose softmax is the true label distribution (calibrated at T = 1)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 2.0, (n, c))
    p = softmax(z, axis=1)
    y = (rng.random((n, 1)) > p.cumsum(1)).sum(1)
    return z, y


@pytest.mark.parametrize("t_true", [0.5, 2.5])
def test_fit_temperature_recovers_a_known_temperature_softmax(t_true):
    z, y = _synthetic(20000, 3)
    t = fit_temperature(z * t_true, y, sigmoid=False)  # logits t_true times too sharp (or too flat)
    assert t == pytest.approx(t_true, rel=0.05)
    assert fit_temperature(z * t_true, y, sigmoid=False) == t  # deterministic


@pytest.mark.parametrize("t_true", [0.4, 3.0])
def test_fit_temperature_recovers_a_known_temperature_sigmoid(t_true):
    rng = np.random.default_rng(1)
    z = rng.normal(0, 2.5, 20000)
    y = (rng.random(20000) < 1 / (1 + np.exp(-z))).astype(int)
    assert fit_temperature((z * t_true)[:, None], y, sigmoid=True) == pytest.approx(t_true, rel=0.05)


def test_fit_temperature_is_bounded_and_lowers_nll():
    from oncotransfer.train.temperature import _nll
    z = np.array([[1.0, -1.0], [-0.8, 0.8]])
    t = fit_temperature(z, np.array([0, 1]), sigmoid=False)  # separable: sharper is always better
    assert T_MIN <= t < 0.2 and _nll(z, np.array([0, 1]), False, t) < _nll(z, np.array([0, 1]), False, 1.0)
    assert T_MAX * 0.99 <= fit_temperature(z, np.array([1, 0]), sigmoid=False) <= T_MAX  # all wrong: flattest


def test_head_probabilities_divide_logits_by_the_temperature():
    import torch
    from oncotransfer.config import HeadConfig
    from oncotransfer.models.heads import create_head
    z = torch.randn(6, 3)
    head = create_head(HeadConfig(), 4, 3)
    np.testing.assert_allclose(head.probabilities(z, 1.7).numpy(), softmax(z.numpy() / 1.7, axis=1),
                               atol=1e-6)
    sig = create_head(HeadConfig(sigmoid=True), 4, 2)
    z1 = torch.randn(6, 1)
    p1 = expit(z1.numpy() / 0.6)
    np.testing.assert_allclose(sig.probabilities(z1, 0.6).numpy(), np.hstack([1 - p1, p1]), atol=1e-6)
    assert torch.equal(head.probabilities(z), torch.softmax(z, 1))  # no temperature: unchanged


def test_ece_bootstrap_interval_is_the_percentiles_of_resampled_eces():
    rng = np.random.default_rng(3)
    p1 = rng.uniform(0.5, 1.0, 40)
    y_prob = np.stack([p1, 1 - p1], 1)
    y_true = (rng.random(40) < 0.3).astype(int)
    rows = np.random.default_rng(0).integers(0, 40, size=(300, 40))  # the resamples seed 0 draws
    ref = np.percentile([expected_calibration_error(y_true[r], y_prob[r]) for r in rows], [2.5, 97.5])
    np.testing.assert_allclose(ece_bootstrap_ci(y_true, y_prob, n_boot=300), ref, rtol=1e-12)
    assert ece_bootstrap_ci(np.arange(3), np.eye(3), n_boot=50) == [0.0, 0.0]  # right and sure in every resample
    assert ece_bootstrap_ci(y_true, y_prob, n_boot=0) is None
