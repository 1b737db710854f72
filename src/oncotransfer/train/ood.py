"""Fit one fold's out-of-distribution detector on its training images' features and set its threshold on its
validation images only (``models.ood`` holds the detectors)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pandas as pd
import torch
from torch import nn

from oncotransfer.config import ExperimentConfig
from oncotransfer.data.splits import Fold
from oncotransfer.models.heads import Head
from oncotransfer.models.ood import Detector, detector_fitter, save_ood, threshold_for
from oncotransfer.models.tail import TailModel


@dataclass
class FoldOOD:
    """A fitted fold detector, its threshold (None: no validation subset of its own), and what it scored."""
    detector: Detector
    threshold: float | None
    test_scores: np.ndarray
    n_fit: int
    n_val: int
    val_logits: np.ndarray | None
    reference: np.ndarray | None = None
    val_scores: np.ndarray | None = None
    """Features of images this fold's feature extractor never trained on (the shift check's reference)."""

    def flags(self, scores: np.ndarray) -> np.ndarray | None:
        return None if self.threshold is None else np.asarray(scores) <= self.threshold


def feature_fn(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """Inputs of a fold's trained module -> the features its head reads: cached features are them already
    (a head), cached prefix activations go through the tail, images through the backbone."""
    if isinstance(module, Head):
        return lambda x: x
    if isinstance(module, TailModel):
        return module.backbone
    return module.feature_module()


@torch.inference_mode()
def features_and_logits(module: nn.Module, head: nn.Module, batches: Iterable) -> tuple[np.ndarray, np.ndarray]:
    """(features, logits) over ``batches`` of (inputs, labels), fp32, in batch order (every rank computes all)."""
    module.eval()
    feat = feature_fn(module)
    fs, zs = [], []
    for x, _ in batches:
        f = feat(x.float()).float()
        fs.append(f.cpu())
        zs.append(head(f).float().cpu())
    if not fs:
        return np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32)
    return torch.cat(fs).numpy(), torch.cat(zs).numpy()


def score(detector: Detector, features: np.ndarray, logits: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return detector(torch.as_tensor(features), torch.as_tensor(logits)).numpy().astype(np.float64)


def fit_fold_ood(module: nn.Module, head: nn.Module, inputs, fold: Fold, labels: np.ndarray,
                 cfg: ExperimentConfig, reference: bool = False) -> FoldOOD | None:
    """The fold's detector (``evaluate.ood``; None when it is ``none``) fitted on the training originals (no
    augmented copies), thresholded on the fold's own validation subset, and its scores of the test fold.
    ``reference``: also keep features the fold's feature extractor did not train on (all images for a frozen
    base, else the validation and test images)."""
    kind = cfg.evaluate.ood
    if kind == "none":
        return None
    f_tr, _ = features_and_logits(module, head, inputs.originals())
    det = detector_fitter(kind)(f_tr, labels[fold.train], bool(cfg.model.head.sigmoid)).eval()
    own_val = not fold.selection_on_test and len(fold.val) > 0
    threshold, val_logits, f_va, s_va = None, None, None, None
    if own_val:
        f_va, val_logits = features_and_logits(module, head, inputs.val())
        s_va = score(det, f_va, val_logits)
        threshold = threshold_for(s_va, cfg.evaluate.ood_pass_rate)
    f_te, z_te = features_and_logits(module, head, inputs.test())
    ref = None
    if reference:
        parts = ([f_tr] if cfg.model.freeze == "frozen" else []) + ([f_va] if f_va is not None else []) + [f_te]
        ref = np.concatenate(parts)
    return FoldOOD(det, threshold, score(det, f_te, z_te), len(fold.train), len(fold.val) if own_val else 0,
                   val_logits, ref, s_va)


def pool_thresholds(oods: dict[int, FoldOOD | None], pass_rate: float, same_scale: bool = True
                    ) -> dict[str, float] | None:
    """Thresholds from the pooled validation scores of all folds (each fold's validation images scored by its
    own detector), as for the temperature: the 95th percentile of ~50 validation images (a fold of a few hundred)
    moves by several points from fold to fold. Scores on one scale in every fold (``Detector.same_scale``: k-NN
    distances between unit vectors) share one threshold. Otherwise (Mahalanobis, energy: each fold's fit sets its
    own scale) each fold keeps its centre and spread (median and median absolute deviation of its validation
    scores) and the tail comes from every fold's standardised scores together: threshold_k = median_k + MAD_k * q,
    q the ``pass_rate`` quantile of the pooled (score - median) / MAD. Returns the per-fold thresholds it replaced
    (None, and nothing changed, when some fold has no validation scores)."""
    folds = [o for o in oods.values() if o is not None]
    if len(folds) < 2 or any(o.val_scores is None or len(o.val_scores) < 2 for o in folds):
        return None
    own = {str(k): float(o.threshold) for k, o in oods.items() if o is not None}
    scales = [(0.0, 1.0) if same_scale else _centre_spread(o.val_scores) for o in folds]
    q = threshold_for(np.concatenate([(o.val_scores - m) / d for o, (m, d) in zip(folds, scales)]), pass_rate)
    for o, (m, d) in zip(folds, scales):
        o.threshold = float(m + d * q)
    return own


def _centre_spread(v: np.ndarray) -> tuple[float, float]:
    m = float(np.median(v))
    d = float(np.median(np.abs(v - m))) or float(np.std(v)) or 1.0
    return m, d


def reference_rows(fold: Fold, cfg: ExperimentConfig) -> np.ndarray:
    """Data-set rows of ``FoldOOD.reference``, in its order."""
    own_val = not fold.selection_on_test and len(fold.val) > 0
    parts = ([fold.train] if cfg.model.freeze == "frozen" else []) + ([fold.val] if own_val else []) + [fold.test]
    return np.concatenate(parts)


NO_THRESHOLD = ("out-of-distribution threshold not set for fold(s) {folds}: no validation subset of their own "
                "(thresholds come from validation images only); ood_score is given but no image is flagged. Set "
                "split.val_size > 0 (kfold, lopo) or use split.kind: train-val-test")
FEATURES = "the features each fold model's head reads (its own backbone output), L2-normalised for knn"


def save_run_ood(run_dir: Path, oods: dict[int, FoldOOD | None], cfg: ExperimentConfig, head: Head,
                 temperatures: dict[str, float | None], fold0: Fold, dup_groups: np.ndarray | None,
                 per_fold: dict[str, float] | None = None) -> list[str]:
    """Write RUN/checkpoint/ood.* for every fold's detector; returns the warnings for run.json and the report.
    The reference for the shift check keeps one image per near-duplicate group (a two-sample test assumes
    independent images)."""
    if not oods or any(o is None for o in oods.values()):
        return []
    confidences: list[float] = []
    for k, o in oods.items():
        if o.val_logits is not None and len(o.val_logits):
            with torch.inference_mode():
                p = head.probabilities(torch.as_tensor(o.val_logits), temperatures.get(str(k)))
            confidences += p.max(dim=1).values.tolist()
    ref, rows = oods[fold0.index].reference, reference_rows(fold0, cfg)
    if ref is not None and dup_groups is not None:
        _, first = np.unique(np.asarray(dup_groups)[rows], return_index=True)
        ref, rows = ref[np.sort(first)], rows[np.sort(first)]
    described = None if ref is None else (ref, {
        "fold": fold0.index, "images": int(len(rows)),
        "which": ("all images (the frozen backbone never trained on them)" if cfg.model.freeze == "frozen"
                  else f"fold {fold0.index}'s validation and test images (its model did not train on them)"),
        "duplicates": "one image per near-duplicate group" if dup_groups is not None else "not collapsed"})
    save_ood(Path(run_dir) / "checkpoint", {k: o.detector for k, o in oods.items()},
             {k: o.threshold for k, o in oods.items()}, {k: (o.n_fit, o.n_val) for k, o in oods.items()},
             cfg.evaluate.ood, cfg.evaluate.ood_pass_rate, FEATURES, confidences, described,
             {"pooled": per_fold is not None, "per_fold": per_fold,
              "n_val": int(sum(o.n_val for o in oods.values()))})
    missing = [str(k) for k, o in oods.items() if o.threshold is None]
    return [NO_THRESHOLD.format(folds=", ".join(missing))] if missing else []


def with_ood_columns(frame: pd.DataFrame, ood: FoldOOD | None) -> pd.DataFrame:
    """A fold's test predictions with ``ood_score`` and ``in_distribution`` from its own detector (rows in the
    fold's test order, as ``test_scores``)."""
    if ood is None:
        return frame
    flags = ood.flags(ood.test_scores)
    return frame.assign(ood_score=ood.test_scores,
                        in_distribution=pd.Series([None] * len(frame), dtype=object, index=frame.index)
                        if flags is None else pd.Series(flags, index=frame.index).astype(object))
