"""``evaluate RUN --data OTHER``: score the run's model on other labelled data, with the checks that say how far
to trust that score: overlap with the training images, the share out of distribution, and a dataset-shift test
against the run's training features; optionally with BatchNorm statistics re-estimated on the new images (AdaBN)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from oncotransfer.data.images import decode_many
from oncotransfer.data.manifest import duplicate_groups, load_manifest
from oncotransfer.errors import ConfigError, DataError
from oncotransfer.evaluate.external import overlap_checked
from oncotransfer.evaluate.report import evaluate_run
from oncotransfer.evaluate.shift import collapse_duplicates, shift_test
from oncotransfer.evaluate.slides import attach_slides
from oncotransfer.infer.predict import Engine, Predictor
from oncotransfer.rundir import predictions_table

ADAPT = ("none", "bn")


def predictions_on(run_dir: str | Path, data_path: str, engine: Engine = "auto", fold: int | None = None,
                   predictor: "Predictor | None" = None, hashes: bool = False, adapt: str = "none") -> pd.DataFrame:
    """Score a labelled data set (class folders, manifest, demo:NAME) in the format of RUN/predictions.csv:
    ``prob_<class>`` uncalibrated and, when temperatures exist, ``cal_prob_<class>`` (both averaged over the
    fold models of an ensemble), ``ood_score`` and ``in_distribution``. With temperatures, or a shift reference
    to compare with, the scores come from PyTorch (one pass gives both probabilities and the first member's
    features: ``attrs["features"]``). ``adapt="bn"``: the probabilities come from the fold models with their
    BatchNorm statistics re-estimated on these images (AdaBN); OOD scores and features stay the trained models'."""
    if adapt not in ADAPT:
        raise ConfigError(f"--adapt {adapt!r}: expected one of {', '.join(ADAPT)}")
    pred = predictor or Predictor.from_run(run_dir, engine, fold)
    regex = ((pred.meta.get("config") or {}).get("data") or {}).get("patient_regex")
    m = load_manifest(data_path, regex, min_classes=1, dicom_frames=pred.dicom_frames)
    unknown = sorted(set(m.classes) - set(pred.classes))
    if unknown:
        raise DataError(f"{data_path}: classes {unknown} are not among the model's classes {pred.classes}; "
                        "name the class folders (or manifest labels) as in training")
    images, ok, failed, phashes = decode_many(m.paths, pred.size, phash=hashes)
    if not ok:
        raise DataError(f"{data_path}: none of the {len(m)} images could be read, e.g. {next(iter(failed.values()))}")
    features: list[np.ndarray] | None = [] if pred.shift_reference is not None else None
    if pred.ensemble.calibrated or pred.session is None or features is not None or adapt != "none":
        x = pred.normalised(images)
        probs, cal, ood = pred.score_all(x, features=features)
        if adapt == "bn":
            probs, cal, _ = adapted(pred, x).score_all(x)
        cal = cal if pred.ensemble.calibrated else None
    else:
        (probs, ood), cal = pred.predict_with_ood(images), None
    df = predictions_table([m.relpath(i) for i in ok], probs, pred.classes, fold=0,
                           labels=[m.classes[m.labels[i]] for i in ok], calibrated=cal, ood_scores=ood,
                           in_distribution=pred.in_distribution(ood))
    if hashes:  # for the overlap check of evaluate_on (sha256, and pHash as the splits compute it)
        df["sha256"] = [m.sha256[i] for i in ok]
        df["phash"] = phashes
        df["file"] = [m.paths[i] for i in ok]  # decoded again for keypoints and the pHash of 8 orientations
    df.attrs["skipped"] = {**m.skipped, **{m.paths[i]: why for i, why in failed.items()}}
    if features:
        df.attrs["features"] = np.concatenate(features)
    return df


def adapted(pred: Predictor, x: torch.Tensor, batch_size: int = 32) -> Predictor:
    """A PyTorch copy of ``pred`` whose fold models' BatchNorm statistics are re-estimated on ``x`` (AdaBN,
    Li et al. 2016); the loaded models are left as they are."""
    import copy

    from oncotransfer.infer.adapt import adapt_batchnorm
    from oncotransfer.models.ensemble import Ensemble
    members = adapt_batchnorm(list(pred.ensemble.members), (x[s:s + batch_size] for s in range(0, len(x), batch_size)))
    out = copy.copy(pred)
    out.ensemble = Ensemble(members, pred.ensemble.temperatures, pred.ensemble.names).eval()
    out.model, out.session, out.engine = members[0], None, "torch"
    return out


def shift_checked(pred: Predictor, df: pd.DataFrame) -> dict[str, Any] | None:
    """The dataset-shift test of the external images (one per near-duplicate group) against the run's
    reference features (``ood.json``'s ``reference``: images the first fold model never trained on); None when
    the run keeps no reference (trained before it did, or without a detector)."""
    ext = df.attrs.get("features")
    if pred.shift_reference is None or ext is None:
        return None
    ph = df["phash"].to_numpy(dtype=np.uint64) if "phash" in df and not df["phash"].isna().any() else None
    ext = collapse_duplicates(ext, duplicate_groups(df["sha256"].tolist(), ph)) if "sha256" in df else ext
    ref = pred.ood_meta.reference or {}
    base = {"reference": ref, "external_groups": int(len(ext))}
    try:
        r = shift_test(pred.shift_reference, ext, random_state=0)
    except DataError as e:
        return {**base, "line": f"dataset shift: not tested ({e})", "shifted": None}
    return {**base, "statistic": r.statistic, "p_value": r.p_value, "permutations": r.permutations,
            "n_reference": r.n_reference, "n_external": r.n_external, "domain_auc": r.domain_auc,
            "method": r.method, "shifted": r.differs(SHIFT_ALPHA), "alpha": SHIFT_ALPHA, "line": r.line(SHIFT_ALPHA)}


SHIFT_ALPHA = 0.01
"""Significance level of the shift verdict: one false alarm in 100 data sets drawn like the training data."""


def evaluate_on(run_dir: str | Path, data_path: str, engine: Engine = "auto", fold: int | None = None,
                slide_aggregate: str = "mean", adapt: str = "none") -> dict:
    """``evaluate RUN --data OTHER``: score the run's model (the ensemble of its fold models by default) on
    other labelled data; writes metrics_report_external.json and report_external.html/md. The metrics carry
    ``overlap`` (with the training images), ``ood`` (share out of distribution, each part's accuracy) and
    ``shift`` (the two-sample test against the training features)."""
    pred = Predictor.from_run(run_dir, engine, fold)
    df = predictions_on(run_dir, data_path, predictor=pred, hashes=True, adapt=adapt)
    skipped = df.attrs.get("skipped") or {}
    shift = shift_checked(pred, df)
    df, overlap = overlap_checked(run_dir, attach_slides(df, data_path), [m["fold"] for m in pred.members], pred.size,
                                  pred.us_region)
    how = " with BatchNorm statistics re-estimated on these images (AdaBN)" if adapt == "bn" else ""
    metrics = evaluate_run(run_dir, predictions=df, out_name="report_external",
                           scored_by=f"{pred.describe()} on {data_path}{how}", slide_aggregate=slide_aggregate,
                           overlap=overlap, shift=shift)
    return {**metrics, "skipped": skipped} if skipped else metrics
