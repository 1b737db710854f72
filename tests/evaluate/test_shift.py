"""The dataset-shift test fires on a real shift, stays quiet (at its level) without one, and ignores duplicates."""
from __future__ import annotations

import numpy as np
import pytest

from oncotransfer.errors import DataError
from oncotransfer.evaluate.shift import (collapse_duplicates, gaussian_kernel, group_representatives,
                                         mmd2_permutations, shift_test)

D = 16


def _sample(rng: np.random.Generator, n: int, shift: float = 0.0, scale: np.ndarray | None = None) -> np.ndarray:
    """Positive-mean correlated features, like pooled CNN activations; ``shift`` moves the mean along one
    direction, ``scale`` stretches some axes (a different covariance)."""
    mix = np.random.default_rng(99).normal(size=(D, D)) / np.sqrt(D)  # the same correlation on both sides
    z = rng.normal(size=(n, D))
    if scale is not None:
        z = z * scale
    x = 2.0 + z @ mix
    x[:, 0] += shift
    return x


def test_no_shift_gives_few_false_alarms():
    ps = [shift_test(_sample(np.random.default_rng(s), 60), _sample(np.random.default_rng(1000 + s), 40),
                     permutations=200, random_state=s).p_value for s in range(40)]
    assert sum(p < 0.05 for p in ps) <= 4  # an exact test at 5%: about 2 of 40 expected
    assert 0.25 < np.median(ps) < 0.75  # p-values spread over (0, 1), not piled up at either end


def test_a_mean_shift_is_detected():
    rng = np.random.default_rng(1)
    r = shift_test(_sample(rng, 60), _sample(rng, 40, shift=1.0), permutations=200)
    assert r.p_value < 0.01 and r.differs(0.01)
    assert r.domain_auc > 0.75
    assert "the external images differ from the training data" in r.line()


def test_a_different_covariance_is_detected():
    rng = np.random.default_rng(2)
    scale = np.r_[np.full(4, 3.0), np.ones(D - 4)]  # same mean, some axes three times as spread
    r = shift_test(_sample(rng, 60), _sample(rng, 40, scale=scale), permutations=200)
    assert r.p_value < 0.01


def test_no_shift_reads_as_no_evidence():
    r = shift_test(_sample(np.random.default_rng(3), 60), _sample(np.random.default_rng(4), 40), permutations=200)
    assert not r.differs(0.01)
    assert 0.3 < r.domain_auc < 0.7
    line = r.line()
    assert line.startswith("dataset shift: MMD² ") and "(permutation, 200), 40 external vs 60 reference images" in line
    assert line.endswith("no evidence that the external images differ from the training data")


def test_collapse_duplicates_keeps_the_first_row_of_each_group():
    x = np.arange(12.0).reshape(6, 2)
    groups = np.array([2, 0, 2, 1, 0, 3])
    assert group_representatives(groups).tolist() == [0, 1, 3, 5]
    assert collapse_duplicates(x, groups).tolist() == x[[0, 1, 3, 5]].tolist()
    with pytest.raises(DataError, match="N group ids"):
        collapse_duplicates(x, groups[:5])


def test_near_duplicates_raise_false_alarms_until_collapsed():
    raw, collapsed = [], []
    for seed in range(5):
        rng = np.random.default_rng(seed)
        copies = np.repeat(_sample(rng, 15), 4, axis=0) + rng.normal(scale=0.01, size=(60, D))  # each saved 4x
        groups = np.repeat(np.arange(15), 4)
        reference = _sample(rng, 100)  # the same distribution
        raw.append(shift_test(reference, copies, permutations=200).p_value)
        collapsed.append(shift_test(reference, collapse_duplicates(copies, groups), permutations=200).p_value)
    assert max(raw) < 0.05  # the copies look like a tighter distribution: a false alarm every time
    assert min(collapsed) > 0.05


def test_fixed_random_state_is_deterministic_and_subsampling_caps_each_side():
    rng = np.random.default_rng(6)
    a, b = _sample(rng, 80), _sample(rng, 70, shift=0.3)
    r1 = shift_test(a, b, permutations=100, max_per_side=50, random_state=7)
    r2 = shift_test(a, b, permutations=100, max_per_side=50, random_state=7)
    assert r1 == r2
    assert (r1.n_reference, r1.n_external) == (50, 50)
    others = {shift_test(a, b, permutations=100, max_per_side=50, random_state=s).statistic for s in range(8, 12)}
    assert len(others) > 1  # another seed draws other subsamples


def test_the_matrix_form_matches_the_textbook_unbiased_mmd_and_permutes_labels():
    rng = np.random.default_rng(8)
    z = rng.normal(size=(12, 3))
    k = gaussian_kernel(z)
    assert np.allclose(np.diag(k), 0) and np.allclose(k, k.T)
    n, m = 5, 7
    kxx, kyy, kxy = k[:n, :n], k[n:, n:], k[:n, n:]
    expected = kxx.sum() / (n * (n - 1)) + kyy.sum() / (m * (m - 1)) - 2 * kxy.mean()
    observed, null = mmd2_permutations(k, n, 300, rng)
    assert observed == pytest.approx(expected)
    perm = np.r_[np.arange(n, n + m), np.arange(n)]  # swapping the sides is one relabelling: same value
    swapped, _ = mmd2_permutations(k[np.ix_(perm, perm)], m, 0, rng)
    assert swapped == pytest.approx(expected)
    assert null.shape == (300,) and len(np.unique(null.round(12))) > 50


@pytest.mark.parametrize("ref, ext, match", [
    (np.zeros(20), np.zeros((20, 3)), "2-D array"),
    (np.zeros((20, 3)), np.zeros((20, 4)), "4; compute both with the same backbone"),
    (np.zeros((20, 3)), np.zeros((3, 3)), "3 external image"),
    (np.full((20, 3), np.nan), np.zeros((20, 3)), "NaN"),
])
def test_bad_inputs_are_one_line_errors(ref, ext, match):
    with pytest.raises(DataError, match=match) as e:
        shift_test(ref, ext, permutations=10)
    assert "\n" not in str(e.value)
