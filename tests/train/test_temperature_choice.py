"""``choose_temperatures``: one pooled temperature unless every fold's validation subset is large enough, and a
fitted temperature at a bound of the search range is a warning."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.special import softmax

from oncotransfer.config import validate
from oncotransfer.errors import ConfigError, DataError
from oncotransfer.train.temperature import (MIN_VAL_ERRORS_PER_FOLD, MIN_VAL_PER_FOLD, T_MAX, T_MIN, at_bound,
                                            choose_temperatures, fit_temperature)


def _fold(n: int, t_true: float, seed: int, scale: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """n validation rows whose logits are ``t_true`` times too sharp (fitted T near ``t_true``)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, scale, (n, 2))
    y = (rng.random(n) < softmax(z, axis=1)[:, 1]).astype(int)
    return z * t_true, y


def test_small_folds_share_one_temperature_fitted_on_their_pooled_rows():
    val = {k: _fold(50, 1.5, k) for k in range(4)}
    c = choose_temperatures(val, sigmoid=False)
    z, y = np.concatenate([v[0] for v in val.values()]), np.concatenate([v[1] for v in val.values()])
    pooled = fit_temperature(z, y, False)
    assert c.temperatures == {str(k): pooled for k in range(4)}
    r = c.record
    assert r["mode"] == "pooled" and r["requested"] == "auto" and r["temperature"] == pooled
    assert r["n_val"] == {str(k): 50 for k in range(4)} and r["n_val_total"] == 200
    # the per-fold fits are kept for the report, and they scatter more than the pooled one misses by
    assert r["per_fold_fits"] == {str(k): fit_temperature(*val[k], False) for k in range(4)}
    assert "pooled validation subsets of 4 folds" in r["fitted_on"] and not c.warnings and r["at_bound"] == {}
    assert str(MIN_VAL_PER_FOLD) in r["rule"] and c.summary().startswith(f"calibration: T = {pooled:.3g}")


def test_large_folds_with_enough_errors_get_their_own_temperatures():
    val = {k: _fold(MIN_VAL_PER_FOLD + 50, t, k) for k, t in enumerate([0.6, 1.0, 2.0])}
    assert all(((z.argmax(1) != y).sum() >= MIN_VAL_ERRORS_PER_FOLD) for z, y in val.values())
    c = choose_temperatures(val, sigmoid=False)
    assert c.record["mode"] == "per_fold" and c.record["temperature"] is None
    assert c.temperatures == {str(k): fit_temperature(*val[k], False) for k in range(3)}
    assert c.temperatures["0"] < 0.8 < c.temperatures["1"] < 1.4 < c.temperatures["2"]
    assert choose_temperatures(val, False, "pooled").record["mode"] == "pooled"  # asked for, it is pooled


def test_large_folds_with_few_errors_are_pooled():
    """Most of the NLL's hold on T comes from the wrong predictions: 400 images but almost all right."""
    val = {k: _fold(400, 1.0, k, scale=12.0) for k in range(2)}
    assert all(len(y) >= MIN_VAL_PER_FOLD and (z.argmax(1) != y).sum() < MIN_VAL_ERRORS_PER_FOLD
               for z, y in val.values())
    assert choose_temperatures(val, sigmoid=False).record["mode"] == "pooled"


def test_per_fold_on_request_and_folds_without_validation_stay_uncalibrated():
    val = {0: _fold(30, 1.0, 0), 1: None, 2: _fold(30, 1.0, 2)}
    c = choose_temperatures(val, False, "per_fold")
    assert c.temperatures["1"] is None and c.temperatures["0"] != c.temperatures["2"]
    auto = choose_temperatures(val, False)
    assert auto.record["mode"] == "pooled" and auto.temperatures["1"] is None
    assert auto.temperatures["0"] == auto.temperatures["2"] and auto.record["n_val"]["1"] == 0
    none = choose_temperatures({0: None, 1: None}, False)
    assert none.temperatures == {"0": None, "1": None} and none.record["mode"] is None and none.summary() is None


def test_sigmoid_logits_are_pooled_too():
    rng = np.random.default_rng(0)
    val = {}
    for k in range(3):
        z = rng.normal(0, 2, (40, 1))
        val[k] = (z * 2.0, (rng.random(40) < 1 / (1 + np.exp(-z[:, 0]))).astype(int))
    c = choose_temperatures(val, sigmoid=True)
    pooled = fit_temperature(np.concatenate([v[0] for v in val.values()]), np.concatenate([v[1] for v in val.values()]),
                             True)
    assert c.temperatures == dict.fromkeys(["0", "1", "2"], pooled)


def test_a_temperature_at_a_bound_is_a_warning():
    assert at_bound(T_MIN) == at_bound(T_MIN * 1.01) == "lower" and at_bound(T_MAX * 0.99) == "upper"
    assert at_bound(1.0) is None and at_bound(None) is None
    # every validation prediction right: the loss falls all the way down, so the fit lands on T_MIN itself
    # (not on the first T where the loss rounds to zero: with margins of 9 that used to be 0.21)
    z = np.array([[2.0, -1.0], [-1.0, 2.0]] * 5)
    assert fit_temperature(z * 3, np.array([0, 1] * 5), False) == T_MIN
    right = {k: (z, np.array([0, 1] * 5)) for k in range(3)}
    c = choose_temperatures(right, sigmoid=False)
    assert c.record["at_bound"] == {"pooled": "lower"} and len(c.warnings) == 1
    assert "lower bound" in c.warnings[0] and "30 images" in c.warnings[0] and "\n" not in c.warnings[0]
    wrong = {0: (np.array([[2.0, -1.0], [-1.0, 2.0]] * 5), np.array([1, 0] * 5))}
    per = choose_temperatures({**right, 3: wrong[0]}, False, "per_fold")
    assert per.record["at_bound"] == {"0": "lower", "1": "lower", "2": "lower", "3": "upper"}
    assert len(per.warnings) == 4 and "fold 3" in per.warnings[3] and "upper bound" in per.warnings[3]


def test_bad_mode_is_one_line():
    with pytest.raises(DataError, match="auto, pooled, per_fold"):
        choose_temperatures({0: None}, False, "global")
    with pytest.raises(ConfigError, match=r"evaluate.calibration.*'global'") as err:
        validate({"evaluate": {"calibration": "global"}})
    assert "\n" not in str(err.value)
    assert validate({}).evaluate.calibration == "auto"
