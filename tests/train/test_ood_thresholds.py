"""One out-of-distribution threshold from the pooled validation scores of all folds."""
from __future__ import annotations

import numpy as np

from oncotransfer.models.ood import EnergyDetector, threshold_for
from oncotransfer.train.ood import FoldOOD, pool_thresholds


def _fold(val: np.ndarray | None) -> FoldOOD:
    thr = None if val is None else threshold_for(val, 0.95)
    return FoldOOD(EnergyDetector(False), thr, np.zeros(3), 10, 0 if val is None else len(val), None, None, val)


def test_thresholds_are_pooled_and_the_per_fold_ones_kept():
    rng = np.random.default_rng(0)
    vals = [rng.normal(size=50) for _ in range(5)]
    oods = {k: _fold(v) for k, v in enumerate(vals)}
    own = pool_thresholds(oods, 0.95)
    pooled = threshold_for(np.concatenate(vals), 0.95)
    assert all(o.threshold == pooled for o in oods.values())
    assert own == {str(k): threshold_for(v, 0.95) for k, v in enumerate(vals)}
    assert np.mean(np.concatenate(vals) <= pooled) >= 0.95


def test_a_fold_without_validation_scores_leaves_every_threshold_alone():
    oods = {0: _fold(np.arange(20.0)), 1: _fold(None)}
    assert pool_thresholds(oods, 0.95) is None
    assert oods[0].threshold == threshold_for(np.arange(20.0), 0.95) and oods[1].threshold is None
