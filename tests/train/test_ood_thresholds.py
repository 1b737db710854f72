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
    assert own == {str(k): threshold_for(v, 0.95) for k, v in enumerate(vals)}
    assert len({o.threshold for o in oods.values()}) == 1  # one scale (k-NN distances): one threshold
    flags = np.concatenate([v <= oods[k].threshold for k, v in enumerate(vals)])
    assert 0.95 <= flags.mean() <= 0.96  # the pass rate over every fold's validation images


def test_each_fold_keeps_its_own_scale():
    """Folds whose scores differ in scale (Mahalanobis, energy) each get the same pass rate, not one cut."""
    rng = np.random.default_rng(1)
    vals = [rng.normal(size=60) * s + c for s, c in ((1, 0), (10, 100), (0.1, -5))]
    oods = {k: _fold(v) for k, v in enumerate(vals)}
    pool_thresholds(oods, 0.95, same_scale=False)
    for k, v in enumerate(vals):
        assert 0.85 <= np.mean(v <= oods[k].threshold) <= 1.0


def test_a_fold_without_validation_scores_leaves_every_threshold_alone():
    oods = {0: _fold(np.arange(20.0)), 1: _fold(None)}
    assert pool_thresholds(oods, 0.95) is None
    assert oods[0].threshold == threshold_for(np.arange(20.0), 0.95) and oods[1].threshold is None
