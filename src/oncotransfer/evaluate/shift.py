"""Do the external images come from the training images' distribution? A two-sample test on image features.

Rabanser et al. ("Failing loudly", NeurIPS 2019) found a kernel two-sample test (MMD) on a low-dimensional
representation of the features the most reliable detector of dataset shift. ``shift_test`` is that test:

- rows are L2-normalised: CNN embeddings are compared by direction, and the norm of a pooled feature vector
  mostly follows nuisance such as contrast or field of view, which would otherwise dominate the first component
  and the kernel bandwidth;
- PCA (at most 32 components) and the kernel bandwidth (median heuristic) are fitted on the pooled sample, so
  they do not depend on which row came from which side: permuting the side labels leaves them unchanged and the
  permutation test stays exact;
- the statistic is the unbiased MMD² with a Gaussian kernel; its permutation p-value
  ``(1 + #{permuted >= observed}) / (1 + permutations)`` comes from one kernel matrix (every permutation is a
  product with an indicator vector, no kernel recomputation);
- the effect size people can read is the cross-validated AUC of a logistic-regression domain classifier on the
  same reduced features (0.5: indistinguishable, 1: perfectly separable).

The test assumes independent rows: near-duplicates inside one side (the same lesion saved twice) make that side
look tighter than the population and raise false alarms, so collapse them first (``collapse_duplicates``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial.distance import pdist, squareform
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict

from oncotransfer.errors import DataError

MIN_PER_SIDE = 10
"""Fewer images on a side give a permutation test with too little power to say anything either way."""
MAX_COMPONENTS = 32
_PERMUTATION_CHUNK = 128  # permutations per matrix product: bounds memory at chunk x pooled size floats


@dataclass(frozen=True)
class ShiftResult:
    """The outcome of ``shift_test``; ``line()`` is the sentence for the terminal and the report."""
    statistic: float
    """Unbiased MMD² between the two samples (can be slightly negative when they do not differ)."""
    p_value: float
    """Permutation p-value, at least 1 / (1 + permutations)."""
    permutations: int
    n_reference: int
    """Reference rows tested (after any subsampling to ``max_per_side``)."""
    n_external: int
    domain_auc: float
    """Cross-validated AUC of a classifier telling external from reference rows: 0.5 none, 1.0 complete."""
    components: int
    method: str

    def differs(self, alpha: float = 0.01) -> bool:
        return self.p_value < alpha

    def line(self, alpha: float = 0.01) -> str:
        """One sentence: statistic, p-value, sample sizes, effect size and the verdict at ``alpha``."""
        stat = f"{self.statistic:.3f}".replace("-0.000", "0.000")  # the unbiased estimate dips below 0 by noise
        p = f"{self.p_value:.3f}" if self.p_value >= 0.0005 else f"{self.p_value:.1e}"
        verdict = ("the external images differ from the training data" if self.differs(alpha)
                   else "no evidence that the external images differ from the training data")
        return (f"dataset shift: MMD² {stat}, p = {p} (permutation, {self.permutations}), "
                f"{self.n_external} external vs {self.n_reference} reference images, domain classifier AUC "
                f"{self.domain_auc:.2f}: {verdict}")


def group_representatives(groups: np.ndarray) -> np.ndarray:
    """Sorted row indices holding the first row of each group."""
    groups = np.asarray(groups)
    if groups.ndim != 1:
        raise DataError(f"duplicate groups must be one id per image, got shape {groups.shape}")
    return np.sort(np.unique(groups, return_index=True)[1])


def collapse_duplicates(features: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """One row per near-duplicate group (its first), so the shift test sees independent images. ``groups`` is
    one id per row, e.g. ``data.manifest.duplicate_groups(sha256, phash)`` (identical bytes or pHash within
    ``data.overlap.NEAR_BITS`` bits, the rule the splits use)."""
    features = np.asarray(features)
    if features.ndim != 2 or len(groups) != len(features):
        raise DataError(f"collapse_duplicates needs (N, D) features and N group ids, got {features.shape} "
                        f"and {len(groups)} ids")
    return features[group_representatives(groups)]


def _checked(x: np.ndarray, side: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise DataError(f"shift test: {side} features must be a 2-D array (images x features), got shape {x.shape}")
    if len(x) < MIN_PER_SIDE:
        raise DataError(f"shift test: {len(x)} {side} image(s); it needs at least {MIN_PER_SIDE} on each side "
                        "to say anything, so add images or leave the test out")
    if not np.isfinite(x).all():
        raise DataError(f"shift test: the {side} features hold NaN or infinite values")
    return x


def _subsample(x: np.ndarray, cap: int, rng: np.random.Generator) -> np.ndarray:
    return x if len(x) <= cap else x[np.sort(rng.choice(len(x), cap, replace=False))]


def reduce_features(pooled: np.ndarray, components: int = MAX_COMPONENTS, random_state: int = 0) -> np.ndarray:
    """L2-normalised rows projected on the pooled sample's leading principal components (label-free)."""
    norms = np.linalg.norm(pooled, axis=1, keepdims=True)
    unit = pooled / np.where(norms > 0, norms, 1.0)
    k = max(1, min(components, unit.shape[1], len(unit) - 1))
    return PCA(k, svd_solver="full", random_state=random_state).fit_transform(unit)


