"""Out-of-distribution detectors on the features a head reads (and its logits): a registry of fitted scorers.

Every detector is an ``nn.Module`` mapping ``(features, logits)`` to one score per image, higher meaning more
unusual, so the same module runs in PyTorch, in the exported ONNX graph and in every fold of an ensemble.
A detector is fitted on the training images of its fold only; its threshold (the score that a chosen share of
the fold's *validation* images stays under) is set by the caller (``train.ood``).

- ``knn``: distance to the k-th nearest training image on L2-normalised features (Sun et al., ICML 2022).
- ``mahalanobis``: smallest class-conditional Mahalanobis distance, one shared covariance with Ledoit-Wolf
  shrinkage (Lee et al., NeurIPS 2018; shrinkage because the features outnumber the images here).
- ``energy``: the negative free energy ``-logsumexp(logits)`` (Liu et al., NeurIPS 2020); needs no fitting.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from oncotransfer.errors import CheckpointError, ConfigError, DataError
from oncotransfer.io import atomic_save_tensors, read_tensors, sha256_file
from oncotransfer.rundir import OODMeta, read_ood_meta, write_ood_meta

KNN_K = 5
"""Neighbours of the k-NN detector. Sun et al. use k = 50 on 50,000 images; with a few hundred training images
(a fold here) the k-th neighbour must stay within the same near-duplicate-free neighbourhood, so k is small."""


class Detector(nn.Module):
    """``forward(features, logits) -> (N,)`` scores; ``tensors()`` and ``params()`` rebuild it (``load``).
    ``same_scale``: scores of detectors fitted on different folds are on one scale (thresholds may be pooled
    as they are); otherwise each fold's scores are standardised first (``train.ood.pool_thresholds``)."""
    kind: str = ""
    same_scale: bool = False

    def params(self) -> dict[str, float | int | bool]:
        return {}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {}


class KNNDetector(Detector):
    kind = "knn"
    same_scale = True  # a distance between unit vectors, in [0, 2], whatever the fold

    def __init__(self, bank: torch.Tensor, k: int = KNN_K):
        super().__init__()
        self.register_buffer("bank", _l2(bank.float()))
        self.k = int(max(1, min(k, len(bank))))

    def forward(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        sims = _l2(features.float()) @ self.bank.T
        kth = torch.topk(sims, self.k, dim=1).values[:, -1]
        # |u - v|^2 = 2 - 2 u.v for unit vectors; clamped because rounding can make it a hair below 0
        return torch.sqrt(torch.clamp(2.0 - 2.0 * kth, min=0.0))

    def params(self) -> dict[str, float | int | bool]:
        return {"k": self.k}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"bank": self.bank}


class MahalanobisDetector(Detector):
    kind = "mahalanobis"

    def __init__(self, means: torch.Tensor, precision: torch.Tensor):
        super().__init__()
        self.register_buffer("means", means.float())
        self.register_buffer("precision", precision.float())

    def forward(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        f = features.float()
        fp = f @ self.precision
        # (f - m) P (f - m) = fPf - 2 fPm + mPm, for every class mean m at once
        quad = (fp * f).sum(1, keepdim=True) - 2.0 * fp @ self.means.T \
            + ((self.means @ self.precision) * self.means).sum(1)[None, :]
        return torch.clamp(quad.min(dim=1).values, min=0.0)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"means": self.means, "precision": self.precision}


