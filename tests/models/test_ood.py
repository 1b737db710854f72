"""The out-of-distribution detectors: known answers, the registry, storage, the ensemble's combination."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from oncotransfer.errors import CheckpointError, ConfigError
from oncotransfer.models import ood as O


def _blobs(n=200, d=16, seed=0, dims=(0, 1)):
    """Features like pooled activations: most mass on a few dimensions (``dims``), a class shift on another."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    e = np.eye(d)
    f = rng.normal(size=(n, d)) + 5.0 * (e[dims[0]] + e[dims[1]]) + 3.0 * y[:, None] * e[2]
    return f.astype(np.float32), y


def test_knn_is_the_distance_to_the_kth_neighbour_on_unit_vectors():
    bank = np.array([[1, 0], [0, 1], [-1, 0]], np.float32)
    det = O.KNNDetector(torch.as_tensor(bank), k=2)
    q = torch.tensor([[2.0, 0.0]])  # normalised: (1, 0); neighbours at distances 0, sqrt 2, 2
    got = det(q, torch.zeros(1, 2)).item()
    assert got == pytest.approx(np.sqrt(2), abs=1e-6)
    assert O.KNNDetector(torch.as_tensor(bank), k=1)(q, torch.zeros(1, 2)).item() == pytest.approx(0, abs=1e-3)


def test_mahalanobis_is_the_smallest_class_distance():
    means = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    det = O.MahalanobisDetector(means, torch.eye(2) * 0.25)  # precision: covariance 4 I
    f = torch.tensor([[9.0, 2.0], [0.0, 0.0]])
    np.testing.assert_allclose(det(f, torch.zeros(2, 2)).numpy(), [(1 + 4) * 0.25, 0.0], atol=1e-5)


def test_energy_is_minus_logsumexp_and_handles_one_logit_heads():
    z = torch.tensor([[1.0, 2.0, 3.0]])
    assert O.EnergyDetector(False)(None, z).item() == pytest.approx(-float(torch.logsumexp(z, 1)), abs=1e-6)
    one = torch.tensor([[2.0]])
    assert O.EnergyDetector(True)(None, one).item() == pytest.approx(-np.log(1 + np.exp(2.0)), abs=1e-6)


@pytest.mark.parametrize("kind", ["knn", "mahalanobis"])
def test_fitted_detectors_score_far_points_higher(kind):
    f, y = _blobs()
    det = O.detector_fitter(kind)(f[:150], y[:150], False)
    near = det(torch.as_tensor(f[150:]), torch.zeros(50, 2)).numpy()
    other, _ = _blobs(50, seed=1, dims=(7, 8))  # the same kind of features, from somewhere else
    far = det(torch.as_tensor(other), torch.zeros(50, 2)).numpy()
    assert far.min() > np.quantile(near, 0.95)


def test_unknown_detector_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="evaluate.ood: unknown detector 'knnn' .*did you mean 'knn'.*knn, "
                                          "mahalanobis, energy"):
        O.detector_fitter("knnn")


def test_threshold_passes_the_share_asked_for():
    s = np.arange(100, dtype=float)
    t = O.threshold_for(s, 0.95)
    assert 0.95 <= np.mean(s <= t) <= 0.96


def test_saved_detectors_load_and_score_the_same(tmp_path):
    f, y = _blobs()
    dets = {k: O.detector_fitter("mahalanobis")(f[k::2], y[k::2], False) for k in (0, 1)}
    O.save_ood(tmp_path, dets, {0: 1.5, 1: 2.5}, {0: (100, 20), 1: (100, 20)}, "mahalanobis", 0.95, "features",
               [0.9, 0.6], (f[:10], {"images": 10}))
    scorer, meta, ref = O.load_ood(tmp_path, [0, 1])
    x = torch.as_tensor(f[:5])
    want = (dets[0](x, None) + dets[1](x, None)) / 2
    np.testing.assert_allclose(scorer([x, x], [None, None]).numpy(), want.numpy(), rtol=1e-6)
    assert scorer.threshold == 2.0 and meta.confidences == [0.6, 0.9] and ref.shape == (10, 16)
    one, _, _ = O.load_ood(tmp_path, [1])
    assert one.threshold == 2.5
    np.testing.assert_allclose(one([x], [None]).numpy(), dets[1](x, None).numpy(), rtol=1e-6)


def test_a_changed_tensor_file_is_one_line(tmp_path):
    f, y = _blobs()
    O.save_ood(tmp_path, {0: O.fit_knn(f, y)}, {0: 1.0}, {0: (200, 0)}, "knn", 0.95, "features")
    (tmp_path / O.OOD_TENSORS).write_bytes(b"damaged")
    with pytest.raises(CheckpointError, match="ood.safetensors: missing or not the file ood.json describes"):
        O.load_ood(tmp_path, [0])
    assert O.load_ood(tmp_path / "elsewhere", [0]) is None  # a run without a detector


def test_no_threshold_means_no_flags():
    s = O.OODScorer([O.EnergyDetector(False)], [None], "energy", 0.95)
    assert s.threshold is None and s.flags(np.array([1.0])) is None


def test_a_new_detector_is_one_class_and_one_function(tmp_path):
    """CONTRIBUTING.md's example: registered, fitted, saved and rebuilt with nothing else touched."""
    class CosineToMean(O.Detector):
        kind = "cosine"

        def __init__(self, mean: torch.Tensor):
            super().__init__()
            self.register_buffer("mean", mean)

        def forward(self, features, logits):
            return 1 - torch.nn.functional.cosine_similarity(features, self.mean[None], dim=1)

        def tensors(self):
            return {"mean": self.mean}

    @O.register_detector("cosine", CosineToMean)
    def _fit_cosine(features, labels, sigmoid=False):
        return CosineToMean(torch.as_tensor(features.mean(0), dtype=torch.float32))

    try:
        f, y = _blobs()
        det = O.detector_fitter("cosine")(f, y, False)
        O.save_ood(tmp_path, {0: det}, {0: 0.5}, {0: (200, 10)}, "cosine", 0.95, "features")
        scorer, meta, _ = O.load_ood(tmp_path, [0])
        x = torch.as_tensor(f[:4])
        np.testing.assert_allclose(scorer([x], [None]).numpy(), det(x, None).numpy(), rtol=1e-6)
        assert meta.detector == "cosine"
    finally:
        O.DETECTORS.pop("cosine", None)
        O._CLASSES.pop("cosine", None)
