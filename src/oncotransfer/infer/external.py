"""``evaluate RUN --data OTHER``: score the run's model on other labelled data, with the checks that say how far
to trust that score: overlap with the training images, the share out of distribution, and a dataset-shift test
against the run's training features; optionally with BatchNorm statistics re-estimated on the new images (AdaBN)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
from torch import nn

from oncotransfer.data.images import decode_many
from oncotransfer.data.manifest import duplicate_groups, load_manifest
from oncotransfer.errors import ConfigError, DataError
from oncotransfer.evaluate.external import overlap_checked
from oncotransfer.evaluate.report import evaluate_run
from oncotransfer.evaluate.shift import collapse_duplicates, shift_test
from oncotransfer.evaluate.slides import attach_slides
from oncotransfer.infer.predict import SCORE_BATCH, Engine, Predictor
from oncotransfer.runtables import predictions_table

ADAPT = ("none", "bn")


def predictions_on(run_dir: str | Path, data_path: str, engine: Engine = "auto", fold: int | None = None,
                   predictor: "Predictor | None" = None, hashes: bool = False, adapt: str = "none",
                   log: Callable[[str], None] | None = None) -> pd.DataFrame:
    """Score a labelled data set (class folders, manifest, demo:NAME) in the format of RUN/predictions.csv:
    ``prob_<class>`` uncalibrated and, when temperatures exist, ``cal_prob_<class>`` (both averaged over the
    fold models of an ensemble), ``ood_score`` and ``in_distribution``; ``attrs["features"]``: the first member's
    features when the run keeps a shift reference to compare them with. All from one pass of ONNX Runtime on
    ``RUN/export/scoring`` (exported on first use: ``scoring_session``), or of PyTorch (``engine="torch"``, or
    where that export is impossible). ``adapt="bn"``: the probabilities come from the fold models with their
    BatchNorm statistics re-estimated on these images (AdaBN); OOD scores and features stay the trained models'."""
    if adapt not in ADAPT:
        raise ConfigError(f"--adapt {adapt!r}: expected one of {', '.join(ADAPT)}")
    pred = predictor or Predictor.from_run(run_dir, "torch", fold)
    session = scoring_session(pred, engine, fold, log)
    regex = ((pred.meta.get("config") or {}).get("data") or {}).get("patient_regex")
    m = load_manifest(data_path, regex, min_classes=1, dicom_frames=pred.dicom_frames)
    unknown = sorted(set(m.classes) - set(pred.classes))
    if unknown:
        raise DataError(f"{data_path}: classes {unknown} are not among the model's classes {pred.classes}; "
                        "name the class folders (or manifest labels) as in training")
    images, ok, failed, phashes = decode_many(m.paths, pred.size, phash=hashes)
    if not ok:
        raise DataError(f"{data_path}: none of the {len(m)} images could be read, e.g. {next(iter(failed.values()))}")
    want_features = pred.shift_reference is not None
    x = pred.normalised(images)
    if session is not None:
        from oncotransfer.runtime import run_session_outputs
        outs = run_session_outputs(session, x.numpy(), SCORE_BATCH)
        probs, cal = outs[0], outs[1]
        ood = outs[2].astype(np.float64) if pred.ood is not None else None
        features = [outs[-1]] if want_features else None
    else:
        features = [] if want_features else None
        probs, cal, ood = pred.score_all(x, features=features)
    if adapt == "bn":
        probs, cal, _ = adapted(pred, x).score_all(x)
    cal = cal if pred.ensemble.calibrated else None
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


class ScoringModel(nn.Module):
    """Normalised batch -> (uncalibrated, calibrated probabilities[, OOD scores][, the first member's features]):
    everything ``evaluate --data`` reads, from one pass; the graph of ``RUN/export/scoring``."""

    def __init__(self, pred: Predictor):
        super().__init__()
        self.ensemble, self.ood, self.features = pred.ensemble, pred.ood, pred.shift_reference is not None
        self.names = ("uncalibrated", "calibrated", *(("ood_score",) if pred.ood is not None else ()),
                      *(("features",) if self.features else ()))

    def forward(self, x: torch.Tensor):
        feats, logits = self.ensemble.member_outputs(x)
        out = [self.ensemble.average(logits, False), self.ensemble.average(logits, True)]
        if self.ood is not None:
            out.append(self.ood(feats, logits))
        return tuple(out + [feats[0]] * self.features)