class EnergyDetector(Detector):
    kind = "energy"

    def __init__(self, sigmoid: bool):
        super().__init__()
        self.sigmoid = bool(sigmoid)

    def forward(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        z = logits.float()
        if self.sigmoid:  # one logit z is the two-class softmax of (0, z)
            z = torch.cat([torch.zeros_like(z.reshape(-1, 1)), z.reshape(-1, 1)], dim=1)
        return -torch.logsumexp(z, dim=1)

    def params(self) -> dict[str, float | int | bool]:
        return {"sigmoid": self.sigmoid}


def _l2(x: torch.Tensor) -> torch.Tensor:
    return x / torch.clamp(torch.linalg.vector_norm(x, dim=1, keepdim=True), min=1e-12)


# -- the registry: name -> fit(features, labels, sigmoid) --------------------------------------------------------
Fitter = Callable[[np.ndarray, np.ndarray, bool], Detector]
DETECTORS: dict[str, Fitter] = {}
"""evaluate.ood -> a function fitting that detector on one fold's training features; a new detector is one
registered function (and a ``Detector`` subclass that ``load_detector`` can rebuild)."""
_CLASSES: dict[str, type[Detector]] = {}


def register_detector(kind: str, cls: type[Detector]) -> Callable[[Fitter], Fitter]:
    def add(fn: Fitter) -> Fitter:
        DETECTORS[kind] = fn
        _CLASSES[kind] = cls
        return fn
    return add


def detector_fitter(kind: str) -> Fitter:
    """The registered fitter of ``evaluate.ood``; an unknown name lists the valid ones."""
    if kind not in DETECTORS:
        close = difflib.get_close_matches(kind, DETECTORS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"evaluate.ood: unknown detector {kind!r}{hint}; expected one of "
                          f"{', '.join(DETECTORS)} or none")
    return DETECTORS[kind]


def _check(features: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels).astype(int).reshape(-1)
    if f.ndim != 2 or len(f) != len(y) or len(f) < 2:
        raise DataError(f"out-of-distribution fit: need (N, D) features for N >= 2 labelled images, got "
                        f"{f.shape} features and {len(y)} labels")
    return f, y


@register_detector("knn", KNNDetector)
def fit_knn(features: np.ndarray, labels: np.ndarray, sigmoid: bool = False) -> Detector:
    f, _ = _check(features, labels)
    return KNNDetector(torch.as_tensor(f, dtype=torch.float32))


@register_detector("mahalanobis", MahalanobisDetector)
def fit_mahalanobis(features: np.ndarray, labels: np.ndarray, sigmoid: bool = False) -> Detector:
    from sklearn.covariance import LedoitWolf
    f, y = _check(features, labels)
    classes = np.unique(y)
    means = np.stack([f[y == c].mean(0) for c in classes])
    centred = f - means[np.searchsorted(classes, y)]
    precision = LedoitWolf(assume_centered=True).fit(centred).get_precision()
    return MahalanobisDetector(torch.as_tensor(means, dtype=torch.float32),
                               torch.as_tensor(precision, dtype=torch.float32))


@register_detector("energy", EnergyDetector)
def fit_energy(features: np.ndarray, labels: np.ndarray, sigmoid: bool = False) -> Detector:
    return EnergyDetector(sigmoid)


def load_detector(kind: str, params: dict, tensors: dict[str, torch.Tensor]) -> Detector:
    """Rebuild a saved detector from its kind, ``params()`` and ``tensors()``."""
    detector_fitter(kind)
    cls = _CLASSES[kind]
    if cls is KNNDetector:
        return KNNDetector(tensors["bank"], int(params.get("k", KNN_K)))
    if cls is MahalanobisDetector:
        return MahalanobisDetector(tensors["means"], tensors["precision"])
    if cls is EnergyDetector:
        return EnergyDetector(bool(params.get("sigmoid", False)))
    return cls(**params, **tensors)  # a registered detector whose constructor takes its params and tensors


def threshold_for(val_scores: np.ndarray, pass_rate: float) -> float:
    """The score that ``pass_rate`` of the validation images stay at or under (higher = flagged)."""
    s = np.asarray(val_scores, dtype=np.float64)
    if len(s) == 0:
        raise DataError("out-of-distribution threshold: no validation scores")
    return float(np.quantile(s, pass_rate, method="higher"))


class OODScorer(nn.Module):
    """One detector per ensemble member, applied to that member's features and logits; the ensemble's score is
    the mean of the members' scores and its threshold the mean of theirs (so "mean score above mean threshold"
    is "above threshold on average"). One member is exactly that member's detector and threshold."""

    def __init__(self, detectors: list[Detector], thresholds: list[float | None], kind: str, pass_rate: float):
        super().__init__()
        if not detectors or len(detectors) != len(thresholds):
            raise ValueError("one threshold per detector, at least one detector")
        self.detectors = nn.ModuleList(detectors)
        self.thresholds = list(thresholds)
        self.kind = kind
        self.pass_rate = float(pass_rate)

    @property
    def threshold(self) -> float | None:
        """None when some member has no threshold (it had no validation images of its own)."""
        if any(t is None for t in self.thresholds):
            return None
        return float(np.mean(self.thresholds))

    def forward(self, features: list[torch.Tensor], logits: list[torch.Tensor]) -> torch.Tensor:
        scores = [d(f, z) for d, f, z in zip(self.detectors, features, logits)]
        return scores[0] if len(scores) == 1 else torch.stack(scores).mean(0)

    def flags(self, scores: np.ndarray) -> np.ndarray | None:
        """True = in distribution (score at or under the threshold); None without a threshold."""
        t = self.threshold
        return None if t is None else np.asarray(scores) <= t


# -- storage: checkpoint/ood.safetensors + ood.json (typed, atomic) ----------------------------------------------
OOD_TENSORS = "ood.safetensors"


def save_ood(checkpoint_dir: str | Path, detectors: dict[int, Detector], thresholds: dict[int, float | None],
             counts: dict[int, tuple[int, int]], kind: str, pass_rate: float, features: str,
             confidences: list[float] | None = None, reference: tuple[np.ndarray, dict] | None = None,
             thresholds_info: dict | None = None) -> None:
    """Write every fold's detector (tensors first, then the JSON naming their digest: a reader never pairs
    one version's JSON with another's tensors). ``reference``: (features, description) for the shift check."""
    out = Path(checkpoint_dir)
    tensors = {f"fold{k}.{name}": t for k, d in detectors.items() for name, t in d.tensors().items()}
    if reference is not None:
        tensors["shift.reference"] = torch.as_tensor(np.asarray(reference[0], dtype=np.float32))
    if not tensors:  # safetensors needs one tensor; energy keeps none
        tensors["empty"] = torch.zeros(1)
    atomic_save_tensors(tensors, out / OOD_TENSORS, {"format": "oncotransfer-ood/1"})
    first = next(iter(detectors.values()))
    write_ood_meta(out, {
        "detector": kind, "pass_rate": float(pass_rate), "params": first.params(), "features": features,
        "members": [{"fold": k, "threshold": thresholds[k], "n_fit": counts[k][0], "n_val": counts[k][1]}
                    for k in sorted(detectors)],
        "confidences": sorted(float(c) for c in (confidences or [])),
        "reference": None if reference is None else reference[1], "thresholds": thresholds_info,
        "tensors_sha256": sha256_file(out / OOD_TENSORS)})


def load_ood(checkpoint_dir: str | Path, folds: list[int]
             ) -> tuple[OODScorer, OODMeta, np.ndarray | None] | None:
    """``(OODScorer over ``folds``, OODMeta, shift reference features or None)``, or None for a run without a
    detector. A tensor file that does not match its JSON is a one-line error naming the file."""
    ckpt = Path(checkpoint_dir)
    meta = read_ood_meta(ckpt)
    if meta is None:
        return None
    path = ckpt / OOD_TENSORS
    if not path.is_file() or sha256_file(path) != meta.tensors_sha256:
        raise CheckpointError(f"{path}: missing or not the file ood.json describes (digest differs); copy the "
                              "whole run directory again, or retrain to rebuild the detector")
    tensors, _ = read_tensors(path)
    by_fold = {m.fold: m for m in meta.members}
    missing = [k for k in folds if k not in by_fold]
    if missing:
        raise CheckpointError(f"{ckpt}/ood.json: no detector for fold(s) "
                              f"{missing}; retrain the run to rebuild its detectors")
    dets = []
    for k in folds:
        own = {name.split(".", 1)[1]: t for name, t in tensors.items() if name.startswith(f"fold{k}.")}
        dets.append(load_detector(meta.detector, meta.params, own))
    scorer = OODScorer(dets, [by_fold[k].threshold for k in folds], meta.detector, meta.pass_rate)
    ref = tensors.get("shift.reference")
    return scorer.eval(), meta, None if ref is None else ref.numpy()