def gaussian_kernel(z: np.ndarray) -> np.ndarray:
    """exp(-d² / (2 σ²)) with σ² the median squared pairwise distance of the pooled rows (median heuristic),
    with a zero diagonal: the unbiased MMD² leaves the self-similarities out."""
    d2 = pdist(z, "sqeuclidean")
    med = float(np.median(d2)) if len(d2) else 0.0
    return squareform(np.exp(-d2 / (2 * med)) if med > 0 else np.ones_like(d2), checks=False)


def mmd2_permutations(k0: np.ndarray, n: int, permutations: int, rng: np.random.Generator
                      ) -> tuple[float, np.ndarray]:
    """(unbiased MMD² of rows [:n] against rows [n:], the statistic under ``permutations`` random relabellings).
    ``k0`` is the pooled kernel matrix with a zero diagonal."""
    size = len(k0)
    m = size - n
    total = k0.sum()

    def stats(a: np.ndarray) -> np.ndarray:
        # a: (B, size) 0/1 indicators of side one. a K a' sums K_XX, a K (1 - a)' sums K_XY, and the rest is K_YY.
        ak = a @ k0
        xx = np.einsum("ij,ij->i", ak, a)
        xy = ak.sum(axis=1) - xx
        yy = total - xx - 2 * xy
        return xx / (n * (n - 1)) + yy / (m * (m - 1)) - 2 * xy / (n * m)

    first = np.zeros((1, size))
    first[0, :n] = 1
    observed = float(stats(first)[0])
    null = []
    for s in range(0, permutations, _PERMUTATION_CHUNK):
        b = min(_PERMUTATION_CHUNK, permutations - s)
        a = np.zeros((b, size))
        order = rng.permuted(np.tile(np.arange(size), (b, 1)), axis=1)
        np.put_along_axis(a, order[:, :n], 1.0, axis=1)
        null.append(stats(a))
    return observed, (np.concatenate(null) if null else np.zeros(0))


def domain_auc(z: np.ndarray, side: np.ndarray, random_state: int = 0) -> float:
    """Cross-validated (stratified 5-fold) AUC of logistic regression predicting ``side`` from ``z``."""
    folds = StratifiedKFold(min(5, int(np.bincount(side).min())), shuffle=True, random_state=random_state)
    clf = LogisticRegression(max_iter=1000, class_weight="balanced")
    scores = cross_val_predict(clf, z, side, cv=folds, method="decision_function")
    return float(roc_auc_score(side, scores))


def shift_test(reference: np.ndarray, external: np.ndarray, permutations: int = 1000, max_per_side: int = 500,
               random_state: int = 0, components: int = MAX_COMPONENTS) -> ShiftResult:
    """MMD two-sample permutation test of ``external`` feature rows against ``reference`` rows (both (N, D),
    one row per independent image: see ``collapse_duplicates``). Each side is subsampled at random to
    ``max_per_side`` rows, which bounds the kernel matrix at (2 x max_per_side)² floats."""
    ref, ext = _checked(reference, "reference"), _checked(external, "external")
    if ref.shape[1] != ext.shape[1]:
        raise DataError(f"shift test: reference features have {ref.shape[1]} columns but external ones "
                        f"{ext.shape[1]}; compute both with the same backbone")
    if permutations < 1 or max_per_side < MIN_PER_SIDE:
        raise DataError(f"shift test: permutations must be >= 1 and max_per_side >= {MIN_PER_SIDE}")
    rng = np.random.default_rng(random_state)
    ref, ext = _subsample(ref, max_per_side, rng), _subsample(ext, max_per_side, rng)
    z = reduce_features(np.vstack([ref, ext]), components, random_state)
    observed, null = mmd2_permutations(gaussian_kernel(z), len(ref), permutations, rng)
    # a relabelling that reproduces the observed split must count as reaching it despite summation order
    p = (1 + int(np.count_nonzero(null >= observed - 1e-12))) / (1 + permutations)
    side = np.r_[np.zeros(len(ref), int), np.ones(len(ext), int)]
    method = (f"unbiased MMD² with a Gaussian kernel (median-heuristic bandwidth) on {z.shape[1]} principal "
              f"components of the L2-normalised features (PCA on the pooled sample), permutation p-value from "
              f"{permutations} relabellings; at most {max_per_side} images per side; effect size: 5-fold "
              f"cross-validated AUC of a logistic-regression domain classifier")
    return ShiftResult(observed, p, permutations, len(ref), len(ext), domain_auc(z, side, random_state),
                       z.shape[1], method)