def scoring_session(pred: Predictor, engine: Engine, fold: int | None, log: Callable[[str], None] | None):
    """An ONNX Runtime session of ``ScoringModel`` (exported on first use into RUN/export/scoring[/foldK], again
    when stale), or None for PyTorch: ``engine="torch"``, or (said in one ``log`` line) where export is impossible."""
    if engine not in ("auto", "torch", "onnx"):
        raise ConfigError(f"--engine {engine!r}: expected auto, torch or onnx")
    if engine == "torch":
        return None
    folder = pred.run_dir / "export" / "scoring" / ("" if fold is None else f"fold{fold}")
    return pred.onnx_session(engine, fold, log, folder, lambda f: _export_scoring(pred, f))[0]


def _export_scoring(pred: Predictor, folder: Path) -> None:
    """Write ``ScoringModel`` as folder/model.onnx with a model.json as ``export`` writes (digests, members,
    detector); every output checked against PyTorch on the run's own images first."""
    from oncotransfer import __version__
    from oncotransfer.infer.export import PARITY_TOL, ExportParityError, parity_images
    from oncotransfer.io import write_json
    from oncotransfer.rundir import file_digest
    from oncotransfer.runtime import export_onnx, ort_session, run_session_outputs
    from oncotransfer.infer.export_cache import checkpoint_digest
    model = ScoringModel(pred).eval()
    x = pred.normalised(parity_images(pred.run_dir, pred.meta, pred.size))
    with torch.inference_mode():
        refs = [t.numpy() for t in model(x)]
    path = export_onnx(model, folder / "model.onnx", pred.size, outputs=model.names)
    got = run_session_outputs(ort_session(path), x.numpy())
    # relative above 1: OOD scores and features can be large numbers
    diff = max((float(np.max(np.abs(g - r) / np.maximum(1.0, np.abs(r)))) for g, r in zip(got, refs) if r.size),
               default=0.0)
    if not diff <= PARITY_TOL:
        path.unlink(missing_ok=True)
        raise ExportParityError(f"{path}: outputs differ from PyTorch by {diff:.2e} (> {PARITY_TOL:g})")
    write_json(folder / "model.json", {
        "format": "onnx", "file": path.name, **file_digest(path), "oncotransfer_version": __version__,
        "classes": pred.classes, "checkpoint_digest": checkpoint_digest(pred.run_dir), "members": pred.members,
        "outputs": list(model.names), "model": pred.describe(), "purpose": "evaluate --data (a cache, not for serving)",
        "parity": {"images": int(len(x)), "max_diff": diff, "tolerance": PARITY_TOL},
        "ood": None if pred.ood is None else {"output": "ood_score", "tensors_sha256": pred.ood_meta.tensors_sha256}})


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
                slide_aggregate: str = "mean", adapt: str = "none", log: Callable[[str], None] | None = None
                ) -> dict:
    """``evaluate RUN --data OTHER``: score the run's model (the ensemble of its fold models by default) on
    other labelled data; writes metrics_report_external.json and report_external.html/md. The metrics carry
    ``overlap`` (with the training images), ``ood`` (share out of distribution, each part's accuracy) and
    ``shift`` (the two-sample test against the training features)."""
    pred = Predictor.from_run(run_dir, "torch", fold)  # the scoring graph is its own export (scoring_session)
    df = predictions_on(run_dir, data_path, engine, fold, predictor=pred, hashes=True, adapt=adapt, log=log)
    skipped = df.attrs.get("skipped") or {}
    shift = shift_checked(pred, df)
    df, overlap = overlap_checked(run_dir, attach_slides(df, data_path), [m["fold"] for m in pred.members], pred.size,
                                  pred.us_region)
    how = " with BatchNorm statistics re-estimated on these images (AdaBN)" if adapt == "bn" else ""
    metrics = evaluate_run(run_dir, predictions=df, out_name="report_external",
                           scored_by=f"{pred.describe()} on {data_path}{how}", slide_aggregate=slide_aggregate,
                           overlap=overlap, shift=shift)
    return {**metrics, "skipped": skipped} if skipped else metrics
